"""Elastic scale-out, measured: static shards vs units claimed by workers, side by side on a real Slurm cluster.

    .venv/bin/python -m benchmarks.scaleout --out runs/bench/scaleout          # ~9 min: measure + simulate
    .venv/bin/python -m benchmarks.scaleout --simulate-only                    # the model alone (seconds)

**Measured** (a single-node Slurm cluster started under a temp dir, tests/slurm_cluster.py; needs root for
apt-get the first time): the same input (`--docs` documents, one prompt) with N = 4 tasks, once as static
shards (`engine launch slurm --shards 4`) and once as workers claiming units (`--workers 4`, input.unit_rows
`--unit-rows`). The instant backend paces every request (`--delay-ms`: it sleeps, so four tasks on two cores
do not contend); task 0 runs 4x slower (instant.slow_array_task = 0: a slow GPU) and task 1 is preempted
(`scontrol requeue`) once a quarter of the rows are stored. Makespan: from `sbatch` until the output is complete
(every shard or unit committed; the job's own end is reported beside it: a requeued worker that rejoins a
finished run still starts up). Ideal: the task start-up measured in this run plus the work spread perfectly over
the tasks' speeds (3 at 1x + 1 at 1/4x = 3.25 tasks), which no scheme beats. Rows are checked exactly once.

**Simulated** (clearly a model, not a measurement): 100 GPUs, work claimed in units of ~30 GPU-minutes vs static
shards of whole files, 20 random seeds per situation (input files of sizes spread +-30 %, fewer files than
GPUs x 3, 3 % of GPUs at 75 % speed, preemption every ~48 h with 2 h back in the queue, all together):
makespan / ideal, mean and worst seed.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the suite's Slurm cluster and tiny-model helpers


# ---- the model ---------------------------------------------------------------------------------------------
def simulate(gpus: int = 100, seeds: int = 20, unit_min: float = 30.0) -> list[dict]:
    """makespan / ideal of static shards (whole files per GPU) and of units claimed by free GPUs (module doc)."""
    situations = {
        "1,000 input files, sizes spread +-30 %": dict(files=1000),
        "250 files (fewer, larger files than GPUs x 3)": dict(files=250),
        "3 % of GPUs at 75 % speed": dict(files=1000, slow=0.03),
        "preempted every 48 h, 2 h back in the queue": dict(files=1000, preempt=True),
        "all of these together": dict(files=250, slow=0.03, preempt=True),
    }
    out = []
    for name, s in situations.items():
        ratios = {"static": [], "units": []}
        for seed in range(seeds):
            rng = random.Random(seed)
            total_h = 150.0 * gpus  # ~150 GPU-hours of work per GPU (the field's run: 14.7K GPU-hours on 100)
            sizes = [rng.uniform(0.7, 1.3) for _ in range(s["files"])]
            scale = total_h / sum(sizes)
            files = [x * scale for x in sizes]  # GPU-hours per file
            speed = [0.75 if rng.random() < s.get("slow", 0.0) else 1.0 for _ in range(gpus)]
            downs = [_preemptions(rng) if s.get("preempt") else [] for _ in range(gpus)]
            ideal = total_h / sum(speed)
            static = max(_finish(sum(files[g::gpus]), speed[g], downs[g]) for g in range(gpus))
            units = _units(files, unit_min / 60.0, speed, downs)
            ratios["static"].append(static / ideal)
            ratios["units"].append(units / ideal)
        out.append({"situation": name, **{f"{k}_mean": round(statistics.mean(v), 2) for k, v in ratios.items()},
                    **{f"{k}_worst": round(max(v), 2) for k, v in ratios.items()}})
    return out


def _preemptions(rng: random.Random, horizon_h: float = 2000.0) -> list[tuple[float, float]]:
    """(start, end) of the times a GPU is away: preempted every ~48 h (exponential), back after 2 h."""
    t, out = 0.0, []
    while t < horizon_h:
        t += rng.expovariate(1 / 48.0)
        out.append((t, t + 2.0))
        t += 2.0
    return out


def _finish(work_h: float, speed: float, downs: list[tuple[float, float]], start: float = 0.0) -> float:
    """When a GPU that starts `work_h` of work at `start` finishes it, away during `downs` (work resumes where it
    stopped: the journal)."""
    t, left = start, work_h
    for a, b in downs:
        if b <= t:
            continue
        if a > t:
            run = min(left / speed, a - t)
            t, left = t + run, left - run * speed
            if left <= 1e-9:
                return t
        t = max(t, b)
    return t + left / speed


def _units(files: list[float], unit_h: float, speed: list[float], downs: list[list[tuple[float, float]]]) -> float:
    """Units of ~`unit_h` GPU-hours (contiguous rows: a file's work cut into units) claimed by the GPU free first;
    a GPU taken away mid-unit gives the rest of that unit back (its lease goes stale: resumed from its journal)."""
    work = []
    for f in files:
        n = max(1, round(f / unit_h))
        work += [f / n] * n
    work.reverse()  # pop() takes them in order
    free = [(0.0, g) for g in range(len(speed))]
    heapq.heapify(free)
    end = 0.0
    while work:
        t, g = heapq.heappop(free)
        for a, b in downs[g]:  # away now: back at b
            if a <= t < b:
                t = b
        left = work.pop()
        nxt = next(((a, b) for a, b in downs[g] if a > t), None)
        done = t + left / speed[g]
        if nxt is not None and nxt[0] < done:  # preempted mid-unit: the rest goes back to the pool
            work.append(left - (nxt[0] - t) * speed[g])
            heapq.heappush(free, (nxt[1], g))
            continue
        end = max(end, done)
        heapq.heappush(free, (done, g))
    return end


# ---- the measurement -------------------------------------------------------------------------------------
def _stored(out: Path) -> int:
    """Rows stored so far: committed shards and units, and units in progress (their own state files)."""
    n = 0
    for p in list(out.glob("_state/*.json")) + list(out.glob("_units/*/g*/_state/*.json")):
        try:
            st = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        n += sum(int(c.get("done", 0)) for c in st.get("prompts", {}).values())
    return n


def _complete(out: Path) -> bool:
    from engine.output.layout import read_fingerprint
    from engine.output.readiness import run_progress

    try:
        fp = read_fingerprint(out)
        return fp is not None and run_progress(out, fp).is_complete
    except Exception:  # noqa: BLE001 - a file being replaced just now: not yet
        return False


def measure_mode(slurm, root: Path, model: Path, mode: str, args) -> dict:
    from conftest import sample_docs, write_config, write_jsonl

    d = root / mode
    d.mkdir(parents=True)
    os.chmod(d, 0o755)
    out = d / "out"
    docs = sample_docs(args.docs)
    src = write_jsonl(d / "in.jsonl", docs)
    cfg = write_config(d / "run.toml", model, [src], out, prompts=("faq",),
                       instant={"delay_ms": args.delay_ms, "completion_tokens": 8, "slow_array_task": 0,
                                "slow_factor": 4.0},
                       input={"unit_rows": args.unit_rows if mode == "units" else 0},
                       output={"flush_seconds": 0.5, "lease_heartbeat_seconds": 1.0, "lease_timeout_seconds": 10.0},
                       report={"enabled": False})
    count = ["--workers", "4"] if mode == "units" else ["--shards", "4"]
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "engine.cli", "launch", "slurm", str(cfg), *count,
                        "--gpus-per-shard", "0", "--cpus-per-shard", "1", "--time", "60", "--submit"],
                       cwd=ROOT, env=slurm.env, capture_output=True, text=True, check=True)
    job = re.findall(r"^job_id=(\d+)$", p.stdout, re.M)[0]
    preempted_at = done_at = None
    while time.monotonic() - t0 < args.timeout:
        if preempted_at is None and _stored(out) >= args.docs // 4 and \
                slurm.squeue(job).get(f"{job}_1") == "RUNNING":
            slurm.cmd("scontrol", "requeue", f"{job}_1")
            preempted_at = time.monotonic() - t0
        if done_at is None and _complete(out):
            done_at = time.monotonic() - t0
        if done_at is not None and not slurm.squeue(job):
            break
        time.sleep(0.25)
    job_end = time.monotonic() - t0
    if done_at is None:
        raise RuntimeError(f"{mode}: the run did not complete in {args.timeout} s; see {out / '_logs'}")
    ids = []
    import pyarrow.parquet as pq
    for f in sorted((out / "faq").glob("*.parquet")):
        ids += pq.read_table(f, columns=["id"]).column("id").to_pylist()
    exactly_once = len(ids) == len(set(ids)) == args.docs
    startups = []  # each task's first attempt: from its start line to "starting the ... backend" (imports,
    for log in sorted((out / "_logs").glob("*.err")):  # input check, model set-up: what a worker pays once)
        text = log.read_text()
        start = re.search(r"^=== start .* at \d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d)$", text, re.M)
        ready = re.search(r"^(\d\d):(\d\d):(\d\d) INFO engine\.\w+: starting the \w+ backend", text, re.M)
        if start and ready:
            a, b = (int(h) * 3600 + int(m) * 60 + int(x) for h, m, x in (start.groups(), ready.groups()))
            startups.append(float((b - a) % 86400))
    return {"mode": mode, "makespan_s": round(done_at, 1), "job_end_s": round(job_end, 1),
            "preempted_at_s": round(preempted_at, 1) if preempted_at else None, "exactly_once": exactly_once,
            "rows": len(ids), "startup_s": round(statistics.median(startups), 1) if startups else None, "job": job}


def measure(args) -> dict:
    from conftest import make_tiny_model
    from slurm_cluster import SlurmCluster, ensure_slurm

    reason = ensure_slurm()
    if reason:
        raise SystemExit(f"no Slurm here: {reason}")
    root = Path(tempfile.mkdtemp(prefix="engine-scaleout-"))
    root.chmod(0o755)
    model = make_tiny_model(root / "model")
    cluster = SlurmCluster(root / "cluster").start()
    try:
        rows = {m: measure_mode(cluster, root, model, m, args) for m in ("static", "units")}
    finally:
        cluster.stop()
    work_s = args.docs * args.delay_ms / 1000  # every request sleeps delay_ms at 1x
    speeds = 3 + 1 / 4.0
    startup = statistics.median([r["startup_s"] for r in rows.values() if r["startup_s"]] or [0.0])
    ideal = startup + work_s / speeds
    for r in rows.values():
        r["ideal_s"] = round(ideal, 1)
        r["makespan_over_ideal"] = round(r["makespan_s"] / ideal, 2)
    return {"work_s_at_1x": work_s, "task_speeds": "3 x 1, 1 x 1/4 (task 0), task 1 requeued at 1/4 of the rows",
            "ideal_s": round(ideal, 1), "startup_s": startup, "modes": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=12800)
    ap.add_argument("--delay-ms", type=float, default=25.0, help="the instant backend's time per request at 1x")
    ap.add_argument("--unit-rows", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--simulate-only", action="store_true")
    ap.add_argument("--out", default="runs/out/bench/scaleout")
    args = ap.parse_args(argv)
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "simulation": simulate()}
    if not args.simulate_only:
        result["measured"] = measure(args)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = ["## Simulated (a model, not a measurement): 100 GPUs, units of ~30 GPU-minutes, 20 seeds",
             "", "| situation | static shards (mean / worst) | units claimed by lease (mean / worst) |",
             "|---|---|---|"]
    lines += [f"| {r['situation']} | {r['static_mean']} / {r['static_worst']} | {r['units_mean']} / "
              f"{r['units_worst']} |" for r in result["simulation"]]
    if "measured" in result:
        m = result["measured"]
        lines += ["", f"## Measured on a local Slurm cluster: 4 tasks, {args.docs:,} rows, {args.delay_ms:g} ms a "
                      f"request at 1x (work {m['work_s_at_1x']:.0f} task-seconds); task 0 at 1/4 speed, task 1 "
                      f"requeued at 1/4 of the rows; ideal {m['ideal_s']} s (start-up {m['startup_s']} s + work / "
                      f"3.25)", "", "| mode | makespan (s) | makespan / ideal | job end (s) | rows exactly once |",
                  "|---|---:|---:|---:|---|"]
        for r in m["modes"].values():
            lines.append(f"| {r['mode']} | {r['makespan_s']} | {r['makespan_over_ideal']} | {r['job_end_s']} | "
                         f"{'yes' if r['exactly_once'] else 'NO'} ({r['rows']:,}) |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
