"""`engine compare RESULTS...`: lighteval results files side by side, per task and macro average.

lighteval 0.13 writes OUTPUT_DIR/results/<model>/results_<timestamp>.json with
`results["task|k"][metric]` (plus `metric_stderr`) and an "all" entry; a directory argument is
searched for its newest results file per model. The score of a task is its `acc_norm` (the
early-signal suite's metric), else the first metric without a stderr suffix; the macro average is
the mean over the tasks every compared run has (so runs compare on the same tasks).

To choose between datasets the table also gives: each score's standard error (lighteval's
`*_stderr`) and the macro average's; with `baseline`, a delta column per run against it, marked `*`
where it exceeds twice the combined standard error; a chance-normalised macro average (each task's
accuracy rescaled so that chance is 0 and perfect is 100) for the early-signal suite's tasks, whose
chance levels range from 20 % to 50 %. Runs evaluated with different settings (max_samples, few-shot
seeds, another task definition or other examples: lighteval's own hashes of each task's examples
and prompts) are refused unless `allow_different` (then listed as a warning). Columns are labelled
by the argument's directory name (e.g. `eval/faq` -> faq), or by the labels given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from engine.errors import CompareError

PREFERRED = ("acc_norm", "acc")
# chance accuracy of the early-signal suite's tasks (1 / answer choices; ARC mostly 4)
CHANCE = {"arc_cf_easy": 0.25, "arc_cf_challenge": 0.25, "hellaswag_cf": 0.25, "piqa_cf": 0.5, "siqa_cf": 1 / 3,
          "openbookqa_cf": 0.25, "winogrande_cf": 0.5, "commonsenseqa_cf": 0.2, "mmlu_sample_cf": 0.25}


@dataclass
class RunScores:
    label: str
    path: Path
    scores: dict[str, float]  # task (without the few-shot suffix) -> score
    metric: dict[str, str]
    stderr: dict[str, float] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)  # what must agree between compared runs


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
    scores, metric, stderr = {}, {}, {}
    for task, values in results.items():
        if task == "all" or not isinstance(values, dict):
            continue
        name = task.rsplit("|", 1)[0] if "|" in task else task
        keys = [k for k in values if not k.endswith("_stderr") and isinstance(values[k], (int, float))]
        key = next((k for k in PREFERRED if k in keys), keys[0] if keys else None)
        if key is None:
            continue
        scores[name], metric[name] = float(values[key]), key
        if isinstance(values.get(f"{key}_stderr"), (int, float)):
            stderr[name] = float(values[f"{key}_stderr"])
    if not scores:
        raise CompareError(f"{path}: no task scores in it")
    general = data.get("config_general") or {}
    settings = {"max_samples": general.get("max_samples"), "num_fewshot_seeds": general.get("num_fewshot_seeds")}
    for task, cfg in (data.get("config_tasks") or {}).items():
        name = task.rsplit("|", 1)[0]
        hashes = ((data.get("summary_tasks") or {}).get(task) or {}).get("hashes") or {}
        settings[name] = {"prompt_function": cfg.get("prompt_function"), "version": cfg.get("version"),
                          "num_fewshots": cfg.get("num_fewshots"), "splits": cfg.get("evaluation_splits"),
                          "metrics": [m.get("metric_name") for m in cfg.get("metrics") or []],
                          "examples": hashes.get("hash_examples"), "prompts": hashes.get("hash_full_prompts")}
    model = general.get("model_name") or path.parent.name
    return RunScores(str(model), path, scores, metric, stderr, settings)


def compare(args: list[str], labels: list[str] | None = None, allow_different: bool = False,
            warn=None) -> list[RunScores]:
    groups = [(a, results_files(a)) for a in args]
    if labels and len(labels) != len(args):
        raise CompareError(f"{len(labels)} --label for {len(args)} results arguments: give one per argument")
    runs = []
    for i, (arg, files) in enumerate(groups):
        base = labels[i] if labels else Path(arg).name if Path(arg).is_dir() else None
        for f in files:
            r = load_scores(f)
            if base is not None:
                r.label = base if len(files) == 1 else f"{base}/{f.parent.name}"
            runs.append(r)
    names = [r.label for r in runs]
    for r in runs:  # still ambiguous (the same model evaluated twice): tell the columns apart by file
        if names.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})"
    diffs = setting_differences(runs)
    if diffs and not allow_different:
        raise CompareError("the runs were evaluated differently, so their scores do not compare: "
                           + "; ".join(diffs) + " (--allow-different-settings to show them anyway)")
    if diffs and warn is not None:
        warn("WARNING: the runs were evaluated differently: " + "; ".join(diffs))
    return runs


def setting_differences(runs: list[RunScores]) -> list[str]:
    out = []
    keys = set().union(*(r.settings for r in runs)) if runs else set()
    common = {t for t in keys if all(t in r.settings for r in runs)}
    for key in sorted(common):
        values = [r.settings[key] for r in runs]
        if any(v != values[0] for v in values[1:]):
            if isinstance(values[0], dict):
                parts = sorted(k for k in values[0] if any((v or {}).get(k) != values[0].get(k) for v in values[1:]))
                out.append(f"{key}: {', '.join(parts)} differ")
            else:
                out.append(f"{key}: " + ", ".join(f"{r.label}={v}" for r, v in zip(runs, values)))
    return out


def _pm(score: float, se: float | None) -> str:
    return f"{score * 100:.1f}" + (f" ±{se * 100:.1f}" if se is not None else "")


def table(runs: list[RunScores], baseline: str | None = None) -> tuple[list[str], list[list[str]]]:
    tasks = sorted({t for r in runs for t in r.scores})
    common = [t for t in tasks if all(t in r.scores for r in runs)]
    base = None
    if baseline is not None:
        base = next((r for r in runs if r.label == baseline), None)
        if base is None:
            raise CompareError(f"--baseline {baseline!r} is not one of the runs ({', '.join(r.label for r in runs)})")
    others = [r for r in runs if r is not base]
    header = ["task"] + [r.label for r in runs] + [f"Δ {r.label} vs {base.label}" for r in others if base]

    def se(r, t):
        return r.stderr.get(t)

    def delta(r, t_scores, t_ses):
        d = t_scores[0] - t_scores[1]
        if None in t_ses:
            return f"{d * 100:+.1f}"
        combined = math.sqrt(t_ses[0] ** 2 + t_ses[1] ** 2)
        return f"{d * 100:+.1f}" + ("*" if combined and abs(d) > 2 * combined else "")

    rows = []
    for t in tasks:
        row = [t] + [_pm(r.scores[t], se(r, t)) if t in r.scores else "—" for r in runs]
        if base:
            row += [delta(r, (r.scores[t], base.scores[t]), (se(r, t), se(base, t)))
                    if t in r.scores and t in base.scores else "—" for r in others]
        rows.append(row)

    def macro(r, tasks_, norm=False):
        if not tasks_:
            return None, None
        vals = [(r.scores[t] - CHANCE[t]) / (1 - CHANCE[t]) if norm else r.scores[t] for t in tasks_]
        ses = [(se(r, t) / (1 - CHANCE[t]) if norm else se(r, t)) for t in tasks_]
        m = sum(vals) / len(vals)
        return m, (math.sqrt(sum(x ** 2 for x in ses)) / len(ses) if all(x is not None for x in ses) else None)

    for label, tasks_, norm in ((f"**macro average** ({len(common)} tasks)", common, False),
                                (f"**macro, chance-normalised** ({len(common)} tasks)", common, True)):
        if norm and not all(t in CHANCE for t in common):
            continue
        ms = [macro(r, tasks_, norm) for r in runs]
        row = [label] + [_pm(m, e) if m is not None else "—" for m, e in ms]
        if base:
            bm = macro(base, tasks_, norm)
            row += [delta(r, (m, bm[0]), (e, bm[1])) if m is not None else "—"
                    for r, (m, e) in zip(runs, ms) if r is not base]
        rows.append(row)
    return header, rows


def markdown(runs: list[RunScores], baseline: str | None = None) -> str:
    header, rows = table(runs, baseline)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    lines.append("Scores are percentages ± standard error (acc_norm: log-likelihood accuracy normalised by answer "
                 "length)" + ("; Δ in points, * where it exceeds twice the combined standard error" if baseline else "")
                 + ". Runs: " + "; ".join(f"{r.label} = {r.path}" for r in runs))
    return "\n".join(lines)
