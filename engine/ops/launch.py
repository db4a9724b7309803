"""`engine launch slurm|ray CONFIG --shards N`: spread one run config over a cluster, one shard per task.

Each task is the ordinary `engine run CONFIG --shard i/N` (its own journal, state file and parts in
the shared output.dir), so the exactly-once guarantee of a single run holds across the cluster:
a task that is preempted, killed or requeued resumes from its journal. Shards that are already
complete (their state file says so) are not launched again.

Slurm: `slurm_script` writes the job array's script (its task body forwards one SIGTERM, waits for the
engine's real status and requeues the task on every status in RESUMABLE; each attempt appends to its
logs between '=== start' and '=== end' lines); `launch_slurm` writes and submits it (`job_id=N`). Tested on a
real cluster: tests/test_slurm.py.

Checks (`_plan`, and for Slurm `check_time_limit`) run before anything is written or submitted, and a
`--dry-run` runs every one of them, then prints what would be submitted: the run config validates, its
backend is installed and its prompts load, output.dir can be written, an existing output was made with
this shard count (else every task would stop with status 2), and Slurm's --time parses and leaves time to
generate after --signal-seconds (a warning when it is shorter than an earlier run's measured start-up).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.config.run_config import DEFAULT_UNIT_ROWS, RunConfig, load_config
from engine.errors import RESUMABLE, ConfigError, ExitCode, ResumeError, ShardFailed, ShardInterrupted
from engine.output.layout import read_fingerprint, shard_tag
from engine.output.readiness import run_progress
from engine.output.record import load_summary, read_states
from engine.preflight import check_backend_installed, check_output, check_shard_count
from engine.render.prompts import load_prompts
from engine.signals import SIGNALS, Interrupted, signal_on_parent_death
from engine.stores import is_remote

log = logging.getLogger(__name__)


def pending_shards(output_dir: Path, shards: int) -> list[int]:
    """Shards of an N-way run whose state file does not say complete."""
    done = {s.shard for s in read_states(output_dir) if s.complete}
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


def engine_command(config: Path, shard: str | None, overrides: list[str]) -> list[str]:
    """`engine run CONFIG --shard i/N` (a static shard), or without --shard (`shard` None: a worker claiming units)."""
    cmd = [sys.executable, "-m", "engine.cli", "run", str(config), *(["--shard", shard] if shard else [])]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


CPUS_WITHOUT_GPU = 4  # default CPUs of a shard whose model runs on the CPU


def default_cpus(gpus: float) -> int:
    """CPUs per shard when --cpus-per-shard is not given. With GPUs, vLLM's sizing rule for GPU deployments
    (at least 2 + N physical cores for N GPUs: its engine core, one worker per GPU and the process that feeds
    them; x 2 for hyperthreaded vCPUs) plus 2 for the run's own producer (tokenisation) and writer threads:
    8 for one GPU, 10 for two. Without GPUs (the model runs on the CPU): 4; give it the cores it should use."""
    if gpus <= 0:
        return CPUS_WITHOUT_GPU
    return 2 * (2 + math.ceil(gpus)) + 2


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
                 overrides: list[str], workers: bool = False) -> str:
    """The job array's script: task i runs shard i/N, or (`workers`) worker i of N, which claims units."""
    array = _ranges(ids) + (f"%{opts.max_concurrent}" if opts.max_concurrent else "")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={opts.job_name}", f"#SBATCH --array={array}",
             f"#SBATCH --output={logs}/%A_%a.out", f"#SBATCH --error={logs}/%A_%a.err",
             f"#SBATCH --cpus-per-task={opts.cpus_per_shard}", f"#SBATCH --time={opts.time}",
             f"#SBATCH --signal=B:TERM@{opts.signal_seconds}", "#SBATCH --requeue", "#SBATCH --open-mode=append"]
    if opts.gpus_per_shard:
        lines.append(f"#SBATCH --gres=gpu:{opts.gpus_per_shard}")
    for key in ("partition", "account", "qos"):
        if getattr(opts, key):
            lines.append(f"#SBATCH --{key}={getattr(opts, key)}")
    lines += [f"#SBATCH {e}" for e in opts.extra]
    cmd = " ".join(shlex.quote(c) for c in engine_command(config, None if workers else "__SHARD__", overrides))
    cmd = cmd.replace("__SHARD__", f'"${{SLURM_ARRAY_TASK_ID}}/{shards}"')
    what = "worker" if workers else "shard"
    joins = " (it claims units until none is left; a requeued one joins again)" if workers else ""
    resumable = " ".join(str(int(c)) for c in RESUMABLE)
    lines += [
        "",
        f"# One {what} of the run{joins}; every attempt appends to the task's logs (--open-mode=append) between a",
        "# '=== start' and an '=== end' line. Slurm sends SIGTERM before the time limit (--signal B:TERM),",
        "# and to every process of the job on `scontrol requeue`, preemption or `scancel -f`: the first one",
        "# is passed on to the engine (a repeat is the same request), which commits what is finished and",
        f"# exits with a resumable status ({resumable}); the shell waits for that real status, however many",
        "# signals come, and then requeues the task, which resumes from its journal.",
        "set -u",
        f"cd {shlex.quote(str(Path.cwd()))}",
        'task="${SLURM_ARRAY_JOB_ID:-0}_${SLURM_ARRAY_TASK_ID:-0}"',
        f'attempt="{what} ${{SLURM_ARRAY_TASK_ID:-?}}/{shards}: job ${{SLURM_JOB_ID:-?}} (array task $task), '
        'SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}, host ${SLURMD_NODENAME:-$(hostname)}"',
        "note() { echo \"$1\"; echo \"$1\" >&2; }",
        "note \"=== start $attempt, at $(date '+%Y-%m-%d %H:%M:%S')\"",
        f"{cmd} &",
        "pid=$!",
        "signals=0",
        "forward() { signals=$((signals + 1)); if [ $signals -eq 1 ]; then kill -TERM $pid 2>/dev/null; fi; }",
        "trap forward TERM",
        "code=''",
        "while :; do  # a signal interrupts `wait` (status > 128) while the engine still runs: wait again",
        "  seen=$signals",
        "  wait $pid; c=$?",
        "  if [ $c -eq 127 ] && [ -n \"$code\" ]; then break; fi  # collected already: $code is the engine's",
        "  code=$c",
        "  if [ $signals -eq $seen ] || [ $c -le 128 ]; then break; fi",
        "done",
        "how=''",
        f'case " {resumable} " in *" $code "*)',
        "  for try in 1 2 3 4 5 6; do  # Slurm may answer 'try again later' while it is signalling the array",
        '    msg=$(scontrol requeue "$task" 2>&1) && { how="resumable: requeued"; break; }',
        '    state=$(scontrol show job "$task" 2>/dev/null | grep -o "JobState=[A-Z_]*")',
        '    case "$state $msg" in',
        '      *REQUEUE*|*PENDING*|*"pending execution"*) how="resumable: requeued by Slurm"; break;;',
        '      *"try again"*|" ") how="resumable: requeue failed: ${msg:-no answer}"; sleep 5;;  # busy: again',
        '      *) how="resumable: requeue failed: $msg"; break;;',
        "    esac",
        "  done;;",
        "esac",
        "note \"=== end $attempt, at $(date '+%Y-%m-%d %H:%M:%S'): exit $code${how:+ ($how)}\"",
        "exit $code",
    ]
    return "\n".join(lines) + "\n"


