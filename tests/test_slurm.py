"""`engine launch slurm` on a real single-node Slurm cluster (tests/slurm_cluster.py): a job array to
completion, and every way Slurm interrupts a task (scancel -b with and without a pending sibling,
scontrol requeue, scancel -f, preemption by a higher-priority partition): each ends requeued and
complete, every attempt's log kept with no traceback, every row exactly once. Waits poll squeue, the
job-completion log, state files and log lines under deadlines; nothing sleeps for a fixed time."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
from conftest import engine_cli, sample_docs, wait_for, write_config, write_jsonl
from slurm_cluster import SlurmCluster, ensure_slurm
from test_recovery import check_exactly_once

from engine.errors import RESUMABLE

PROMPTS = ("faq",)


@pytest.fixture(scope="module")
def slurm():
    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="engine-slurm-"))  # under /tmp: munged needs a world-traversable path
    root.chmod(0o755)
    cluster = SlurmCluster(root / "cluster")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def submit(slurm, tmp_path, tiny_model, n_docs: int, shards: int, delay_ms: float, *extra: str):
    """`engine launch slurm --submit` of an instant-backend run on the test cluster: (job id, output dir,
    config, ids)."""
    os.chmod(tmp_path, 0o755)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(n_docs))],
                       out, prompts=PROMPTS, instant={"delay_ms": delay_ms, "completion_tokens": 8},
                       output={"flush_seconds": 0.2})
    p = engine_cli("launch", "slurm", str(cfg), "--shards", str(shards), "--gpus-per-shard", "0",
                   "--cpus-per-shard", "1", "--time", "30", "--signal-seconds", "60", "--submit", *extra,
                   env=slurm.env, check=True)
    found = re.findall(r"^job_id=(\d+)$", p.stdout, re.M)
    assert len(found) == 1, p.stdout
    return found[0], out, cfg, {d["id"] for d in sample_docs(n_docs)}


def task_log(out: Path, job: str, shard: int, ext: str = "err") -> str:
    path = out / "_logs" / f"{job}_{shard}.{ext}"
    return path.read_text() if path.exists() else ""


def generating(out: Path, shard: int, shards: int) -> bool:
    """The shard's state file counts stored rows: the run is past start-up, with work in flight."""
    path = out / "_state" / f"s{shard:05d}-of-{shards:05d}.json"
    try:
        st = orjson.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return not st.get("complete") and sum(c["done"] for c in st["prompts"].values()) > 0


def wait_running_and_generating(slurm, job: str, out: Path, shard: int, shards: int) -> str:
    task = f"{job}_{shard}"
    with diagnosed(slurm, job, out):
        wait_for(lambda: slurm.squeue(job).get(task) == "RUNNING" and generating(out, shard, shards),
                 f"task {task} running and generating", 300)
    return task


def wait_job_gone(slurm, job: str, out: Path, timeout: float = 400) -> None:
    with diagnosed(slurm, job, out):
        wait_for(lambda: not slurm.squeue(job), f"every task of job {job} to end", timeout)


@contextmanager
def diagnosed(slurm, job: str, out: Path):
    """A failed wait says what Slurm and the task logs said."""
    try:
        yield
    except AssertionError as exc:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((out / "_logs").glob("*")))
        jobs = slurm.cmd("squeue", "-h", "-r", "-o", "%i %T %r", check=False).stdout
        raise AssertionError(f"{exc}\nsqueue: {jobs}\n{logs}\n{slurm.logs()}") from None


