"""engine/output/lease.py and lease_store.py in-process: take, renew and release a shard's lease in a temporary
directory, a second taker refused while it lives (LeaseHeld, status 6), stale by heartbeat age, by a dead or
reused pid on this host, or when its record is unreadable; the takeover's next generation; a lease lost to
another holder, seen at renewal; waiting for a lease (on a fake clock); and StoreLease on an in-memory store,
best-effort and with S3's conditional writes (a fake S3 that answers 412 as S3 does).

tests/test_lease.py covers the same rules across processes, through the CLI. Here a stale record is written
with an old heartbeat rather than waited for; the heartbeat thread runs only where renewal itself is tested,
and that test waits on the lost-lease callback, not on a sleep."""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import types
from pathlib import Path

import fsspec
import orjson
import psutil
import pytest

from engine.config.run_config import OutputConfig
from engine.errors import ExitCode, LeaseHeld
from engine.output import lease as lease_mod
from engine.output.lease import FileLease, describe, lease_wait, read_lease, stale_reason
from engine.output.lease_store import StoreLease, take_lease

TAG = "s00000-of-00001"
HOST = socket.gethostname()
NO_PID = 4194305  # above Linux's PID_MAX_LIMIT (2**22): never a process
QUIET = 3600.0  # a heartbeat period that never elapses within a test


@pytest.fixture
def leases():
    """FileLease(out, ...) with defaults that keep the heartbeat thread idle; every lease released at the end."""
    made = []

    def make(out: Path, heartbeat: float = QUIET, timeout: float = 60.0, wait: float = 0.0, **kw) -> FileLease:
        lease = FileLease(out, TAG, heartbeat, timeout, wait, **kw)
        made.append(lease)
        return lease
    yield make
    for lease in made:
        lease.release()
        lease._unlock()


def gens(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "_lease").glob(f"{TAG}.*.json"))


def write_record(out: Path, gen: int, **fields) -> Path:
    path = out / "_lease" / f"{TAG}.{gen:06d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    rec = {"host": "other-host.example", "pid": 4242, "since": now - 100, "heartbeat": now, "timeout": 60,
           "token": "foreign", "shard": TAG, **fields}
    path.write_bytes(orjson.dumps(rec))
    return path


def test_acquire_writes_generation_0_and_release_removes_it(tmp_path, leases):
    lease = leases(tmp_path)
    lease.acquire()
    assert lease.held and gens(tmp_path) == [f"{TAG}.000000.json"]
    rec = read_lease(tmp_path, TAG)
    assert rec["host"] == HOST and rec["pid"] == os.getpid() and rec["gen"] == 0
    assert rec["token"] == lease.token and rec["shard"] == TAG and rec["timeout"] == 60.0
    assert rec["since"] <= rec["heartbeat"] <= time.time()
    assert rec["pid_started"] == pytest.approx(psutil.Process().create_time())
    assert stale_reason(rec, 60.0) is None, "its own process is alive on this host"
    lease.release()
    assert not lease.held and gens(tmp_path) == [] and read_lease(tmp_path, TAG) is None
    lease.release()  # twice: nothing more


def test_a_second_taker_is_refused_while_the_lease_lives(tmp_path, leases):
    first = leases(tmp_path)
    first.acquire()
    second = leases(tmp_path)
    with pytest.raises(LeaseHeld) as info:
        second.acquire()
    assert info.value.exit_code == ExitCode.LEASE_HELD == 6
    msg = str(info.value)
    assert f"shard {TAG} of {tmp_path}" in msg and "is being written by another run" in msg
    assert f"host {HOST}, pid {os.getpid()}" in msg and "nothing was read or written" in msg
    assert not second.held and second.thread is None
    assert gens(tmp_path) == [f"{TAG}.000000.json"] and read_lease(tmp_path, TAG)["token"] == first.token
    first.release()
    second.acquire()  # free now
    assert read_lease(tmp_path, TAG)["token"] == second.token


def test_a_live_lease_of_another_host_is_refused_even_without_the_kernel_lock(tmp_path, leases):
    """On NFS/Lustre the kernel lock does not reach other hosts: the record decides."""
    write_record(tmp_path, 0)
    with pytest.raises(LeaseHeld, match="host other-host.example, pid 4242"):
        leases(tmp_path).acquire()
    assert gens(tmp_path) == [f"{TAG}.000000.json"], "a refused taker writes nothing"