def _plan(config: Path, shards: int, overrides: list[str]) -> tuple[RunConfig, Path, list[int]]:
    """Every check a launch makes before it writes or submits anything (a ConfigError, status 2, on the first
    that fails); then the run's config, output directory and shards still to run (a message when none)."""
    if shards < 1:
        raise ConfigError(f"--shards {shards}: need at least 1")
    cfg = load_config(config, overrides)
    check_backend_installed(cfg.backend)  # the tasks run this same Python (engine_command: sys.executable)
    load_prompts(cfg.prompts, cfg.render.layout)
    check_output(cfg.output.dir)
    out = Path(cfg.output.dir)
    units = (read_fingerprint(out) or {}).get("units") if not is_remote(cfg.output.dir) else None
    if units:
        raise ConfigError(f"{out} is being made by workers claiming units of input.unit_rows = {units['rows']} rows: "
                          f"launch workers (--workers N), not static shards")
    check_shard_count(out, shards)
    ids = pending_shards(out, shards)
    if not ids:
        print(f"all {shards} shards of {out} are complete; nothing to launch")
    return cfg, out, ids


def _plan_workers(config: Path, workers: int, overrides: list[str]) -> tuple[RunConfig, Path, list[int], list[str]]:
    """The checks of a launch of `workers` workers claiming units (input.unit_rows; DEFAULT_UNIT_ROWS when the
    config has none: it is passed to every task); then the config, output, task ids and the tasks' overrides."""
    if workers < 1:
        raise ConfigError(f"--workers {workers}: need at least 1")
    cfg = load_config(config, overrides)
    if cfg.input.unit_rows == 0:
        overrides = [*overrides, f"input.unit_rows={DEFAULT_UNIT_ROWS}"]
        cfg = load_config(config, overrides)
        log.info("input.unit_rows is not set: the workers claim units of %d rows (pass --set input.unit_rows=N to "
                 "choose)", DEFAULT_UNIT_ROWS)
    check_backend_installed(cfg.backend)
    load_prompts(cfg.prompts, cfg.render.layout)
    check_output(cfg.output.dir)
    out = Path(cfg.output.dir)
    fp = read_fingerprint(out) if not is_remote(cfg.output.dir) else None  # a store's: each worker checks it
    if fp is not None and not fp.get("units") and fp.get("prompts"):
        raise ConfigError(f"{out} was made by static shards (shard count {fp.get('shard_count', 1)}): launch them "
                          f"with --shards {fp.get('shard_count', 1)}, or write the workers' run to another output.dir")
    if fp is not None and fp.get("units") and fp["units"]["rows"] != cfg.input.unit_rows:
        raise ConfigError(f"{out} was made with input.unit_rows = {fp['units']['rows']}, not {cfg.input.unit_rows}: "
                          f"launch with --set input.unit_rows={fp['units']['rows']}")
    if fp is not None and fp.get("units") and run_progress(out, fp).is_complete:
        print(f"all {fp['units']['count']} units of {out} are complete; nothing to launch")
        return cfg, out, [], overrides
    return cfg, out, list(range(workers)), overrides