def check_attempts(slurm, out: Path, job: str, shard: int, interrupted: int, what: str = "shard") -> list[dict]:
    """The task was interrupted `interrupted` times (at least), was requeued after each and ended COMPLETED;
    each attempt appended its own start and end lines to both logs; no traceback anywhere."""
    runs = [a for a in slurm.attempts(job) if a.get("ArrayTaskId") == str(shard)]
    assert runs, f"no attempt of task {job}_{shard} in the job-completion log"
    assert runs[-1]["JobState"] == "COMPLETED" and runs[-1]["ExitCode"] == "0:0", runs[-1]
    assert len(runs) >= interrupted + 1, runs
    assert all(r["JobState"] in ("PENDING", "REQUEUED", "PREEMPTED") for r in runs[:-1]), runs  # requeued each time
    sacct = slurm.sacct()
    for r in runs:  # what `sacct -c` says of each attempt
        assert (r["JobId"], r["JobState"], r["ExitCode"]) in sacct, (r, sacct)
    for ext in ("err", "out"):
        text = task_log(out, job, shard, ext)
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
        starts = re.findall(rf"^=== start {what} .*SLURM_RESTART_COUNT=(\d+)", text, re.M)
        ends = re.findall(rf"^=== end {what} .*SLURM_RESTART_COUNT=(\d+).*: exit (\d+)(.*)$", text, re.M)
        assert len(starts) == len(ends) == len(runs), (ext, starts, ends, runs)
        assert [int(s) for s in starts] == list(range(len(runs))), starts  # every attempt's lines kept
        assert ends[-1][1] == "0", ends
        for _, code, how in ends[:-1]:
            assert int(code) in RESUMABLE and "requeued" in how and "failed" not in how, ends
    return runs


def check_complete(out: Path, ids: set[str]) -> None:
    check_exactly_once(out, ids, PROMPTS)
    st = engine_cli("status", str(out), "--check")
    assert st.returncode == 0, st.stdout + st.stderr


def array_of_four(slurm, tmp_path, tiny_model) -> dict:
    job, out, cfg, ids = submit(slurm, tmp_path, tiny_model, 80, 4, 5.0)
    wait_job_gone(slurm, job, out)
    return {"job": job, "out": out, "cfg": cfg, "ids": ids}


def scancel_batch(slurm, tmp_path, tiny_model) -> dict:
    # 400 documents: the run must still be generating after `engine status` below (seconds on a loaded machine)
    job, out, _, ids = submit(slurm, tmp_path, tiny_model, 400, 1, 60.0)
    task = wait_running_and_generating(slurm, job, out, 0, 1)
    seen = {"running": engine_cli("status", str(out)).stdout}  # while squeue says RUNNING
    slurm.cmd("scancel", "-b", "-s", "TERM", task)
    wait_for(lambda: "=== end" in task_log(out, job, 0), "the first attempt's end line", 120)
    with diagnosed(slurm, job, out):
        wait_for(lambda: slurm.squeue(job).get(task) == "PENDING", f"task {task} requeued (PENDING)", 120)
    slurm.cmd("scontrol", "hold", task)  # keep it PENDING while `engine status` is compared with squeue
    try:
        seen["requeued"] = engine_cli("status", str(out)).stdout
    finally:
        slurm.cmd("scontrol", "release", task)
    wait_job_gone(slurm, job, out)
    return {"job": job, "out": out, "ids": ids, "task": task, "status": seen}


