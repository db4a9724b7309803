"""The sweep's report: a Markdown table per model, a CSV of every config, and PNG plots.

    RESULTS/report.md          summary (baseline -> best tier, speed-up, winning settings) + a table per model
    RESULTS/results.csv        one row per config of this sweep (the current keys only)
    RESULTS/throughput.png     output tok/s/GPU per model and tier, published figures beside ours
    RESULTS/pareto_size.png    best useful throughput (rows that pass the quality gate) vs model size, Pareto
                               frontier marked (raw throughput when no record has useful tokens: ignore_eos)
    RESULTS/pareto_quality.png best throughput vs the models' quality column (when the sweep gives one)
"""
from __future__ import annotations

import csv
from pathlib import Path

from engine.bench.driver import OK
from engine.bench.sweep import BASELINE, Sweep

CSV_COLUMNS = ["model", "model_name", "params_b", "quality", "tier", "knobs", "outcome", "error",
               "useful_tok_s_gpu", "useful_gpu_hours_per_b", "useful_share", "repetition_stopped", "output_truncated",
               "output_tok_s_gpu", "output_tok_s", "input_tok_s", "docs_s", "gpus", "gpu_hours_per_b",
               "cost_per_b_usd", "prefix_cache_hit", "mean_output_tokens", "docs", "requests", "failed",
               "output_tokens", "input_tokens", "wall_s", "startup_s", "warmup_s", "reference", "device", "key",
               "finished_at"]


def params_b(recs: list[dict]) -> float | None:
    for r in recs:
        if r.get("params_b"):
            return float(r["params_b"])
    for r in recs:
        if r.get("params"):
            return r["params"] / 1e9
    return None


def score_key(records: list[dict]) -> str:
    """What "best" means: useful output tok/s/GPU (rows that pass the quality gate), unless no record has
    any (a sweep with ignore_eos: every row is cut at max_new_tokens), then raw output tok/s/GPU."""
    return "useful_tok_s_gpu" if any(r.get("useful_tok_s_gpu") for r in records if r["outcome"] == OK) \
        else "output_tok_s_gpu"


def summarise(sweep: Sweep, records: list[dict], gpu_hour_usd: float) -> list[dict]:
    """Per model: baseline, the best ok config of each tier (by score_key), the best overall and the speed-up.
    A model with no record (left out with --models, or not reached yet) gets no row: it was not run."""
    key = score_key(records)
    rows = []
    for m in sweep.models:
        recs = [r for r in records if r["model"] == m.label]
        if not recs:
            continue
        ok = [r for r in recs if r["outcome"] == OK]
        base = next((r for r in ok if r["tier"] == BASELINE), None)
        tiers = {}
        for tier in [BASELINE] + [t.name for t in sweep.tiers]:
            cand = [r for r in ok if r["tier"] == tier]
            tiers[tier] = max(cand, key=lambda r: r.get(key) or 0) if cand else None
        best = max(ok, key=lambda r: r.get(key) or 0) if ok else None
        gph = best["gpu_hours_per_b"] if best else None
        rows.append({
            "model": m.label, "params_b": params_b(recs), "quality": m.quality, "baseline": base, "tiers": tiers,
            "best": best, "speedup": (best.get(key) or 0) / base[key] if best and base and base.get(key) else None,
            "useful_gpu_hours_per_b": best.get("useful_gpu_hours_per_b") if best else None, "score": key,
            "gpu_hours_per_b": gph, "cost_per_b_usd": gph * gpu_hour_usd if gph else None,
            "reference": m.reference, "counts": _counts(recs),
        })
    return rows


def _counts(recs: list[dict]) -> str:
    out: dict[str, int] = {}
    for r in recs:
        out[r["outcome"]] = out.get(r["outcome"], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in out.items())


