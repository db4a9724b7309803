"""GPU smoke test of the in-process SGLang path: one GPU, a few hundred documents, end to end.
(The acceptance checks of the SGLang review are tests/gpu/acceptance.py: run that first.)

    .venv/bin/python -m tests.gpu.smoke [--model embedded|HUB_ID|DIR] [--docs 512] [--set key=value ...]

Prints output tok/s per GPU and the prefix-cache hit rate; exits 0 (with a note) where CUDA or
sglang is missing, so it is safe anywhere. It drives the same code as `engine run`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


def available() -> str | None:
    """Why the smoke test cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import sglang  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the --no-deps source install fails on its imports
        return f"sglang cannot be imported ({type(exc).__name__}: {exc})"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.gpu.smoke", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--docs", type=int, default=512)
    ap.add_argument("--prompt", default="tutorial")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--set", action="append", default=[],
                    help="extra config overrides, e.g. sglang.server_args.tp_size=1")
    args = ap.parse_args(argv)
    why = available()
    if why:
        print(f"skipped: {why}")
        return 0
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from benchmarks.corpus import make_documents
    from engine.config.run_config import load_config
    from engine.run import Run

    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    try:
        src = work / "docs.parquet"
        pq.write_table(pa.Table.from_pylist(make_documents(args.docs, seed=7)), src)
        cfg = load_config(None, [f"input.paths=['{src}']", f"output.dir={work / 'out'}", "backend=sglang",
                                 f"model.name={args.model}", f"prompts=['{args.prompt}']",
                                 f"sampling.max_new_tokens={args.max_new_tokens}", "scheduler.max_in_flight=1024",
                                 *args.set])
        code, summary = Run(cfg).execute()
        s = summary.to_dict()  # the figures as summary.json has them
        from engine.bench.worker import gpus_used
        from engine.model.locate import resolve_model

        gpus = gpus_used(cfg, resolve_model(cfg.model.name, allow_hub=True)[0], None)  # dp_size defaults to every GPU
        print(f"device {torch.cuda.get_device_name(0)} x{gpus}; model {s['model']}; {s['requests_generated']} requests")
        print(f"output {s['output_tokens_per_s'] / gpus:,.0f} tok/s/GPU; input {s['input_tokens_per_s'] / gpus:,.0f} "
              f"tok/s/GPU; prefix-cache hit rate {s['prefix_cache_hit_rate']:.1%}; wall {s['wall_seconds']:.1f} s "
              f"(model load included)")
        return code
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