def test_stale_by_heartbeat_age_is_taken_over_as_the_next_generation(tmp_path, leases, caplog):
    write_record(tmp_path, 3, heartbeat=time.time() - 120)
    lease = leases(tmp_path, timeout=60.0)
    with caplog.at_level(logging.WARNING, logger="engine.output.lease"):
        lease.acquire()
    assert gens(tmp_path) == [f"{TAG}.000004.json"], "generation 3 + 1; the old record removed"
    rec = read_lease(tmp_path, TAG)
    assert rec["gen"] == 4 and rec["token"] == lease.token
    assert "taking over the stale lease of host other-host.example" in caplog.text
    assert "heartbeat is older than output.lease_timeout_seconds = 60" in caplog.text


@pytest.mark.parametrize("record, why", [
    ({"host": HOST, "pid": NO_PID}, f"its process {NO_PID} is gone from this host"),
    # this pid is alive, but it started at another time: a reused pid
    ({"host": HOST, "pid": os.getpid(), "pid_started": psutil.Process().create_time() - 1000},
     f"its process {os.getpid()} is gone from this host"),
], ids=["dead-pid", "reused-pid"])  # fixed ids: xdist's workers must collect the same names
def test_a_dead_or_reused_pid_on_this_host_is_stale_at_once(tmp_path, leases, caplog, record, why):
    write_record(tmp_path, 0, **record)  # heartbeat now: only the pid says it is stale
    rec = read_lease(tmp_path, TAG)
    assert stale_reason(rec, 60.0) == why
    with caplog.at_level(logging.WARNING, logger="engine.output.lease"):
        leases(tmp_path).acquire()
    assert why in caplog.text and gens(tmp_path) == [f"{TAG}.000001.json"]


def test_stale_reason_rules():
    now = 10_000.0
    other = {"host": "elsewhere", "pid": 1, "heartbeat": now - 30}
    assert stale_reason(other, 60.0, now=now) is None
    assert stale_reason(other, 29.0, now=now) == "its heartbeat is older than output.lease_timeout_seconds = 29"
    assert stale_reason({**other, "heartbeat": None}, 60.0, now=now).startswith("its heartbeat is older")
    assert stale_reason({**other, "released": True}, 60.0, now=now) == "released"
    mine = {"host": HOST, "pid": os.getpid(), "pid_started": psutil.Process().create_time(), "heartbeat": 0.0}
    assert stale_reason(mine, 60.0, now=now) is None, "alive on this host: live, whatever its heartbeat"


def test_an_unreadable_record_is_judged_by_its_age(tmp_path, leases):
    path = write_record(tmp_path, 2)
    path.write_bytes(b"{not json")  # not one of ours (ours are written atomically)
    with pytest.raises(LeaseHeld, match="host \\?, pid \\?"):
        leases(tmp_path).acquire()
    old = time.time() - 600
    os.utime(path, (old, old))
    lease = leases(tmp_path)
    lease.acquire()
    assert gens(tmp_path) == [f"{TAG}.000003.json"] and read_lease(tmp_path, TAG)["token"] == lease.token


def test_renewal_moves_the_heartbeat_and_keeps_the_record(tmp_path, leases):
    lease = leases(tmp_path)
    lease.acquire()
    path = tmp_path / "_lease" / f"{TAG}.000000.json"
    before = orjson.loads(path.read_bytes())
    path.write_bytes(orjson.dumps({**before, "heartbeat": 1.0}))  # as if the last beat were long ago
    t = time.time()
    assert lease._renew() is True
    after = orjson.loads(path.read_bytes())
    assert after["heartbeat"] >= t
    assert {k: v for k, v in after.items() if k != "heartbeat"} == {k: v for k, v in before.items() if k != "heartbeat"}


def test_a_lease_taken_over_by_another_holder_is_lost_at_renewal(tmp_path, leases):
    lease = leases(tmp_path)
    lease.acquire()
    assert lease._renew() is True
    write_record(tmp_path, 1, host="taker.example")  # another host took the (to it, stale) lease over
    assert lease._renew() is False
    assert read_lease(tmp_path, TAG)["host"] == "taker.example"


def test_a_record_overwritten_in_place_is_lost_too(tmp_path, leases):
    lease = leases(tmp_path)
    lease.acquire()
    write_record(tmp_path, 0, token="someone-else")
    assert lease._renew() is False


def test_the_heartbeat_thread_reports_a_lost_lease_and_release_leaves_the_new_holders_record(tmp_path, leases):
    lost = threading.Event()
    lease = leases(tmp_path, heartbeat=0.01, on_lost=lost.set)
    lease.acquire()
    write_record(tmp_path, 1, host="taker.example")
    assert lost.wait(30), "the heartbeat thread sees the takeover"
    lease.thread.join(30)
    assert lease.lost and not lease.thread.is_alive(), "it stops renewing"
    lease.release()
    assert f"{TAG}.000001.json" in gens(tmp_path) and read_lease(tmp_path, TAG)["host"] == "taker.example"


