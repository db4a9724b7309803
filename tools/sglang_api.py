"""Read the argument names of an sglang release from its source, without importing it (sglang needs a GPU).

    .venv/bin/python tools/sglang_api.py [SGLANG_PACKAGE_DIR] [--write]

Without a directory it finds the installed `sglang` package (`pip install --no-deps sglang==X`
is enough). --write refreshes engine/config/sglang_server_args.txt and sglang_sampling_params.txt.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dir(arg: str | None = None) -> Path | None:
    if arg:
        return Path(arg)
    spec = importlib.util.find_spec("sglang")
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def _fields(path: Path, classes: set[str] | None = None) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and (classes is None or node.name in classes):
            for n in node.body:
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and not n.target.id.startswith("_"):
                    names.add(n.target.id)
    return names


def server_args(pkg: Path) -> set[str]:
    """ServerArgs fields: declared in srt/arg_groups/fields/*.py (0.5.2x), else on the dataclass itself."""
    folder = pkg / "srt" / "arg_groups" / "fields"
    if folder.is_dir():
        return set().union(*(_fields(f) for f in folder.glob("*.py") if f.name != "__init__.py"))
    return _fields(pkg / "srt" / "server_args.py", {"ServerArgs"})


def sampling_params(pkg: Path) -> set[str]:
    return _fields(pkg / "srt" / "sampling" / "sampling_params.py", {"SamplingParams"})


def main(argv: list[str]) -> int:
    write = "--write" in argv
    rest = [a for a in argv if a != "--write"]
    pkg = package_dir(rest[0] if rest else None)
    if pkg is None:
        print("sglang is not installed: pip install --no-deps sglang==0.5.23, or give its package directory",
              file=sys.stderr)
        return 1
    sa, sp = server_args(pkg), sampling_params(pkg)
    print(f"{pkg}: {len(sa)} server arguments, {len(sp)} sampling parameters")
    if write:
        out = ROOT / "engine" / "config"
        (out / "sglang_server_args.txt").write_text("\n".join(sorted(sa)) + "\n")
        (out / "sglang_sampling_params.txt").write_text("\n".join(sorted(sp)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
