"""`engine export lighteval`: the early-signal cloze tasks file, its task list, and the command to run.

The tasks file (early_signal_tasks.py, standalone, for lighteval 0.13) is copied next to a task
list (`task|0` per line, the spec lighteval 0.13 accepts); the command evaluates a checkpoint in
transformers format with `lighteval accelerate`. lighteval runs in an environment of its own
(it pins numpy >= 2; nanotron numpy < 2).
"""
from __future__ import annotations

import ast
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ConfigError, SourceError

TASKS_FILE = Path(__file__).with_name("early_signal_tasks.py")


def task_names() -> list[str]:
    """The task names of the shipped tasks file, read without importing lighteval."""
    tree = ast.parse(TASKS_FILE.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_task" and node.args:
            names.append(node.args[0].value)
    return names


@dataclass(frozen=True)
class LightevalExport:
    """What `engine export lighteval` is asked for."""
    out: Path  # where the tasks file and the task list go
    checkpoint: str  # the model to evaluate (transformers format), as the printed command names it
    tasks: list[str] | None = None  # None: the whole suite
    max_samples: int | None = None
    results: Path | None = None  # lighteval's --output-dir; None: OUT/results
    overwrite: bool = False


def export_lighteval(spec: LightevalExport) -> dict:
    """An existing non-empty `out` is refused unless `overwrite` (as `engine mix` and `export nanotron` do);
    with it, only the two files an export writes are replaced (lighteval's results under `out` stay)."""
    out, tasks, checkpoint, max_samples = spec.out, spec.tasks, spec.checkpoint, spec.max_samples
    available = task_names()
    chosen = tasks or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {', '.join(unknown)} (the suite has {', '.join(available)})")
    if out.exists() and not out.is_dir():
        raise SourceError(f"{out} is a file, not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not spec.overwrite:
        raise SourceError(f"{out} is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    tasks_py = out / TASKS_FILE.name
    shutil.copyfile(TASKS_FILE, tasks_py)
    task_list = out / "tasks.txt"
    task_list.write_text("".join(f"{t}|0\n" for t in chosen))
    results = spec.results or out / "results"
    cmd = ["lighteval", "accelerate", f"model_name={checkpoint},dtype=bfloat16", str(task_list),
           "--custom-tasks", str(tasks_py), "--output-dir", str(results)]
    if max_samples:
        cmd += ["--max-samples", str(max_samples)]
    return {"tasks_file": tasks_py, "task_list": task_list, "tasks": chosen, "command": shlex.join(cmd),
            "results": results}
