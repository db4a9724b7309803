"""Runs a sweep: the fixed sample, one process per config with a timeout, a resumable results file.

Results are appended to RESULTS/results.jsonl (one JSON object per finished config, flushed and
fsynced), so a killed sweep loses at most the config that was running; a rerun skips every config
whose key already has a result (`retry_failed` reruns the ones that did not end `ok`). A config that
runs out of memory, times out or crashes is recorded with its outcome and the sweep goes on.
"""
from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from engine.bench.sweep import BASELINE, BenchConfig, ModelEntry, Sweep
from engine.errors import SweepError
from engine.input.reader import Reader
from engine.signals import Interrupted, first_signal, signal_on_parent_death

OK, OOM, TIMEOUT, FAILURE, NOT_RUN = "ok", "oom", "timeout", "server_failure", "not_run"
POLL_S = 0.5  # how often a running config's wait looks at a stop request


def _check_stop() -> None:
    """The command line's SIGTERM/SIGINT handler (engine.signals) notes the signal before it raises
    Interrupted. The interpreter swallows an exception raised in some callbacks (`logging`'s at-fork
    hook while subprocess forks a config: "Exception ignored in ... _releaseLock"); the noted signal still
    stops the sweep: the running config's wait polls it, and no config starts once it is set."""
    if (name := first_signal()) is not None:
        raise Interrupted(name)
_OOM = re.compile(r"out of memory|OutOfMemoryError|cudaErrorMemoryAllocation|Not enough memory|"
                  r"CUBLAS_STATUS_ALLOC_FAILED|MemoryError", re.IGNORECASE)
MAX_FAILED_SHARE = 0.01  # more failed requests than this and the config counts as a server failure


@dataclass
class Sample:
    warmup: Path | None
    measure: Path


def prepare_sample(sweep: Sweep, say: Callable[[str], None]) -> Sample:
    """The first `warmup_docs + docs` usable documents of the inputs, written once and reused by every
    config and every rerun (so configs compare on identical work)."""
    d = sweep.data
    folder = sweep.results / "sample"
    spec = {"paths": d.paths, "docs": d.docs, "warmup_docs": d.warmup_docs, "text_column": d.text_column,
            "id_column": d.id_column}
    sample = Sample(folder / "warmup.parquet" if d.warmup_docs else None, folder / "measure.parquet")
    if (folder / "sample.json").exists() and orjson.loads((folder / "sample.json").read_bytes()) == spec:
        return sample
    reader = Reader(d.paths, d.text_column, d.id_column, 512, 5_000_000)
    reader.preflight()
    want = d.docs + d.warmup_docs
    docs = []
    for batch in reader.batches():
        docs += batch.docs
        if len(docs) >= want:
            break
    if len(docs) < want:
        raise SweepError(f"{sweep.path}: [data] paths hold {len(docs)} usable documents; the sweep needs "
                         f"{d.warmup_docs} warm-up + {d.docs} measured = {want}")
    folder.mkdir(parents=True, exist_ok=True)

    def write(rows, path: Path) -> None:
        pq.write_table(pa.table({"id": [x.id for x in rows], "text": [x.text for x in rows]}), path,
                       compression="zstd")

    if d.warmup_docs:
        write(docs[:d.warmup_docs], sample.warmup)
    write(docs[d.warmup_docs:want], sample.measure)
    (folder / "sample.json").write_bytes(orjson.dumps(spec))
    say(f"sample: {d.docs} documents measured + {d.warmup_docs} warm-up, from {', '.join(d.paths)}")
    return sample


class ResultStore:
    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists():
            for i, line in enumerate(path.read_bytes().splitlines()):
                if not line.strip():
                    continue
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:  # a line cut by a crash while appending: that config reruns
                    print(f"warning: {path}:{i + 1}: unreadable line ignored", file=sys.stderr)
                    continue
                self.records[rec["key"]] = rec

    def append(self, rec: dict) -> None:
        self.records[rec["key"]] = rec
        with open(self.path, "ab") as f:
            f.write(orjson.dumps(rec) + b"\n")
            f.flush()
            os.fsync(f.fileno())


