"""`engine compare RESULTS...`: lighteval results files side by side, per task and macro average.

lighteval 0.13 writes OUTPUT_DIR/results/<model>/results_<timestamp>.json with
`results["task|k"][metric]` (plus `metric_stderr`) and an "all" entry; a directory argument is
searched for its newest results file per model. The score of a task is its `acc_norm` (the
early-signal suite's metric), else the first metric without a stderr suffix; the macro average is
the mean over the tasks every compared run has (so runs compare on the same tasks).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson

PREFERRED = ("acc_norm", "acc")


class CompareError(ValueError):
    pass


@dataclass
class RunScores:
    label: str
    path: Path
    scores: dict[str, float]  # task (without the few-shot suffix) -> score
    metric: dict[str, str]


def results_files(arg: str) -> list[Path]:
    p = Path(arg)
    if p.is_file():
        return [p]
    if p.is_dir():
        found = sorted(p.rglob("results_*.json"))
        if not found:
            raise CompareError(f"{p}: no lighteval results files (results_*.json) under it")
        newest: dict[Path, Path] = {}
        for f in found:  # timestamps sort lexically: keep the newest file of each model directory
            newest[f.parent] = max(newest.get(f.parent, f), f)
        return sorted(newest.values())
    raise CompareError(f"{arg}: no such file or directory")


def load_scores(path: Path) -> RunScores:
    try:
        data = orjson.loads(path.read_bytes())
        results = data["results"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise CompareError(f"{path}: not a lighteval results file ({exc})") from None
    scores, metric = {}, {}
    for task, values in results.items():
        if task == "all" or not isinstance(values, dict):
            continue
        name = task.rsplit("|", 1)[0] if "|" in task else task
        keys = [k for k in values if not k.endswith("_stderr") and isinstance(values[k], (int, float))]
        key = next((k for k in PREFERRED if k in keys), keys[0] if keys else None)
        if key is None:
            continue
        scores[name], metric[name] = float(values[key]), key
    if not scores:
        raise CompareError(f"{path}: no task scores in it")
    model = (data.get("config_general") or {}).get("model_name") or path.parent.name
    return RunScores(str(model), path, scores, metric)


def compare(args: list[str]) -> list[RunScores]:
    runs = [load_scores(f) for a in args for f in results_files(a)]
    labels = [r.label for r in runs]
    for r in runs:  # the same model evaluated twice: tell the columns apart by file
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})"
    return runs


def table(runs: list[RunScores]) -> tuple[list[str], list[list[str]]]:
    tasks = sorted({t for r in runs for t in r.scores})
    common = [t for t in tasks if all(t in r.scores for r in runs)]
    header = ["task"] + [r.label for r in runs]
    rows = [[t] + [f"{r.scores[t] * 100:.1f}" if t in r.scores else "—" for r in runs] for t in tasks]
    macro = [sum(r.scores[t] for t in common) / len(common) * 100 if common else None for r in runs]
    rows.append([f"**macro average** ({len(common)} tasks)"] + [f"{m:.1f}" if m is not None else "—" for m in macro])
    return header, rows


def markdown(runs: list[RunScores]) -> str:
    header, rows = table(runs)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    lines.append("Scores are percentages (acc_norm: log-likelihood accuracy normalised by answer length). Runs: "
                 + "; ".join(f"{r.label} = {r.path}" for r in runs))
    return "\n".join(lines)