def launch_slurm(config: Path, shards: int, opts: SlurmOptions, overrides: list[str], submit: bool,
                 dry_run: bool, workers: bool = False) -> int:
    """Submit N static shards, or (`workers`) N workers claiming units; `shards` is N either way."""
    if workers:
        _, out, ids, overrides = _plan_workers(config, shards, overrides)
    else:
        _, out, ids = _plan(config, shards, overrides)
    check_time_limit(out, opts)
    if not ids:
        return ExitCode.OK
    logs = out / "_logs"
    script = slurm_script(config.resolve(), shards, ids, logs, opts, overrides, workers)
    what = "workers" if workers else "shards"
    if dry_run:
        print(script, end="")
        log.info("dry run: every check passed; %d of %d %s would run (%d GPU, %d CPU each); nothing was "
                 "written or submitted (without --dry-run the script goes to %s, and --submit runs sbatch on it)",
                 len(ids), shards, what, opts.gpus_per_shard, opts.cpus_per_shard, out / "_run")
        return ExitCode.OK
    logs.mkdir(parents=True, exist_ok=True)
    path = out / "_run" / f"slurm-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"{len(ids)} of {shards} {what} to run; script: {path}")
    if submit:
        proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"error: sbatch {path} failed (status {proc.returncode}): {proc.stderr.strip()}", file=sys.stderr)
            return ExitCode.ERROR
        job_id = proc.stdout.strip().split(";")[0]  # --parsable: "JOBID" or "JOBID;CLUSTER"
        print(f"job_id={job_id}")  # machine-readable: the array's job id (tasks are {job_id}_<shard>)
        print(f"submitted: squeue -r -j {job_id}; logs {logs}/{job_id}_<{what[:-1]}>.out|.err; engine status {out}")
        return ExitCode.OK
    print(f"submit with: sbatch {path}")
    return ExitCode.OK