class FakeClock:
    """lease.py's `time`, with monotonic and sleep on a fake clock; `on_sleep` runs at each sleep."""

    def __init__(self, on_sleep=None):
        self.now, self.sleeps, self.on_sleep = 1000.0, [], on_sleep

    def module(self):
        return types.SimpleNamespace(time=time.time, strftime=time.strftime, gmtime=time.gmtime,
                                     monotonic=lambda: self.now, sleep=self.sleep)

    def sleep(self, s: float) -> None:
        assert s > 0
        self.sleeps.append(s)
        self.now += s
        if self.on_sleep is not None:
            self.on_sleep(len(self.sleeps))


def test_a_taker_waits_for_the_holder_to_release(tmp_path, leases, monkeypatch):
    holder = leases(tmp_path)
    holder.acquire()
    clock = FakeClock(on_sleep=lambda n: n == 3 and holder.release())
    monkeypatch.setattr(lease_mod, "time", clock.module())
    taker = leases(tmp_path, heartbeat=1.0, wait=300.0)
    taker.acquire()
    assert taker.held and len(clock.sleeps) == 3 and max(clock.sleeps) <= 1.0, "polled every heartbeat"
    assert read_lease(tmp_path, TAG)["token"] == taker.token


def test_a_taker_gives_up_after_lease_wait_seconds_and_says_it_waits(tmp_path, leases, monkeypatch, caplog):
    write_record(tmp_path, 0)
    clock = FakeClock()
    monkeypatch.setattr(lease_mod, "time", clock.module())
    with caplog.at_level(logging.WARNING, logger="engine.output.lease"), pytest.raises(LeaseHeld):
        leases(tmp_path, heartbeat=5.0, wait=100.0).acquire()
    assert 100.0 <= sum(clock.sleeps) < 100.0 + 2.0 and max(clock.sleeps) <= 2.0
    assert caplog.text.count("its lease is held (host other-host.example") == 4  # every 30 s of 100


def test_lease_wait_default_waits_only_on_a_requeued_slurm_attempt(monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert lease_wait(12.0, 60.0, 10.0) == 12.0
    assert lease_wait(-1.0, 60.0, 10.0) == 0.0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert lease_wait(-1.0, 60.0, 10.0) == 80.0, "timeout + 2 heartbeats"
    assert lease_wait(0.0, 60.0, 10.0) == 0.0, "a configured value wins"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "x")
    assert lease_wait(-1.0, 60.0, 10.0) == 0.0


def test_read_lease_skips_an_unreadable_newest_record_and_reads_a_store_copy(tmp_path):
    assert read_lease(tmp_path, TAG) is None
    write_record(tmp_path, 0, host="a")
    write_record(tmp_path, 1).write_bytes(b"")
    assert read_lease(tmp_path, TAG)["host"] == "a"
    store = tmp_path / "store"
    (store / "_lease").mkdir(parents=True)
    (store / "_lease" / f"{TAG}.json").write_bytes(orjson.dumps({"host": "s3-node", "pid": 9}))
    assert read_lease(store, TAG) == {"host": "s3-node", "pid": 9}


def test_describe_names_the_holder():
    rec = {"host": "n1", "pid": 77, "since": 0.0, "heartbeat": 995.0}
    assert describe(rec, now=1000.0) == "host n1, pid 77, since 1970-01-01 00:00:00 UTC, last heartbeat 5 s ago"
    assert describe({}, now=1000.0) == "host ?, pid ?, since ?, last heartbeat unknown"


# ---- StoreLease ---------------------------------------------------------------------------------------------

class PreconditionFailed(Exception):
    status_code = 412


class S3FileSystem:
    """S3's conditional PutObject as an in-memory store: If-None-Match: * fails when the key exists,
    If-Match: <etag> when its ETag differs (412 both). Named as s3fs's class, which is how StoreLease knows
    a store with conditional writes."""

    def __init__(self):
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.puts = 0

    def split_path(self, path: str):
        bucket, _, key = path.partition("/")
        return bucket, key, None

    def invalidate_cache(self, path=None) -> None:
        pass

    def call_s3(self, method: str, Bucket: str, Key: str, Body: bytes, IfNoneMatch=None, IfMatch=None):
        assert method == "put_object"
        path = f"{Bucket}/{Key}"
        have = self.objects.get(path)
        if IfNoneMatch == "*" and have is not None:
            raise PreconditionFailed("At least one of the pre-conditions you specified did not hold")
        if IfMatch is not None and (have is None or have[1] != IfMatch):
            raise PreconditionFailed("At least one of the pre-conditions you specified did not hold")
        self.puts += 1
        etag = f'"{self.puts}"'
        self.objects[path] = (Body, etag)
        return {"ETag": etag}

    def info(self, path: str) -> dict:
        if path not in self.objects:
            raise FileNotFoundError(path)
        return {"ETag": self.objects[path][1]}

    def cat_file(self, path: str) -> bytes:
        if path not in self.objects:
            raise FileNotFoundError(path)
        return self.objects[path][0]

    def rm(self, path: str) -> None:
        del self.objects[path]

    def overwrite(self, path: str, rec: dict) -> None:
        """Another writer's unconditional put."""
        self.call_s3("put_object", *self.split_path(path)[:2], orjson.dumps(rec))


