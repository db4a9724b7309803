"""`engine launch slurm|ray CONFIG --shards N`: spread one run config over a cluster, one shard per task.

Each task is the ordinary `engine run CONFIG --shard i/N` (its own journal, state file and parts in
the shared output.dir), so the exactly-once guarantee of a single run holds across the cluster:
a task that is preempted, killed or requeued resumes from its journal. Shards that are already
complete (their state file says so) are not launched again.
"""
from __future__ import annotations

import logging
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.config.run_config import load_config
from engine.errors import RESUMABLE, ExitCode, ShardFailed, ShardInterrupted
from engine.output.layout import read_states, shard_tag
from engine.signals import SIGNALS, Interrupted, signal_on_parent_death

log = logging.getLogger(__name__)


def pending_shards(output_dir: Path, shards: int) -> list[int]:
    """Shards of an N-way run whose state file does not say complete."""
    done = {s["shard"] for s in read_states(output_dir) if s.get("complete")}
    return [i for i in range(shards) if shard_tag(i, shards) not in done]


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (Slurm's array syntax)."""
    out, start = [], None
    for a, b in zip(ids, ids[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = None
    return ",".join(out)


def engine_command(config: Path, shard: str, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "engine.cli", "run", str(config), "--shard", shard]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


@dataclass
class SlurmOptions:
    gpus_per_shard: int = 1
    cpus_per_shard: int = 8
    max_concurrent: int = 0  # 0: no limit
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "24:00:00"
    signal_seconds: int = 300  # SIGTERM this long before the time limit: flush, exit 3, requeue
    job_name: str = "engine"
    extra: tuple[str, ...] = ()  # more "#SBATCH" lines, e.g. "--mem=64G"


def slurm_script(config: Path, shards: int, ids: list[int], logs: Path, opts: SlurmOptions,
                 overrides: list[str]) -> str:
    array = _ranges(ids) + (f"%{opts.max_concurrent}" if opts.max_concurrent else "")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={opts.job_name}", f"#SBATCH --array={array}",
             f"#SBATCH --output={logs}/%A_%a.out", f"#SBATCH --error={logs}/%A_%a.err",
             f"#SBATCH --cpus-per-task={opts.cpus_per_shard}", f"#SBATCH --time={opts.time}",
             f"#SBATCH --signal=B:TERM@{opts.signal_seconds}", "#SBATCH --requeue"]
    if opts.gpus_per_shard:
        lines.append(f"#SBATCH --gres=gpu:{opts.gpus_per_shard}")
    for key in ("partition", "account", "qos"):
        if getattr(opts, key):
            lines.append(f"#SBATCH --{key}={getattr(opts, key)}")
    lines += [f"#SBATCH {e}" for e in opts.extra]
    cmd = " ".join(shlex.quote(c) for c in engine_command(config, "__SHARD__", overrides))
    cmd = cmd.replace("__SHARD__", f'"${{SLURM_ARRAY_TASK_ID}}/{shards}"')
    lines += [
        "",
        "# One shard of the run. Slurm sends SIGTERM to this shell before the time limit (--signal B:TERM);",
        "# it is passed on to the engine, which commits what is finished and exits 3; the task then requeues",
        "# itself and resumes from its journal.",
        "set -u",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"{cmd} &",
        "pid=$!",
        "term=0",
        "trap 'term=1; kill -TERM $pid 2>/dev/null' TERM",
        "wait $pid; code=$?",
        "if [ $term -eq 1 ]; then wait $pid; code=$?; fi  # the trap interrupted the first wait",
        f"if [ $code -eq {RESUMABLE[0]} ] || [ $code -eq {RESUMABLE[1]} ]; then",
        '  echo "shard ${SLURM_ARRAY_TASK_ID}: exit $code, requeueing to resume" >&2',
        '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        "fi",
        "exit $code",
    ]
    return "\n".join(lines) + "\n"


def _plan(config: Path, shards: int, overrides: list[str]) -> tuple[Path, list[int]]:
    """The run's output directory and its shards still to run (a message when there are none)."""
    out = Path(load_config(config, overrides).output.dir)
    ids = pending_shards(out, shards)
    if not ids:
        print(f"all {shards} shards of {out} are complete; nothing to launch")
    return out, ids


def launch_slurm(config: Path, shards: int, opts: SlurmOptions, overrides: list[str], submit: bool,
                 dry_run: bool) -> int:
    out, ids = _plan(config, shards, overrides)
    if not ids:
        return 0
    logs = out / "_logs"
    script = slurm_script(config.resolve(), shards, ids, logs, opts, overrides)
    if dry_run:
        print(script, end="")
        return 0
    logs.mkdir(parents=True, exist_ok=True)
    path = out / "_run" / f"slurm-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"{len(ids)} of {shards} shards to run; script: {path}")
    if submit:
        proc = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
        print(proc.stdout.strip() or proc.stderr.strip())
        return proc.returncode
    print(f"submit with: sbatch {path}")
    return 0


def _run_shard(config: str, shard: int, shards: int, overrides: list[str], cwd: str, log_dir: str) -> int:
    """Body of one Ray task: `engine run ... --shard i/N` as a child process, its output in a log file."""
    log_path = Path(log_dir) / f"shard-{shard:05d}.log"
    with open(log_path, "a") as fh:
        fh.write(f"--- attempt at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        code = subprocess.run(engine_command(Path(config), f"{shard}/{shards}", overrides), cwd=cwd,
                              stdout=fh, stderr=subprocess.STDOUT,
                              preexec_fn=signal_on_parent_death(signal.SIGTERM)).returncode  # noqa: PLW1509
    if code == 0:
        return shard
    if code in RESUMABLE or code < 0:
        raise ShardInterrupted(f"shard {shard}/{shards} stopped with status {code}; see {log_path}")
    raise ShardFailed(f"shard {shard}/{shards} failed with status {code}; see {log_path}")


def launch_ray(config: Path, shards: int, address: str | None, gpus_per_shard: float | None,
               cpus_per_shard: float, max_retries: int, overrides: list[str]) -> int:
    import ray

    out, ids = _plan(config, shards, overrides)
    if not ids:
        return 0
    logs = out / "_logs"
    logs.mkdir(parents=True, exist_ok=True)
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    # ray.init installs its own SIGTERM handler (sys.exit), and an exception raised from a handler
    # inside Ray's Cython calls comes out as SystemError: note the signal here, act on it between waits.
    received: list[str] = []
    for s in SIGNALS:
        signal.signal(s, lambda signum, _f: received.append(signal.Signals(signum).name))
    try:
        if gpus_per_shard is None:  # one GPU per shard where the cluster has GPUs
            gpus_per_shard = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
        task = ray.remote(_run_shard).options(num_gpus=gpus_per_shard, num_cpus=cpus_per_shard,
                                              max_retries=max_retries, retry_exceptions=[ShardInterrupted])
        refs = {task.remote(str(config.resolve()), i, shards, overrides, str(Path.cwd()), str(logs)): i for i in ids}
        print(f"running {len(ids)} of {shards} shards on Ray ({gpus_per_shard:g} GPU, {cpus_per_shard:g} CPU each); "
              f"logs in {logs}", flush=True)
        failed = []
        pending = list(refs)
        try:
            _wait_all(refs, pending, failed, shards, received)
        except BaseException:  # SIGTERM / Ctrl-C (signals.Interrupted): stop every shard (each commits, exits 3)
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        if failed:
            print(f"{len(failed)} shard(s) failed: {failed}; fix the cause and launch again (complete shards are "
                  "skipped, failed ones resume)", file=sys.stderr)
            return ExitCode.ERROR
        print(f"all {shards} shards complete: {out}")
        return 0
    finally:
        ray.shutdown()


def _wait_all(refs: dict, pending: list, failed: list, shards: int, received: list[str]) -> None:
    """Wait for every shard, reporting each as it ends; `pending` shrinks in place (for a cancel)."""
    import ray

    while pending:
        if received:
            raise Interrupted(received[0])
        ready, rest = ray.wait(pending, num_returns=1, timeout=0.5)
        pending[:] = rest
        for ref in ready:
            i = refs[ref]
            try:
                ray.get(ref)
                print(f"shard {i}/{shards} complete ({len(refs) - len(pending) - len(failed)} done)", flush=True)
            except Exception as exc:  # noqa: BLE001 - reported per shard, the others go on
                failed.append(i)
                print(f"shard {i}/{shards} FAILED: {exc}", file=sys.stderr, flush=True)