def slurm_seconds(limit: str) -> float | None:
    """Slurm's --time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds; None: no limit."""
    text = limit.strip().lower()
    if text in ("", "infinite", "unlimited", "-1"):
        return None
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", text):
        raise ConfigError(f"--time {limit!r}: not a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]])")
    days, _, rest = text.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    d = int(days) if days else 0
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, sec = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, sec = 0, parts[0], parts[1]
    else:
        h, m, sec = parts[:3]
    return float(((d * 24 + h) * 60 + m) * 60 + sec)


EARLY_SIGNAL_S = 60  # Slurm checks time limits about once a minute: --signal may come up to this much early


def measured_startup(out: Path) -> float | None:
    """The longest start-up an earlier run of this output measured (`process_startup_s`, from its
    process's start, else `startup_s`, in its state files and summaries); None when no run left one."""
    found = [st.rates.process_startup_s or st.rates.startup_s for st in read_states(out)]
    for path in out.glob("summary*.json"):
        try:
            s = load_summary(path)
        except (OSError, ResumeError):
            continue
        found.append(s.process.process_startup_s or s.process.startup_s)
    found = [float(x) for x in found if x]
    return max(found) if found else None


def check_time_limit(out: Path, opts: SlurmOptions) -> None:
    """--time must parse and leave time to generate after --signal-seconds (and the minute by which Slurm may
    signal early): else every attempt is stopped before it starts and requeued for ever (ConfigError). Shorter
    than the start-up an earlier run of `out` measured: a warning (that start-up may have been a first one)."""
    limit = slurm_seconds(opts.time)
    if opts.signal_seconds < 0:
        raise ConfigError(f"--signal-seconds {opts.signal_seconds}: need 0 or more")
    if limit is None:
        return
    usable = limit - opts.signal_seconds - EARLY_SIGNAL_S
    startup = measured_startup(out)
    if usable <= 0:
        raise ConfigError(f"--time {opts.time} minus --signal-seconds {opts.signal_seconds} (and up to "
                          f"{EARLY_SIGNAL_S} s Slurm may signal early) leaves no time to generate: every attempt "
                          "would be stopped before it starts and requeued for ever; raise --time (or lower "
                          "--signal-seconds)")
    if startup is not None and usable < startup:
        log.warning("--time %s minus --signal-seconds %d (and up to %d s Slurm may signal early) leaves %.0f s, less "
                    "than the %.0f s start-up an earlier run of %s measured: the tasks would be requeued forever "
                    "without progress; raise --time", opts.time, opts.signal_seconds, EARLY_SIGNAL_S, usable,
                    startup, out)


def _run_shard(config: str, shard: int, shards: int, overrides: list[str], cwd: str, log_dir: str,
               worker: bool = False) -> int:
    """Body of one Ray task: `engine run ... --shard i/N` (or, `worker`, `engine run ...`: a worker claiming units)
    as a child process, its output in a log file."""
    what = "worker" if worker else "shard"
    log_path = Path(log_dir) / f"{what}-{shard:05d}.log"
    with open(log_path, "a") as fh:
        fh.write(f"--- attempt at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        code = subprocess.run(engine_command(Path(config), None if worker else f"{shard}/{shards}", overrides), cwd=cwd,
                              stdout=fh, stderr=subprocess.STDOUT,
                              preexec_fn=signal_on_parent_death(signal.SIGTERM)).returncode  # noqa: PLW1509
    if code == 0:
        return shard
    if code in RESUMABLE or code < 0:
        raise ShardInterrupted(f"{what} {shard}/{shards} stopped with status {code}; see {log_path}")
    raise ShardFailed(f"{what} {shard}/{shards} failed with status {code}; see {log_path}")