def foreign(**fields) -> dict:
    now = time.time()
    return {"host": "gone-node", "pid": 7, "since": now, "heartbeat": now, "token": "x", "shard": TAG, **fields}


@pytest.fixture
def store_leases():
    made = []

    def make(fs, root: str = "bucket/out", timeout: float = 60.0, **kw) -> StoreLease:
        lease = StoreLease(fs, root, f"s3://{root}", TAG, QUIET, timeout, 0.0, give_up_after=5.0, **kw)
        made.append(lease)
        return lease
    yield make
    for lease in made:
        lease.release()


def test_s3_lease_one_writer_renew_and_release(store_leases):
    fs = S3FileSystem()
    key = f"bucket/out/_lease/{TAG}.json"
    first = store_leases(fs)
    assert first.conditional
    first.acquire()
    assert orjson.loads(fs.objects[key][0])["token"] == first.token and first.etag == fs.objects[key][1]
    with pytest.raises(LeaseHeld, match=f"host {HOST}, pid {os.getpid()}"):
        store_leases(fs).acquire()  # If-None-Match: * fails; the record is live
    assert first._renew() is True and first.etag == fs.objects[key][1]
    first.release()
    assert key not in fs.objects


def test_s3_lease_stale_is_taken_over_and_the_old_holder_loses_it_at_renewal(store_leases, caplog):
    fs = S3FileSystem()
    key = f"bucket/out/_lease/{TAG}.json"
    old = store_leases(fs)
    old.acquire()
    fs.overwrite(key, foreign(heartbeat=time.time() - 600))  # a vanished node's lease, stale
    with caplog.at_level(logging.WARNING, logger="engine.output.lease_store"):
        new = store_leases(fs)
        new.acquire()  # If-Match: the stale record's ETag
    assert "taking over the stale lease of host gone-node" in caplog.text
    assert orjson.loads(fs.objects[key][0])["token"] == new.token
    assert old._renew() is False, "If-Match with its old ETag fails: lost"
    assert new._renew() is True


def test_best_effort_store_lease_on_a_store_without_conditional_writes(store_leases):
    fs = fsspec.filesystem("memory")
    root = f"/lease-{os.getpid()}-{time.monotonic_ns()}"
    key = f"{root}/_lease/{TAG}.json"
    first = store_leases(fs, root=root)
    assert not first.conditional
    first.acquire()
    assert orjson.loads(fs.cat_file(key))["token"] == first.token
    with pytest.raises(LeaseHeld):
        store_leases(fs, root=root).acquire()
    assert first._renew() is True
    fs.pipe_file(key, orjson.dumps(foreign()))  # another writer's record: ours is lost
    assert first._renew() is False
    fs.pipe_file(key, orjson.dumps(foreign(heartbeat=time.time() - 600)))
    taker = store_leases(fs, root=root)
    taker.acquire()
    assert orjson.loads(fs.cat_file(key))["token"] == taker.token
    taker.release()
    assert not fs.exists(key)


def test_take_lease_takes_a_file_or_a_store_lease_from_the_output_config(tmp_path):
    o = dataclasses.replace(OutputConfig(), lease_heartbeat_seconds=QUIET, lease_timeout_seconds=30.0,
                            lease_wait_seconds=0.0, store_give_up_seconds=5.0)
    lost = []
    local = take_lease(o, TAG, out=tmp_path, on_lost=lambda: lost.append(1))
    try:
        assert isinstance(local, FileLease) and local.held and local.timeout == 30.0
        assert read_lease(tmp_path, TAG)["token"] == local.token
    finally:
        local.release()
    fs = S3FileSystem()
    remote = types.SimpleNamespace(fs=fs, root="bucket/x", url="s3://bucket/x")
    lease = take_lease(o, TAG, remote=remote)
    try:
        assert isinstance(lease, StoreLease) and lease.held and lease.give_up_after == 5.0
        assert f"bucket/x/_lease/{TAG}.json" in fs.objects
    finally:
        lease.release()
    assert fs.objects == {} and lost == []