def metrics(result: dict, gpu_hour_usd: float) -> dict:
    s = result["summary"]
    wall = max(s["wall_seconds"], 1e-9)
    gpus = max(int(result["gpus"]), 1)
    out_tps = s["output_tokens"] / wall
    per_gpu = out_tps / gpus
    gpu_hours = 1e9 / per_gpu / 3600 if per_gpu > 0 else None
    # useful: output tokens of rows that pass the quality gate (finished by the model, not empty, no loop)
    useful_gpu = s.get("useful_output_tokens", 0) / wall / gpus
    done = s["requests_generated"]  # one request per (document, prompt)
    docs = done / max(len(s.get("prompts") or [None]), 1)
    return {
        "output_tok_s_gpu": round(per_gpu, 1), "output_tok_s": round(out_tps, 1),
        "input_tok_s": round(s["input_tokens"] / wall, 1), "docs_s": round(docs / wall, 3),
        "gpu_hours_per_b": _sig(gpu_hours) if gpu_hours else None,
        "useful_tok_s_gpu": round(useful_gpu, 1),
        "useful_gpu_hours_per_b": _sig(1e9 / useful_gpu / 3600) if useful_gpu > 0 else None,
        "useful_share": round(s.get("useful_output_tokens", 0) / s["output_tokens"], 4) if s["output_tokens"] else 0.0,
        "repetition_stopped": s.get("repetition_stopped", 0), "output_truncated": s.get("output_truncated", 0),
        "cost_per_b_usd": _sig(gpu_hours * gpu_hour_usd) if gpu_hours else None,
        "prefix_cache_hit": s["prefix_cache_hit_rate"],
        "mean_output_tokens": round(s["output_tokens"] / done, 1) if done else 0.0,
        "docs": round(docs), "requests": done, "failed": s["failed"], "output_tokens": s["output_tokens"],
        "input_tokens": s["input_tokens"],
        "wall_s": s["wall_seconds"], "startup_s": result["startup_s"], "warmup_s": result["warmup_s"],
        "gpus": gpus, "device": result["device"],
    }


def _sig(x: float) -> float:
    return float(f"{x:.4g}")  # four significant digits: hours per billion tokens span 1e-6 to 1e4


def classify(rc: int | None, timed_out: bool, log_text: str) -> tuple[str, str]:
    """(outcome, error line) of a config whose worker did not write a result."""
    if timed_out:
        return TIMEOUT, "timed out"
    if _OOM.search(log_text):
        line = next((ln for ln in reversed(log_text.splitlines()) if _OOM.search(ln)), "out of memory")
        return OOM, line.strip()[:300]
    if rc == -signal.SIGKILL:
        return OOM, "killed by SIGKILL (the host's out-of-memory killer?)"
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    err = next((ln for ln in reversed(lines) if ln.startswith("error:") or "Error" in ln or "error" in ln),
               lines[-1] if lines else "")
    return FAILURE, f"exit status {rc}: {err}"[:300]