def launch_ray(config: Path, shards: int, address: str | None, gpus_per_shard: float | None,
               cpus_per_shard: float | None, max_retries: int, overrides: list[str], dry_run: bool = False,
               workers: bool = False) -> int:
    """`cpus_per_shard` None: default_cpus(GPUs per shard), at most the CPUs of the cluster's largest node.
    `workers`: N workers claiming units instead of N static shards (each task one worker)."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("engine launch ray needs Ray, which is not installed in this Python: pip install ray")
    if gpus_per_shard is not None and gpus_per_shard < 0 or cpus_per_shard is not None and cpus_per_shard <= 0:
        raise ConfigError("--gpus-per-shard must be 0 or more and --cpus-per-shard more than 0")
    if workers:
        _, out, ids, overrides = _plan_workers(config, shards, overrides)
    else:
        _, out, ids = _plan(config, shards, overrides)
    if not ids:
        return ExitCode.OK
    what = "workers" if workers else "shards"
    logs = out / "_logs"
    if dry_run:
        gpus = f"{gpus_per_shard:g} GPU" if gpus_per_shard is not None else \
            "1 GPU where the cluster has GPUs, else 0 (decided at launch)"
        cpus = f"{cpus_per_shard:g}" if cpus_per_shard is not None else \
            f"{default_cpus(gpus_per_shard if gpus_per_shard is not None else 1)} (at most a node's CPUs)"
        print(f"dry run: every check passed; nothing was started. Would run {len(ids)} of {shards} {what} on Ray "
              f"({f'address {address}' if address else 'a local Ray'}; {gpus} and {cpus} CPU each; an interrupted "
              f"shard retried up to {max_retries} times), logs in {logs}:")
        for i in ids:
            cmd = engine_command(config.resolve(), None if workers else f"{i}/{shards}", overrides)
            print("  " + " ".join(shlex.quote(c) for c in cmd))
        return ExitCode.OK
    import ray

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
        if cpus_per_shard is None:  # a task asking more CPUs than any node has would never be scheduled
            node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
            cpus_per_shard = float(min(default_cpus(gpus_per_shard), max(node_cpus, 1)))
        task = ray.remote(_run_shard).options(num_gpus=gpus_per_shard, num_cpus=cpus_per_shard,
                                              max_retries=max_retries, retry_exceptions=[ShardInterrupted])
        refs = {task.remote(str(config.resolve()), i, shards, overrides, str(Path.cwd()), str(logs), workers): i
                for i in ids}
        print(f"running {len(ids)} of {shards} {what} on Ray ({gpus_per_shard:g} GPU, {cpus_per_shard:g} CPU each); "
              f"logs in {logs}", flush=True)
        failed = []
        pending = list(refs)
        try:
            _wait_all(refs, pending, failed, shards, received, what[:-1])
        except BaseException:  # SIGTERM / Ctrl-C (signals.Interrupted): stop every shard (each commits, exits 3)
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        if failed:
            print(f"{len(failed)} {what[:-1]}(s) failed: {failed}; fix the cause and launch again (complete work is "
                  "skipped, the rest resumes)", file=sys.stderr)
            return ExitCode.ERROR
        print(f"all {shards} {what} complete: {out}" if not workers else f"all {shards} workers ended: {out} "
              f"(engine status {out})")
        return 0
    finally:
        ray.shutdown()


def _wait_all(refs: dict, pending: list, failed: list, shards: int, received: list[str], what: str = "shard") -> None:
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
                print(f"{what} {i}/{shards} complete ({len(refs) - len(pending) - len(failed)} done)", flush=True)
            except Exception as exc:  # noqa: BLE001 - reported per shard, the others go on
                failed.append(i)
                print(f"{what} {i}/{shards} FAILED: {exc}", file=sys.stderr, flush=True)