def _f(x, fmt: str = "{:,.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def _tps(r: dict | None) -> str:
    return "—" if r is None else f"{r['output_tok_s_gpu']:,.1f}"


def markdown(sweep: Sweep, records: list[dict], summary: list[dict], gpu_hour_usd: float) -> str:
    tiers = [t.name for t in sweep.tiers]
    devices = sorted({r["device"] for r in records if r.get("device")})
    unit = "GPU" if _unit(records) == "GPU" else "CPU"
    run = sweep.run
    lines = [
        f"# Bench: {sweep.name}",
        "",
        f"- sweep file: `{sweep.path}`; device: {', '.join(devices) or 'not run yet'}",
        f"- sample: {sweep.data.docs} documents measured after {sweep.data.warmup_docs} warm-up documents "
        f"(not counted), from {', '.join(sweep.data.paths)}",
        f"- run: backend `{run.get('backend', 'torch')}`, prompts {run.get('prompts', ['faq'])}, "
        f"sampling {run.get('sampling', {})}; "
        + ("end of sequence IGNORED (fixed-length outputs)" if run.get("sampling", {}).get("ignore_eos")
           else "real end of sequence"),
        f"- throughput is output tokens/s per {_unit(records)}; cost at ${gpu_hour_usd:,.2f} per "
        f"{_unit(records)}-hour; GPU-h / 1B tok = hours of one {_unit(records)} per billion output tokens",
        f"- useful tokens: output tokens of the rows that pass the quality gate (finished by the model, not empty, "
        f"not stopped in a repetition loop); best = highest "
        f"{'useful' if score_key(records) == 'useful_tok_s_gpu' else 'raw (no useful tokens: EOS ignored)'} "
        f"output tok/s per {_unit(records)}",
    ]
    if any(s["reference"] for s in summary):
        lines.append(f"- published column: {sweep.reference_label}")
    lines += ["", "## Summary", "",
              "| model | params (B) | baseline | " + " | ".join(f"{t} best" for t in tiers) +
              f" | best speed-up | winning settings | useful tok/s/{unit} | {unit}-h / 1B useful tok "
              f"| {unit}-h / 1B tok | $ / 1B tok | published default → best | configs |",
              "|---|---:|---:|" + "---:|" * len(tiers) + "---:|---|---:|---:|---:|---:|---|---|"]
    for s in summary:
        ref = s["reference"]
        pub = (f"{ref.get('default', 0):,.0f} → {max(ref.values()):,.0f}" if ref else "—")
        lines.append(
            f"| {s['model']} | {_f(s['params_b'], '{:,.3g}')} | {_tps(s['baseline'])} | "
            + " | ".join(_tps(s["tiers"][t]) for t in tiers)
            + f" | {_f(s['speedup'], '{:.2f}x')} | {s['best']['knobs'] if s['best'] else '—'} | "
            f"{_f(s['best'].get('useful_tok_s_gpu') if s['best'] else None)} | "
            f"{_f(s['useful_gpu_hours_per_b'], '{:,.1f}')} | {_f(s['gpu_hours_per_b'], '{:,.1f}')} | "
            f"{_f(s['cost_per_b_usd'], '${:,.0f}')} | {pub} | {s['counts']} |")
    for s in summary:
        recs = [r for r in records if r["model"] == s["model"]]
        lines += ["", f"## {s['model']}", "",
                  f"| tier | settings | outcome | output tok/s/{unit} | useful tok/s/{unit} | {unit}-h / 1B useful "
                  f"| input tok/s | docs/s | {unit}-h / 1B | $ / 1B | cache hit | mean output | published |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in recs:
            if r["outcome"] == OK:
                cost = r["gpu_hours_per_b"] * gpu_hour_usd if r.get("gpu_hours_per_b") else None
                cells = [_tps(r), _f(r.get("useful_tok_s_gpu")), _f(r.get("useful_gpu_hours_per_b")),
                         _f(r["input_tok_s"]), _f(r["docs_s"], "{:,.2f}"), _f(r["gpu_hours_per_b"]),
                         _f(cost, "${:,.0f}"), f"{r['prefix_cache_hit']:.0%}", _f(r["mean_output_tokens"], "{:,.0f}")]
                outcome = "ok" + (" **best**" if s["best"] and r["key"] == s["best"]["key"] else "")
            else:
                cells = ["—"] * 9
                outcome = f"{r['outcome']}: {r.get('error', '')}".replace("|", "/")[:120]
            lines.append(f"| {r['tier']} | {r['knobs']} | {outcome} | " + " | ".join(cells)
                         + f" | {_f(r.get('reference'), '{:,.0f}')} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, records: list[dict], gpu_hour_usd: float) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            row = dict(r)
            if r.get("gpu_hours_per_b"):
                row["cost_per_b_usd"] = float(f"{r['gpu_hours_per_b'] * gpu_hour_usd:.4g}")
            w.writerow(row)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point matches or beats on both axes (higher is better)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _unit(records: list[dict]) -> str:
    devices = {r.get("device") or "" for r in records if r["outcome"] == OK}
    return "CPU process" if devices and all(d.startswith("CPU") for d in devices) else "GPU"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_throughput(path: Path, sweep: Sweep, summary: list[dict], unit: str) -> None:
    plt = _plt()
    tiers = [BASELINE] + [t.name for t in sweep.tiers]
    names = [s["model"] for s in summary]
    width = 0.8 / len(tiers)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(names) + 3), 4.5))
    values = []
    for k, tier in enumerate(tiers):
        ys = [s["tiers"][tier]["output_tok_s_gpu"] if s["tiers"][tier] else 0 for s in summary]
        values += [y for y in ys if y]
        xs = [i + (k - (len(tiers) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, ys, width, label=f"{tier} (ours)")
        ref_key = "default" if tier == BASELINE else tier
        refs = [(x, s["reference"][ref_key]) for x, s in zip(xs, summary) if ref_key in s["reference"]]
        if refs:
            values += [y for _, y in refs]
            ax.scatter([x for x, _ in refs], [y for _, y in refs], marker="_", s=200, color="black", zorder=3,
                       label=sweep.reference_label if k == 0 else None)
    if values and max(values) / max(min(values), 1e-9) > 10:
        ax.set_yscale("log")
    crowded = len(names) > 4
    ax.set_xticks(range(len(names)), names, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel(f"output tokens/s per {unit}")
    ax.set_xlabel("model")
    ax.set_title(f"{sweep.name}: best config of each tier")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(path: Path, sweep: Sweep, summary: list[dict], x_key: str, x_label: str, log_x: bool,
                unit: str) -> None:
    """Best throughput per model against size or quality; the frontier holds the models that no other
    model beats on both (larger or better-scoring *and* faster)."""
    plt = _plt()
    pts = [(s[x_key], s["best"].get(s["score"]) or 0, s["model"]) for s in summary
           if s["best"] and s[x_key] is not None]
    what = "useful output" if summary and summary[0]["score"] == "useful_tok_s_gpu" else "output"
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if pts:
        front = sorted(pareto([(x, y) for x, y, _ in pts]), key=lambda i: pts[i][0])
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:gray", label="best config per model")
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "-o", color="tab:red",
                label="Pareto frontier")
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        refs = [(s[x_key], max(s["reference"].values())) for s in summary if s["reference"] and s[x_key] is not None]
        if refs:
            ax.scatter([x for x, _ in refs], [y for _, y in refs], marker="x", color="black", s=25,
                       label=f"{sweep.reference_label}, best")
        if log_x:
            ax.set_xscale("log")
        ys = [p[1] for p in pts] + [y for _, y in refs]
        if max(ys) / max(min(ys), 1e-9) > 10:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{what} tokens/s per {unit} (best config)")
    ax.set_title(f"{sweep.name}: throughput vs {x_label.split(' (')[0]}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(sweep: Sweep, records: list[dict], gpu_hour_usd: float | None = None) -> dict[str, Path]:
    price = sweep.gpu_hour_usd if gpu_hour_usd is None else gpu_hour_usd
    out = sweep.results
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(sweep, records, price)
    files = {"markdown": out / "report.md", "csv": out / "results.csv", "throughput": out / "throughput.png",
             "pareto_size": out / "pareto_size.png"}
    files["markdown"].write_text(markdown(sweep, records, summary, price))
    write_csv(files["csv"], records, price)
    unit = _unit(records)
    plot_throughput(files["throughput"], sweep, summary, unit)
    plot_pareto(files["pareto_size"], sweep, summary, "params_b", "model size (billion parameters)", True, unit)
    if any(s["quality"] is not None for s in summary):
        files["pareto_quality"] = out / "pareto_quality.png"
        plot_pareto(files["pareto_quality"], sweep, summary, "quality", "quality score (sweep's quality column)",
                    False, unit)
    return files