def scancel_batch_sibling_pending(slurm, tmp_path, tiny_model) -> dict:
    # --max-concurrent 1: task 1 waits (JobArrayTaskLimit) while task 0 runs, the normal array case, in
    # which Slurm 22.05 may answer scancel "try again later" and signal the shell again seconds later.
    job, out, _, ids = submit(slurm, tmp_path, tiny_model, 100, 2, 60.0, "--max-concurrent", "1")
    task = wait_running_and_generating(slurm, job, out, 0, 2)
    sibling = slurm.squeue(job).get(f"{job}_1")
    scancel = subprocess.Popen(["scancel", "-b", "-s", "TERM", task], env=slurm.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # it may retry, signalling again: let it
    try:
        wait_job_gone(slurm, job, out)
    finally:
        if scancel.poll() is None:
            scancel.kill()
        scancel.communicate()
    return {"job": job, "out": out, "ids": ids, "sibling": sibling}


def slurm_signals(*command: str):
    def scenario(slurm, tmp_path, tiny_model) -> dict:
        job, out, _, ids = submit(slurm, tmp_path, tiny_model, 100, 1, 60.0)
        task = wait_running_and_generating(slurm, job, out, 0, 1)
        slurm.cmd(*command, task)
        wait_job_gone(slurm, job, out)
        return {"job": job, "out": out, "ids": ids}
    return scenario


def time_limit(slurm, tmp_path, tiny_model) -> dict:
    # --time 2 with --signal-seconds 30: Slurm sends B:TERM about 90 s in (its time-limit check runs every
    # ~30 s, so up to that much earlier); 2,400 documents at 60 ms take 144 s, longer than the limit itself,
    # so the first attempt is always stopped by it. Each attempt commits, exits 3 and is requeued.
    job, out, _, ids = submit(slurm, tmp_path, tiny_model, 2400, 1, 60.0, "--time", "2", "--signal-seconds", "30")
    wait_running_and_generating(slurm, job, out, 0, 1)
    wait_job_gone(slurm, job, out, timeout=840)
    return {"job": job, "out": out, "ids": ids}


def workers_with_a_requeue(slurm, tmp_path, tiny_model) -> dict:
    """`engine launch slurm --workers 3`: an array of workers claiming 24 units; one worker is requeued
    (`scontrol requeue`) while it holds a unit and units are still free: it commits what it finished, exits 3,
    is requeued and joins the run again; the run completes exactly once."""
    os.chmod(tmp_path, 0o755)
    out = tmp_path / "out"
    n = 600
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(n))],
                       out, prompts=PROMPTS, instant={"delay_ms": 60.0, "completion_tokens": 8},
                       input={"unit_rows": 25},
                       output={"flush_seconds": 0.2, "lease_heartbeat_seconds": 0.5, "lease_timeout_seconds": 5.0})
    p = engine_cli("launch", "slurm", str(cfg), "--workers", "3", "--gpus-per-shard", "0", "--cpus-per-shard", "1",
                   "--time", "30", "--signal-seconds", "60", "--submit", env=slurm.env, check=True)
    job = re.findall(r"^job_id=(\d+)$", p.stdout, re.M)[0]

    def holder():  # a RUNNING worker that holds a unit, while at least 6 units are still free
        committed = len(list((out / "_state").glob("u*.json"))) if (out / "_state").is_dir() else 0
        if committed > 24 - 6:
            raise AssertionError(f"the run got too far ({committed} units committed) before a worker held a unit")
        for task, state in slurm.squeue(job).items():
            if state == "RUNNING" and re.search(r"unit u\d+-of-00024 .*claimed", task_log(out, job,
                                                                                        int(task.split("_")[1]))):
                return task
        return None
    with diagnosed(slurm, job, out):
        task = wait_for(holder, "a worker holding a unit", 300)
    slurm.cmd("scontrol", "requeue", task)
    wait_job_gone(slurm, job, out)
    return {"job": job, "out": out, "ids": {d["id"] for d in sample_docs(n)}, "task": task, "cfg": cfg}


SCENARIOS = {"workers": workers_with_a_requeue,
             "array": array_of_four, "time_limit": time_limit, "scancel_b": scancel_batch,
             "scancel_b_sibling": scancel_batch_sibling_pending,
             "requeue": slurm_signals("scontrol", "requeue"),  # slurmstepd signals every process of the job
             "scancel_f": slurm_signals("scancel", "-f", "-s", "TERM")}  # the shell and the engine both get SIGTERM


@pytest.fixture(scope="module")
def scenarios(slurm, tmp_path_factory, tiny_model) -> dict:
    """Every scenario but preemption at once, each on its own thread with its own output (the cluster has
    room for all; their waits for Slurm overlap): name -> its result, or the exception it ended with."""
    results: dict = {}

    def run(name, fn):
        try:
            results[name] = fn(slurm, tmp_path_factory.mktemp(f"slurm-{name}"), tiny_model)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the scenario's own test
            results[name] = exc

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in SCENARIOS.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    return results


def result(scenarios: dict, name: str) -> dict:
    r = scenarios.get(name)
    if r is None:
        raise AssertionError(f"scenario {name} did not end")
    if isinstance(r, BaseException):
        raise r
    return r


def test_an_array_of_four_shards_completes_exactly_once(slurm, scenarios):
    r = result(scenarios, "array")
    for shard in range(4):
        runs = check_attempts(slurm, r["out"], r["job"], shard, interrupted=0)
        assert len(runs) == 1, runs  # each task ran once
    check_complete(r["out"], r["ids"])
    again = engine_cli("launch", "slurm", str(r["cfg"]), "--shards", "4", "--gpus-per-shard", "0", "--submit",
                       env=slurm.env, check=True)
    assert "nothing to launch" in again.stdout and "job_id=" not in again.stdout