class Driver:
    def __init__(self, sweep: Sweep, retry_failed: bool = False, say: Callable[[str], None] = print):
        self.sweep, self.retry_failed, self.say = sweep, retry_failed, say
        self.dir = sweep.results
        self.store: ResultStore | None = None
        self.sample: Sample | None = None
        self.total = self.count = 0  # configs planned / started, for the progress lines

    # ---- the plan ------------------------------------------------------------------------------
    def check(self, models: list[ModelEntry]) -> int:
        """Validate every config that does not depend on results; returns their number."""
        n = 0
        for m in models:
            configs = [self.sweep.baseline(m)]
            for tier in self.sweep.tiers:
                configs += self.sweep.expand(m, tier, dict(m.set))  # the worst case: start from the baseline
            for c in configs:
                self.sweep.check(c)
            n += len(configs)
        return n

    def best(self, configs: list[BenchConfig]) -> BenchConfig | None:
        scored = [(self.store.records[c.key]["output_tok_s_gpu"], c) for c in configs
                  if c.key in self.store.records and self.store.records[c.key]["outcome"] == OK]
        return max(scored, key=lambda x: x[0])[1] if scored else None

    def configs_of(self, m: ModelEntry, execute: bool) -> list[tuple[BenchConfig, dict]]:
        """The model's configs in order with their records; tiers with `after` start from the best so far."""
        done: list[tuple[BenchConfig, dict]] = []
        by_tier: dict[str, list[BenchConfig]] = {BASELINE: []}
        order = [BASELINE]

        def visit(c: BenchConfig) -> None:
            by_tier.setdefault(c.tier, []).append(c)
            done.append((c, self.run_config(c) if execute else self.record_of(c)))

        visit(self.sweep.baseline(m))
        for tier in self.sweep.tiers:
            start = dict(m.set)
            if tier.after:
                upto = order[:order.index(tier.after) + 1]
                best = self.best([c for t in upto for c in by_tier.get(t, [])])
                if best is None:
                    self.say(f"{m.label} {tier.name}: nothing before it finished ok; starting from the baseline")
                else:
                    start = dict(best.settings)
            order.append(tier.name)
            for c in self.sweep.expand(m, tier, start):
                if any(c.key == d.key for d, _ in done):
                    continue  # the carried winner itself, already measured
                visit(c)
        return done

    def record_of(self, c: BenchConfig) -> dict:
        rec = self.store.records.get(c.key)
        return rec if rec is not None else self._record(c, {"outcome": NOT_RUN})

    # ---- running -------------------------------------------------------------------------------
    def run(self, models: list[ModelEntry], execute: bool = True) -> list[dict]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SweepError(f"another sweep is running in {self.dir}") from None
            self.store = ResultStore(self.dir / "results.jsonl")
            if execute:
                self.sample = prepare_sample(self.sweep, self.say)
            self.total, self.count = self.check(models), 0
            return [rec for m in models for _, rec in self.configs_of(m, execute)]

    def run_config(self, c: BenchConfig) -> dict:
        _check_stop()
        self.count += 1
        head = f"[{self.count}/{self.total}] {c.model.label} {c.tier} ({c.describe()})"
        rec = self.store.records.get(c.key)
        if rec is not None and (rec["outcome"] == OK or not self.retry_failed):
            self.say(f"{head}: done before, {_brief(rec)}")
            return rec
        self.sweep.check(c)
        work = self.dir / "configs" / c.key
        work.mkdir(parents=True, exist_ok=True)
        result_path, log_path = work / "result.json", work / "log.txt"
        result_path.unlink(missing_ok=True)
        run = self.sweep.run_data(c.settings, {"model.name": c.model.name, "input.paths": [str(self.sample.measure)],
                                               "output.dir": str(work / "out" / "measure")})
        spec = {"run": run, "base_dir": str(self.sweep.path.resolve().parent), "output_dir": str(work / "out"),
                "measure_path": str(self.sample.measure),
                "warmup_path": str(self.sample.warmup) if self.sample.warmup else None,
                "gpus": c.model.gpus, "keep_outputs": self.sweep.keep_outputs}
        (work / "spec.json").write_bytes(orjson.dumps(spec, option=orjson.OPT_INDENT_2))
        self.say(f"{head}: running (log {log_path})")
        t = time.monotonic()
        rc, timed_out = _run_process([sys.executable, "-m", "engine.bench.worker", str(work / "spec.json"),
                                      str(result_path)], log_path, self.sweep.timeout_s)
        if result_path.exists():
            result = orjson.loads(result_path.read_bytes())
            fields = {"outcome": OK, **metrics(result, self.sweep.gpu_hour_usd),
                      "params": result.get("params")}
            if fields["failed"] > MAX_FAILED_SHARE * max(fields["requests"], 1):
                fields["outcome"] = FAILURE
                fields["error"] = f"{fields['failed']} of {fields['requests']} requests failed"
        else:
            log_text = log_path.read_text(errors="replace")[-20000:]
            outcome, error = classify(rc, timed_out, log_text)
            fields = {"outcome": outcome, "error": error}
        fields["elapsed_s"] = round(time.monotonic() - t, 1)
        rec = self._record(c, fields)
        self.store.append(rec)
        self.say(f"{head}: {_brief(rec)}")
        return rec

    def _record(self, c: BenchConfig, fields: dict) -> dict:
        m = c.model
        return {"key": c.key, "sweep": self.sweep.name, "model": m.label, "model_name": m.name, "tier": c.tier,
                "settings": c.settings, "knobs": c.describe(), "params_b": m.params_b, "quality": m.quality,
                "reference": m.reference.get("default" if c.tier == BASELINE else c.tier),
                "gpu_hour_usd": self.sweep.gpu_hour_usd, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                **fields}


def _brief(rec: dict) -> str:
    if rec["outcome"] != OK:
        return f"{rec['outcome'].upper()} {rec.get('error', '')}"
    return (f"ok {rec['output_tok_s_gpu']:,.1f} output tok/s/GPU, {rec['docs_s']:.2f} docs/s, "
            f"cache hit {rec['prefix_cache_hit']:.0%}, mean output {rec['mean_output_tokens']:.0f} tokens")


def _run_process(cmd: list[str], log_path: Path, timeout_s: float) -> tuple[int | None, bool]:
    """Run `cmd` in its own process group (SGLang spawns children) with its output in `log_path`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                preexec_fn=signal_on_parent_death(signal.SIGKILL))  # noqa: PLW1509 - no threads here
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    return proc.wait(timeout=max(0.0, min(POLL_S, deadline - time.monotonic()))), False
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        _kill_group(proc)
                        return proc.returncode, True
                    _check_stop()
        except BaseException:  # the sweep itself is interrupted: take the config's processes down with it
            _kill_group(proc)
            raise


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the config's whole process group, then SIGKILL to whatever is left of it."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass

