"""One writer per (output, shard), through the CLI on real files: two runs started together, a second run
started while the first generates, kill -9 of the holder, a live lease of another host waited for and taken
over once it goes stale, two runs racing to take over one stale lease, and the same on the moto S3 server.
Each ends with every (document, prompt) stored exactly once, read from the Parquet files. The runs that hold or
race for a lease are processes of their own; a run started after them, and `engine status`, run in this process
(`engine_main`: its lease names this process, as another run's would)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from conftest import REPO, Watched, engine_main, sample_docs, stored_rows, wait_for, write_config, write_jsonl
from test_storage import BUCKET, cli, remote_ids, s3, slow_run  # noqa: F401 - s3 is the moto server fixture

TAG = "s00000-of-00001"


def paced(tmp_path: Path, model, n: int = 300, **output) -> tuple[Path, Path, set[str]]:
    """A run of `n` documents paced by the instant backend's latency (several seconds of generation)."""
    docs = sample_docs(n)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", model, [src], out, instant={"delay_ms": 20, "completion_tokens": 8},
                       output={"flush_seconds": 0.2, **output}, report={"enabled": False})
    return cfg, out, {d["id"] for d in docs}


def start(cfg: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg), *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def exactly_once(out: Path, ids: set[str], prompt: str = "faq") -> None:
    got = [i for f in sorted((out / prompt).glob("*.parquet")) for i in pq.read_table(f).column("id").to_pylist()]
    assert len(got) == len(set(got)), f"{len(got) - len(set(got))} duplicate rows"
    assert set(got) == ids, f"missing {len(ids - set(got))} rows"


def assert_refused(err: str) -> None:
    assert "is being written by another run" in err and "nothing was read or written" in err, err
    assert "host " in err and "pid " in err and "since " in err and "last heartbeat" in err, err


def foreign_lease(out: Path, host: str = "other-host.example", pid: int = 4242, gen: int = 0) -> Path:
    """A lease record as a run on another machine writes it (heartbeat now)."""
    path = out / "_lease" / f"{TAG}.{gen:06d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    put(path, {"host": host, "pid": pid, "since": now - 100, "heartbeat": now, "timeout": 60, "token": "foreign",
               "shard": TAG})
    return path


def put(path: Path, rec: dict) -> None:
    """Written whole or not at all, as the engine writes its own lease records."""
    tmp = path.with_name(path.name + ".tmp-test")
    tmp.write_bytes(orjson.dumps(rec))
    os.replace(tmp, path)


def test_two_runs_started_together_one_writes_the_other_exits_6(tmp_path, tiny_model):
    cfg, out, ids = paced(tmp_path, tiny_model)
    a = start(cfg)
    b = start(cfg)  # within milliseconds of the first
    results = [p.communicate(timeout=300) + (p.returncode,) for p in (a, b)]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 6], results
    loser = next(r for r in results if r[2] == 6)
    assert_refused(loser[1])
    exactly_once(out, ids)


def test_a_run_started_while_another_generates_refuses_and_touches_nothing(tmp_path, tiny_model):
    cfg, out, ids = paced(tmp_path, tiny_model, n=600)
    first = start(cfg)
    wait_for(lambda: stored_rows(out) > 0, "the first run generating", 300, first)
    second = engine_main("run", str(cfg))
    assert second.returncode == 6, second.stderr
    assert_refused(second.stderr)
    assert "resuming" not in second.stderr  # it never got as far as recovery
    assert first.wait(timeout=300) == 0, first.stderr.read()
    exactly_once(out, ids)
    status = engine_main("status", str(out), "--check")
    assert status.returncode == 0 and status.stdout.split("\n")[2].endswith("complete"), status.stdout


def test_kill_9_of_the_holder_then_the_next_run_takes_over_at_once(tmp_path, tiny_model):
    cfg, out, ids = paced(tmp_path, tiny_model, n=600)
    holder = start(cfg)
    wait_for(lambda: stored_rows(out) > 0, "the holder generating", 300, holder)
    holder.kill()
    holder.wait()
    assert list((out / "_lease").glob(f"{TAG}.*.json")), "kill -9 leaves the lease record behind"
    status = engine_main("status", str(out))
    assert "stopped (killed or crashed" in status.stdout and "running" not in status.stdout.split("\n")[2], \
        status.stdout
    t = time.monotonic()
    again = engine_main("run", str(cfg), check=True)
    assert "taking over the stale lease" in again.stderr and "is gone from this host" in again.stderr
    assert time.monotonic() - t < 120  # no waiting for a timeout on the same host
    exactly_once(out, ids)
    assert not list((out / "_lease").glob(f"{TAG}.*.json")), "released at exit"


@pytest.mark.parametrize("how", ["lease_wait_seconds", "requeued_slurm_task"])
def test_a_live_lease_of_another_host_is_waited_for_then_taken_over_when_stale(tmp_path, tiny_model, how):
    """Waited for as output.lease_wait_seconds says, or by default on a requeued Slurm attempt
    (SLURM_RESTART_COUNT > 0: timeout + 2 heartbeats)."""
    cfg, out, ids = paced(tmp_path, tiny_model, n=120)
    out.mkdir()
    foreign_lease(out)
    refused = engine_main("run", str(cfg), "--set", "output.lease_timeout_seconds=600")
    assert refused.returncode == 6 and "other-host.example" in refused.stderr and "pid 4242" in refused.stderr
    assert not (out / "_run").exists() and not (out / "faq").exists()  # nothing read or written
    # the other host keeps its heartbeat going until our run says it waits, then "dies"
    alive, stop = foreign_lease(out), threading.Event()

    def beat():
        while not stop.wait(0.3):
            put(alive, {**orjson.loads(alive.read_bytes()), "heartbeat": time.time()})
    threading.Thread(target=beat, daemon=True).start()
    timing = ["--set", "output.lease_timeout_seconds=3", "--set", "output.lease_heartbeat_seconds=1"]
    if how == "lease_wait_seconds":
        w = Watched(cfg, *timing, "--set", "output.lease_wait_seconds=300")
    else:
        w = Watched(cfg, *timing, env={"SLURM_RESTART_COUNT": "1"})
    try:
        assert w.wait_line("its lease is held (host other-host.example", 300)
    finally:
        stop.set()
    code, _, err = w.finish()
    assert code == 0, err
    assert "taking over the stale lease of host other-host.example" in err and "heartbeat is older" in err
    exactly_once(out, ids)


def test_two_runs_taking_over_one_stale_lease_at_once(tmp_path, tiny_model):
    cfg, out, ids = paced(tmp_path, tiny_model)
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    foreign_lease(out, host=socket.gethostname(), pid=dead.pid, gen=3)  # a crashed run of this host
    a, b = start(cfg), start(cfg)
    results = [p.communicate(timeout=300) + (p.returncode,) for p in (a, b)]
    assert sorted(r[2] for r in results) == [0, 6], results
    assert_refused(next(r for r in results if r[2] == 6)[1])
    exactly_once(out, ids)


def test_store_output_one_writer_and_a_stale_lease_taken_over(tmp_path, tiny_model, s3):  # noqa: F811
    cfg, out, docs = slow_run(tmp_path, tiny_model, s3, "leased", n=300)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **s3.env}
    procs = [subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg), "--set",
                               f"output.staging_dir='{tmp_path / f'staging-{i}'}'"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert sorted(r[2] for r in results) == [0, 6], results
    assert_refused(next(r for r in results if r[2] == 6)[1])
    assert sorted(remote_ids(s3, f"{BUCKET}/leased")) == sorted(d["id"] for d in docs)
    assert not s3.fs.exists(f"{BUCKET}/leased/_lease/{TAG}.json"), "released at exit"
    # a lease object of a machine that vanished: refused while it is fresh, taken over once stale
    now = time.time()
    s3.fs.pipe(f"{BUCKET}/leased/_lease/{TAG}.json", orjson.dumps(
        {"host": "gone-node", "pid": 7, "since": now, "heartbeat": now, "token": "x", "shard": TAG}))
    held = cli(s3, "run", str(cfg), "--set", "output.lease_timeout_seconds=600")
    assert held.returncode == 6 and "gone-node" in held.stderr
    took = cli(s3, "run", str(cfg), "--set", "output.lease_timeout_seconds=2", "--set",
               "output.lease_heartbeat_seconds=1", "--set", "output.lease_wait_seconds=120", check=True)
    assert "taking over the stale lease of host gone-node" in took.stderr
    assert sorted(remote_ids(s3, f"{BUCKET}/leased")) == sorted(d["id"] for d in docs)
    status = cli(s3, "status", out)
    assert "running" not in status.stdout.split("\n")[2], status.stdout


def test_a_run_whose_lease_is_taken_over_stops_with_status_6(tmp_path, tiny_model):
    """The holder is frozen (SIGSTOP, as a hung NFS client would be) while a run on another host takes the lease
    over (the next generation's record); the holder, resumed, sees it at its next renewal and exits 6 at once,
    without committing anything more (what it journaled is the new holder's to recover)."""
    cfg, out, ids = paced(tmp_path, tiny_model, n=3000)
    holder = Watched(cfg, "--set", "output.lease_timeout_seconds=2", "--set", "output.lease_heartbeat_seconds=0.5")
    wait_for(lambda: stored_rows(out) > 0, "the holder generating", 300, holder.proc)
    os.killpg(holder.proc.pid, signal.SIGSTOP)
    try:
        (rec_path,) = list((out / "_lease").glob(f"{TAG}.*.json"))
        gen = int(rec_path.name.split(".")[1])
        foreign_lease(out, host="taker.example", gen=gen + 1)  # as a run on another host takes a stale lease
    finally:
        os.killpg(holder.proc.pid, signal.SIGCONT)
    code, _, err = holder.finish()
    assert code == 6, err
    assert "taken over by another run" in err