def test_an_array_of_workers_with_a_requeue_completes_exactly_once(slurm, scenarios):
    r = result(scenarios, "workers")
    requeued = int(r["task"].split("_")[1])
    runs = check_attempts(slurm, r["out"], r["job"], requeued, interrupted=1, what="worker")
    assert "=== end worker" in task_log(r["out"], r["job"], requeued) and "exit 3 (resumable: requeued" in \
        task_log(r["out"], r["job"], requeued), runs
    for other in {0, 1, 2} - {requeued}:
        check_attempts(slurm, r["out"], r["job"], other, interrupted=0, what="worker")
    check_complete(r["out"], r["ids"])
    status = engine_cli("status", str(r["out"])).stdout
    assert "24/24 units committed" in status and "run COMPLETE" in status, status
    again = engine_cli("launch", "slurm", str(r["cfg"]), "--workers", "3", "--gpus-per-shard", "0", "--submit",
                       env=slurm.env, check=True)
    assert "nothing to launch" in again.stdout and "job_id=" not in again.stdout


def test_scancel_batch_term_without_a_pending_sibling(slurm, scenarios):
    r = result(scenarios, "scancel_b")
    task, seen = r["task"], r["status"]  # `engine status` agrees with squeue: RUNNING, then requeued
    assert re.search(rf"s00000-of-00001 .* running  \[Slurm task {task}, attempt 1\]", seen["running"]), seen
    assert re.search(rf"requeued \(exit 3, interrupted.*\[Slurm task {task}, attempt 1\]", seen["requeued"]), seen
    assert "1 stopped (1 requeued by Slurm)" in seen["requeued"], seen
    check_attempts(slurm, r["out"], r["job"], 0, interrupted=1)
    check_complete(r["out"], r["ids"])


def test_scancel_batch_term_with_a_sibling_pending(slurm, scenarios):
    r = result(scenarios, "scancel_b_sibling")
    assert r["sibling"] == "PENDING", r
    check_attempts(slurm, r["out"], r["job"], 0, interrupted=1)
    check_attempts(slurm, r["out"], r["job"], 1, interrupted=0)
    check_complete(r["out"], r["ids"])


def test_scontrol_requeue_of_a_running_task(slurm, scenarios):
    r = result(scenarios, "requeue")
    check_attempts(slurm, r["out"], r["job"], 0, interrupted=1)
    check_complete(r["out"], r["ids"])


def test_scancel_force_term_signals_every_process(slurm, scenarios):
    r = result(scenarios, "scancel_f")
    check_attempts(slurm, r["out"], r["job"], 0, interrupted=1)
    check_complete(r["out"], r["ids"])


def test_a_task_stopped_by_its_time_limit_is_requeued_and_completes(slurm, scenarios):
    r = result(scenarios, "time_limit")
    runs = check_attempts(slurm, r["out"], r["job"], 0, interrupted=1)
    assert "TIMEOUT" not in {a["JobState"] for a in runs}, runs  # signalled before the limit, never killed by it
    check_complete(r["out"], r["ids"])


def test_preemption_by_a_higher_priority_partition(slurm, tmp_path, tiny_model):
    job, out, _, ids = submit(slurm, tmp_path, tiny_model, 100, 1, 60.0)
    wait_running_and_generating(slurm, job, out, 0, 1)
    # Every CPU of the node for a job in `high`: the batch task is preempted (PreemptMode=REQUEUE).
    hi = slurm.cmd("sbatch", "--parsable", "-p", "high", "-c", str(slurm.cpus), "-o", "/dev/null",
                   "--wrap", "true").stdout.strip()
    wait_job_gone(slurm, hi, out)
    wait_job_gone(slurm, job, out)
    runs = check_attempts(slurm, out, job, 0, interrupted=1)
    assert runs[0]["JobState"] == "PREEMPTED", runs
    check_complete(out, ids)
