"""The layout's rules, checked on the source: imports point downstream only (a stage never imports a later
one), backends do not import each other, and every engine error derives from one base with a status."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import engine.errors as errors

ROOT = Path(__file__).resolve().parents[1]
# The data path, upstream first. A module may import its own group and earlier groups, never a later one.
LAYERS = [
    ("base", ["engine.errors", "engine.types", "engine.ids", "engine.atomic", "engine.signals", "engine.cpu_load",
              "engine.machine", "engine.gate", "engine.metrics", "engine.progress", "engine.stores"]),
    ("config", ["engine.config"]),
    ("model", ["engine.model"]),
    ("reader", ["engine.input"]),
    ("renderer", ["engine.render"]),
    ("scheduler", ["engine.schedule"]),
    ("backend", ["engine.backends"]),
    ("collector", ["engine.collect"]),
    ("writer", ["engine.output"]),
    ("run", ["engine.run", "engine.worker", "engine.preflight", "engine.fingerprint"]),
    ("tools", ["engine.ops", "engine.handoff", "engine.bench", "engine.plan"]),
    ("cli", ["engine.cli"]),
]
BACKENDS = {f"engine.backends.{m}" for m in ("instant", "torch_backend", "vllm_engine", "sglang_engine", "http")}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it where it belongs")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every engine module imported anywhere in the file (top level and inside functions)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engine"):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (use engine.<module>)"
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                    if (ROOT / Path(*f"{node.module}.{a.name}".split("."))).with_suffix(".py").exists()
                    or (ROOT / Path(*f"{node.module}.{a.name}".split("."))).is_dir()]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("engine")]
    return out


def engine_files() -> list[Path]:
    return sorted((ROOT / "engine").rglob("*.py"))


def test_imports_point_downstream_only():
    upward = []
    for path in engine_files():
        me = _module(path)
        if me == "engine":  # the package docstring
            continue
        mine = _layer(me)
        for line, target in _imports(path):
            if target == "engine":
                continue
            if _layer(target) > mine:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {me} ({LAYERS[mine][0]}) imports {target} "
                              f"({LAYERS[_layer(target)][0]})")
    assert not upward, "imports that point upstream:\n" + "\n".join(upward)


def test_backends_do_not_import_each_other():
    crossing = []
    for path in sorted((ROOT / "engine" / "backends").glob("*.py")):
        me = _module(path)
        if me not in BACKENDS:
            continue
        for line, target in _imports(path):
            if target in BACKENDS and target != me:
                crossing.append(f"{path.relative_to(ROOT)}:{line}: {me} imports {target}")
    assert not crossing, ("backends importing each other (share through a module of its own, e.g. "
                          "backends/repetition.py):\n" + "\n".join(crossing))


def test_modules_stay_small():
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in engine_files()
           if (n := len(p.read_text().splitlines())) > 420]
    assert not big, "modules over ~400 lines:\n" + "\n".join(big)


def test_every_engine_error_derives_from_one_base_with_a_status():
    raised = set()
    for path in engine_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith("Error") or b.id in ("Exception", "RuntimeError"))
                    for b in node.bases):
                assert path.name == "errors.py", \
                    f"{path.relative_to(ROOT)}: exception {node.name} outside engine/errors.py"
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                raised.add(node.exc.func.id)
    for name in raised & set(errors.__all__):
        cls = getattr(errors, name)
        assert issubclass(cls, errors.EngineError), name
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, errors.EngineError), f"{name} does not derive from EngineError"


def test_no_literal_exit_statuses_outside_errors():
    literal = re.compile(r"\b(?:return|sys\.exit\(|exit_code\s*=)\s*[1-9]\)?\s*(#.*)?$")
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in engine_files() if p.name != "errors.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert not found, "exit statuses written as numbers (use engine.errors.ExitCode):\n" + "\n".join(found)


def test_readme_exit_status_table_matches_the_errors_module():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("Exit statuses of `engine run`"):]
    rows = re.findall(r"^\| (\d+) \| ([^|]+)\|", table, flags=re.M)
    documented = {int(code) for code, _ in rows}
    assert documented == {int(c) for c in errors.ExitCode}, (documented, list(errors.ExitCode))


# Test-only and peer-benchmark dependencies: the S3 server double (tests/support) and datatrove's pipeline
# (benchmarks/vllm_cpu.py) live outside the installed package.
NOT_IN_PACKAGE = ("moto", "datatrove")
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
import engine
skipped = {}
for m in pkgutil.walk_packages(engine.__path__, "engine."):
    if m.name.endswith(".__main__"):  # an entry point runs its command when imported
        continue
    try:
        importlib.import_module(m.name)
    except ImportError as exc:
        if (exc.name or "engine").split(".")[0] == "engine":
            raise
        skipped[m.name] = exc.name  # an optional dependency that is not installed here (lighteval, sglang)
print(json.dumps({"loaded": sorted(sys.modules), "skipped": skipped}))
"""


def test_package_imports_neither_moto_nor_datatrove(tmp_path):
    """In a directory of its own, so that only the installed package is importable (not benchmarks/, tests/)."""
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True, cwd=tmp_path,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.splitlines()[-1])
    assert "engine.bench.sweep" in got["loaded"] and "engine.cli.parser" in got["loaded"]  # the walk ran
    assert len(got["skipped"]) <= 3, got["skipped"]  # a few optional extras at most, not the package
    assert not [m for m in got["loaded"] if m.split(".")[0] in NOT_IN_PACKAGE]
    found = []  # also imports that only run on some path (inside functions): none in the source
    for path in engine_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                      if n.split(".")[0] in NOT_IN_PACKAGE]
    assert not found, "the installed package imports test or benchmark dependencies:\n" + "\n".join(found)
