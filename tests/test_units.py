"""Units claimed by workers (input.unit_rows > 0; engine/worker.py, engine/output/units.py, engine/backends/relay.py).

In-process: a unit's rows (input/reader.py `Reader.unit`) depend only on the input and unit_rows; a unit's lease
(claim, a live holder, a stale one taken over, the commit that fences a holder that lost it, a unit failed after
three deaths); the relay (one backend, units back to back: unit k+1 is pulled before unit k drains).
Through the CLI (real processes, readiness-based waits): three workers on one output, one frozen with SIGSTOP and
one killed with kill -9 mid-unit; a unit whose workers die three times is reported; workers and static shards never
share an output; another unit_rows is refused."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import REPO, engine_main, sample_docs, wait_for, write_config, write_jsonl, write_parquet
from test_storage import BUCKET, cli, remote_ids, s3  # noqa: F401 - s3 is the moto server fixture

from engine.backends.relay import Relay
from engine.input.reader import Reader
from engine.output.units import MAX_FAILURES, UnitLease, gen_dir, publish, roll_forward, unit_records
from engine.types import Completion, Request

TIMING = {"lease_heartbeat_seconds": 0.5, "lease_timeout_seconds": 3.0, "flush_seconds": 0.2}


# ---- units of the input ------------------------------------------------------------------------------------
def _rows(reader: Reader) -> list[str]:
    return [d.source for b in reader.batches() for d in b.docs] + \
        [r.source for b in reader.batches() for r in b.rejected]


def test_units_cover_the_input_once_whatever_reads_them(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", sample_docs(23))
    pq_rows = sample_docs(31, start=23)
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(pq_rows), tmp_path / "b.parquet", row_group_size=4)  # 8 row groups
    write_jsonl(tmp_path / "c.jsonl", [])  # empty: a warning, no rows
    reader = Reader([str(tmp_path / "*")], "text", "id", batch_rows=5, max_doc_chars=10_000)
    reader.preflight()
    whole = sorted(_rows(reader))
    for unit_rows in (1, 7, 10, 54, 100):
        count = reader.unit_count(unit_rows)
        assert count == max(1, -(-54 // unit_rows))
        seen = []
        for u in range(count):
            unit = reader.unit(u, unit_rows)
            got = _rows(unit)
            assert len(got) == unit.total_rows == min(unit_rows, 54 - u * unit_rows)
            seen += got
            # the same unit read again, by another reader of the same input: the same rows, in order
            again = Reader([str(tmp_path / "*")], "text", "id", batch_rows=3, max_doc_chars=10_000)
            again.preflight()
            assert _rows(again.unit(u, unit_rows)) == got
        assert sorted(seen) == whole and len(seen) == len(set(seen)) == 54
    # a unit inside the Parquet file reads its row groups only, and the right rows
    unit = reader.unit(3, 7)  # rows 21..27: a.jsonl 21-22, b.parquet 0-4
    assert _rows(unit) == ["a.jsonl:21", "a.jsonl:22"] + [f"b.parquet:{i}" for i in range(5)]


# ---- a unit's lease ------------------------------------------------------------------------------------------
def _lease(out: Path, timeout: float = 3.0) -> UnitLease:
    return UnitLease(out, "u00000-of-00001", heartbeat=0.2, timeout=timeout, rows=(0, 10), on_lost=lambda: None)


def test_a_unit_is_claimed_once_and_a_stalled_holder_is_fenced_at_commit(tmp_path):
    first = _lease(tmp_path)
    assert first.claim().outcome == "taken"
    second = _lease(tmp_path)
    held = second.claim()
    assert held.outcome == "held" and held.record["pid"] == os.getpid()
    # the holder stalls (its heartbeat thread stops, as under SIGSTOP): past the timeout it is stale even on this
    # host and with its process alive, and is taken over
    first.stop.set()
    first.thread.join()
    rec_path = first.path
    rec = orjson.loads(rec_path.read_bytes())
    rec_path.write_bytes(orjson.dumps({**rec, "heartbeat": time.time() - 10}))
    assert second.claim().outcome == "taken" and second.gen == 1 and second.failures == 1
    # the stalled holder wakes and tries to commit: refused, nothing committed by it
    assert first.commit(["faq/part-u00000-of-00001-00000.parquet"]) is False
    assert second.commit(["faq/part-u00000-of-00001-00000.parquet"]) is True
    rec = unit_records(tmp_path, 1)["u00000-of-00001"]
    assert rec["committed"] and rec["by_gen"] == 1 and rec["pid"] == os.getpid()
    assert _lease(tmp_path).claim().outcome == "committed"


def test_a_holder_that_commits_first_wins_and_the_late_taker_sees_it_committed(tmp_path):
    holder = _lease(tmp_path)
    assert holder.claim().outcome == "taken"
    assert holder.commit([]) is True
    late = _lease(tmp_path)
    assert late.claim().outcome == "committed"


def test_a_released_unit_is_resumed_without_counting_a_death_and_three_deaths_fail_it(tmp_path):
    lease = _lease(tmp_path)
    assert lease.claim().outcome == "taken"
    lease.release()  # an interrupted worker gives it back
    nxt = _lease(tmp_path)
    assert nxt.claim().outcome == "taken" and nxt.failures == 0 and nxt.previous == 0
    for died in range(1, MAX_FAILURES + 1):  # its holders die (their heartbeats stop)
        nxt.stop.set()
        nxt.thread.join()
        rec = orjson.loads(nxt.path.read_bytes())
        nxt.path.write_bytes(orjson.dumps({**rec, "heartbeat": time.time() - 10}))
        nxt = _lease(tmp_path)
        claim = nxt.claim()
        if died < MAX_FAILURES:
            assert claim.outcome == "taken" and nxt.failures == died
        else:
            assert claim.outcome == "failed" and claim.record["failures"] == MAX_FAILURES - 1


def _committed_unit(out: Path, tag: str, gen: int, parts: int = 3) -> None:
    d = gen_dir(out, tag, gen)
    for k in range(parts):
        (d / "faq").mkdir(parents=True, exist_ok=True)
        (d / "faq" / f"part-{tag}-{k:05d}.parquet").write_bytes(b"x" * 10)
    for sub in ("_manifest/faq", "_state", "_journal/faq", "_run"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "_manifest" / "faq" / f"{tag}.jsonl").write_text("{}\n")
    (d / "_state" / f"{tag}.json").write_text("{}")
    (d / "_journal" / "faq" / f"{tag}-00000.arrows").write_bytes(b"j")
    (d / "_run" / "fingerprint.json").write_text("{}")


def _publish_into(out: Path, tag: str, moved: list, errors: list) -> None:
    try:
        moved.append(publish(out, tag, 0))
    except Exception as exc:  # noqa: BLE001 - the test's assertion names it
        errors.append(exc)


def test_two_processes_publishing_one_committed_unit_at_once_move_each_file_once(tmp_path):
    """The committer and a worker rolling it forward may publish one unit at the same moment: neither fails,
    every part lands once, nothing private (journal, fingerprint) is published, the unit's directory goes."""
    for trial in range(20):
        out = tmp_path / f"o{trial}"
        tag = "u00000-of-00001"
        _committed_unit(out, tag, 0)
        errors: list = []
        moved: list = []

        threads = [threading.Thread(target=_publish_into, args=(out, tag, moved, errors)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert sum(moved) == 5  # 3 parts, the manifest and the state, each moved by one of the two
        assert sorted(p.name for p in (out / "faq").iterdir()) == [f"part-{tag}-{k:05d}.parquet" for k in range(3)]
        assert (out / "_state" / f"{tag}.json").exists() and not (out / "_journal").exists()
        assert not (out / "_units" / tag).exists()


def test_a_committed_unit_is_rolled_forward_only_once_its_committer_had_time(tmp_path):
    tag = "u00000-of-00001"
    _committed_unit(tmp_path, tag, 0)
    rec = {"committed": True, "by_gen": 0, "committed_at": time.time(), "host": "h", "pid": 1}
    roll_forward(tmp_path, tag, rec, timeout=60)  # just committed: the committer moves its own files
    assert (tmp_path / "_units" / tag).exists() and not (tmp_path / "faq").exists()
    roll_forward(tmp_path, tag, {**rec, "committed_at": time.time() - 61}, timeout=60)  # it died meanwhile
    assert not (tmp_path / "_units" / tag).exists() and len(list((tmp_path / "faq").iterdir())) == 3


# ---- the relay ---------------------------------------------------------------------------------------------
class _Backend:
    """Pulls up to `room` requests, finishes the oldest one per step; records what it did."""
    name = "fake"

    def __init__(self, room: int = 4, gate: threading.Event | None = None):
        self.room, self.log, self.gate = room, [], gate

    def generate(self, requests, stop):
        in_flight, it = [], iter(requests)
        exhausted = False
        while not stop.is_set():
            while not exhausted and len(in_flight) < self.room:
                try:
                    r = next(it)
                except StopIteration:
                    exhausted = True
                    break
                self.log.append(("pull", r.prompt, r.input_ids[0]))
                in_flight.append(r)
            if not in_flight:
                return
            r = in_flight.pop(0)
            if self.gate is not None and any(e[0] == "done" for e in self.log):
                self.gate.wait(30)  # the test's next step (a unit claimed) happens before the second completion
            self.log.append(("done", r.prompt, r.input_ids[0]))
            yield [Completion(r.key, "stop", output_ids=[1], prompt_tokens=1, completion_tokens=1)]


def _requests(unit: str, n: int):
    for i in range(n):
        yield Request(key=i, prompt=unit, input_ids=[i], prefix_len=0, max_new_tokens=1)


def test_the_relay_pulls_the_next_unit_before_the_current_one_drains_and_routes_completions_back():
    claimed = threading.Event()
    backend = _Backend(room=4, gate=claimed)
    relay = Relay(backend)
    got: dict[str, list[int]] = {"u0": [], "u1": []}
    stop0, stop1 = threading.Event(), threading.Event()
    c0, c1 = relay.client(), relay.client()
    gen0 = c0.generate(_requests("u0", 10), stop0)
    first = next(gen0)  # unit 0 is generating
    gen1 = c1.generate(_requests("u1", 6), stop1)  # unit 1 claimed before unit 0 drains
    t = threading.Thread(target=lambda: got["u1"].extend(c.key for b in gen1 for c in b))
    t.start()
    wait_for(lambda: len(relay.streams) == 2, "unit 1's stream", 10)
    claimed.set()
    got["u0"] = [c.key for c in first] + [c.key for b in gen0 for c in b]
    t.join(timeout=30)
    relay.close()
    assert sorted(got["u0"]) == list(range(10)) and sorted(got["u1"]) == list(range(6))  # each run's own keys
    first_u1_pull = next(i for i, e in enumerate(backend.log) if e[:2] == ("pull", "u1"))
    last_u0_done = max(i for i, e in enumerate(backend.log) if e[:2] == ("done", "u0"))
    assert first_u1_pull < last_u0_done, backend.log  # no drain between the units
    # and unit 0's requests were all pulled before any of unit 1's (oldest first)
    assert max(i for i, e in enumerate(backend.log) if e[:2] == ("pull", "u0")) < first_u1_pull


def test_a_unit_claimed_when_the_current_one_is_pulled_out_joins_the_same_pass_of_the_backend():
    """The next unit's run starts only after the current one's last request was pulled (its claim, directory and
    first batch take time): with `expect` the backend's pull waits for it instead of ending its pass, so the
    requests still in flight are not drained alone (one generate() pass for both units)."""
    passes = []

    class Counting(_Backend):
        def generate(self, requests, stop):
            passes.append(1)
            yield from super().generate(requests, stop)

    backend = Counting(room=4)
    relay = Relay(backend)
    got: dict[str, list[int]] = {"u0": [], "u1": []}

    def second_unit():  # the worker's claim: a run that registers its stream a moment later
        time.sleep(0.3)
        got["u1"] = [c.key for b in relay.client().generate(_requests("u1", 5), threading.Event()) for c in b]
    starter = threading.Thread(target=second_unit)
    relay.on_exhausted = lambda rank: (relay.expect(5.0), starter.start()) if rank == 0 else None
    first = relay.client()
    got["u0"] = [c.key for b in first.generate(_requests("u0", 6), threading.Event()) for c in b]
    starter.join(timeout=30)
    relay.close()
    assert sorted(got["u0"]) == list(range(6)) and sorted(got["u1"]) == list(range(5))
    assert len(passes) == 1, backend.log  # no second pass: the batch never drained between the units
    first_u1_pull = next(i for i, e in enumerate(backend.log) if e[:2] == ("pull", "u1"))
    last_u0_done = max(i for i, e in enumerate(backend.log) if e[:2] == ("done", "u0"))
    assert first_u1_pull < last_u0_done, backend.log


def test_a_stopped_run_is_pulled_from_no_more_and_the_backend_error_reaches_every_run():
    class Dies(_Backend):
        def generate(self, requests, stop):
            yield from super().generate(requests, stop)
            raise RuntimeError("engine died")

    relay = Relay(Dies(room=2))
    stop = threading.Event()
    gen = relay.client().generate(_requests("u0", 4), stop)
    with pytest.raises(RuntimeError, match="engine died"):
        for _ in gen:
            pass
    relay.close()


# ---- through the CLI ---------------------------------------------------------------------------------------
def _setup(tmp_path: Path, model, n: int, unit_rows: int, delay_ms: float = 60, **output) -> tuple[Path, Path, set]:
    docs = sample_docs(n)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", model, [src], out, input={"unit_rows": unit_rows},
                       instant={"delay_ms": delay_ms, "completion_tokens": 8}, output={**TIMING, **output},
                       report={"enabled": False})
    return cfg, out, {d["id"] for d in docs}


def _start(cfg: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg), *extra], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _held_by(out: Path, pid: int) -> list[dict]:
    recs = []
    for p in (out / "_lease").glob("u*.json") if (out / "_lease").is_dir() else []:
        try:
            rec = orjson.loads(p.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if rec.get("pid") == pid and not rec.get("committed") and not rec.get("released"):
            recs.append({**rec, "tag": p.name.split(".")[0]})
    return recs


def _freeze_one_kill_one(workers: list[subprocess.Popen], logs: list[Path], held_by, mid_unit) -> str:
    """Once every worker holds a unit and the second is mid-unit (`mid_unit()` names its unit): SIGSTOP the first,
    kill -9 the second; the third must then finish the run (status 0) while the first is still stopped. Returns
    the killed worker's unit."""
    frozen, killed, third = workers
    for w in workers:
        wait_for(lambda w=w: held_by(w.pid), f"worker {w.pid} to claim a unit", 180, proc=w)
    victim_unit = wait_for(mid_unit, "the victim to be mid-unit", 180, proc=killed)
    os.kill(frozen.pid, signal.SIGSTOP)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert third.wait(timeout=300) == 0, logs[2].read_text()[-4000:]
    assert psutil.Process(frozen.pid).status() == psutil.STATUS_STOPPED  # the frozen one is still stopped
    return victim_unit


def _end(workers: list[subprocess.Popen]) -> None:
    """Whatever is left of the workers (a failed test): woken and killed."""
    for w in workers:
        if w.poll() is None:
            os.kill(w.pid, signal.SIGCONT)
            w.kill()
            w.wait()


def _visible(out: Path) -> dict[str, int]:
    """The files the output shows (results, manifests, states) and their sizes."""
    return {str(p.relative_to(out)): p.stat().st_size for d in ("faq", "rejected", "_manifest", "_state")
            if (out / d).is_dir() for p in (out / d).rglob("*") if p.is_file()}


def _exactly_once(out: Path, ids: set[str]) -> None:
    got = [i for f in sorted((out / "faq").glob("*.parquet")) for i in pq.read_table(f).column("id").to_pylist()]
    assert len(got) == len(set(got)), f"{len(got) - len(set(got))} duplicate rows"
    assert set(got) == ids, f"missing {len(ids - set(got))} rows"


def test_three_workers_one_frozen_one_killed_mid_unit_the_third_finishes_and_the_frozen_writes_nothing(
        tmp_path, tiny_model):
    cfg, out, ids = _setup(tmp_path, tiny_model, n=360, unit_rows=30)
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    workers = [_start(cfg, log) for log in logs]
    frozen, killed, _ = workers
    try:
        def mid_unit():  # the victim's unit has rows journaled or committed in its own directory
            for rec in _held_by(out, killed.pid):
                d = gen_dir(out, rec["tag"], rec["gen"])
                if any(f.stat().st_size > 0 for f in d.glob("_journal/faq/*.arrows")) or any(d.glob("faq/*.parquet")):
                    return rec["tag"]
            return None
        victim_unit = _freeze_one_kill_one(workers, logs, lambda pid: _held_by(out, pid), mid_unit)
        status = engine_main("status", str(out), "--check")
        assert status.returncode == 0 and "run COMPLETE" in status.stdout, status.stdout + status.stderr
        _exactly_once(out, ids)
        log3 = logs[2].read_text()
        assert f"unit {victim_unit}: resuming from generation" in log3, log3[-4000:]
        copied = log3.split(f"unit {victim_unit}: resuming from generation")[1].split("\n")[0]
        assert "(0 file(s) copied)" not in copied, copied  # resumed from the killed worker's journal
        before = _visible(out)
        os.kill(frozen.pid, signal.SIGCONT)
        assert frozen.wait(timeout=60) == 6, logs[0].read_text()[-3000:]
        assert _visible(out) == before  # nothing visible written after it woke
        _exactly_once(out, ids)
        assert "taken over by another run" in logs[0].read_text() or "taken over by another worker" in \
            logs[0].read_text()
    finally:
        _end(workers)


def test_a_unit_whose_workers_die_three_times_is_reported_not_retried(tmp_path, tiny_model):
    cfg, out, _ = _setup(tmp_path, tiny_model, n=60, unit_rows=20, delay_ms=400)
    for attempt in range(MAX_FAILURES):
        w = _start(cfg, tmp_path / f"w{attempt}.log")
        try:  # it holds units 0 and 1 (the first free unit and the one claimed ahead), then dies
            wait_for(lambda w=w: {r["tag"] for r in _held_by(out, w.pid)} == {"u00000-of-00003", "u00001-of-00003"},
                     "a worker to claim units 0 and 1", 180, proc=w)
        finally:
            w.kill()
            w.wait()
    last = engine_main("run", str(cfg))  # generates unit 2, and names the two it may not claim
    assert last.returncode == 1, last.stderr[-3000:]
    assert "u00000-of-00003 (input rows 0 to 19" in last.stderr and "died there 3 times" in last.stderr
    assert "u00001-of-00003 (input rows 20 to 39" in last.stderr
    status = engine_main("status", str(out), "--check")
    assert status.returncode == 1
    assert "failed (2)" in status.stdout and "u00000-of-00003  rows 0-19" in status.stdout, status.stdout
    assert "1/3 units committed" in status.stdout and "2 failed" in status.stdout and "run not complete" in \
        status.stdout


def test_workers_and_static_shards_never_share_an_output_and_unit_rows_is_part_of_the_run(tmp_path, tiny_model):
    cfg, out, ids = _setup(tmp_path, tiny_model, n=30, unit_rows=10, delay_ms=0)
    assert engine_main("run", str(cfg)).returncode == 0
    _exactly_once(out, ids)
    static = engine_main("run", str(cfg), "--shard", "0/2")
    assert static.returncode == 2 and "is being made by workers claiming units of input.unit_rows = 10" in \
        static.stderr, static.stderr
    other = engine_main("run", str(cfg), "--set", "input.unit_rows=20")
    assert other.returncode == 2 and "units.rows: was 10, now 20" in other.stderr, other.stderr
    # a second worker on a complete output joins, finds nothing to do, and says so
    again = engine_main("run", str(cfg))
    assert again.returncode == 0 and "every unit is committed (3)" in again.stderr
    _exactly_once(out, ids)
    # a static output refuses workers
    src = write_parquet(tmp_path / "in.parquet", sample_docs(12))
    cfg2 = write_config(tmp_path / "static.toml", tiny_model, [src], tmp_path / "static", report={"enabled": False})
    assert engine_main("run", str(cfg2)).returncode == 0
    joined = engine_main("run", str(cfg2), "--set", "input.unit_rows=5")
    assert joined.returncode == 2 and "was made by static shards" in joined.stderr, joined.stderr


# ---- the same on the moto S3 server ------------------------------------------------------------------------
def _s3_held_by(store, out: str, pid: int) -> list[dict]:
    store.fs.invalidate_cache()
    recs = []
    for path in store.fs.glob(f"{out}/_lease/u*.json"):
        try:
            rec = orjson.loads(store.fs.cat_file(path))
        except (FileNotFoundError, orjson.JSONDecodeError):
            continue
        if rec.get("pid") == pid and not rec.get("committed") and not rec.get("released"):
            recs.append({**rec, "tag": path.rsplit("/", 1)[1][:-len(".json")]})
    return recs


def _s3_visible(store, out: str) -> dict[str, int]:
    store.fs.invalidate_cache()
    return {p: store.fs.info(p)["size"] for p in store.fs.find(out)
            if not any(f"/{d}/" in p for d in ("_units", "_lease")) and not p.endswith(("summary.json", "README.md"))}


def test_three_workers_on_an_s3_output_one_frozen_one_killed_exactly_once(tmp_path, tiny_model, s3):  # noqa: F811
    docs = sample_docs(360)
    s3.fs.pipe(f"{BUCKET}/in-units/in.jsonl", b"".join(orjson.dumps(d) + b"\n" for d in docs))
    out = f"{BUCKET}/units"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [f"s3://{BUCKET}/in-units/in.jsonl"], f"s3://{out}",
                       input={"unit_rows": 30}, instant={"delay_ms": 60, "completion_tokens": 8},
                       output={**TIMING, "sync_seconds": 0.3}, report={"enabled": False})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **s3.env}
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    workers = [subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg), "--set",
                                 f"output.staging_dir='{tmp_path / f'staging-{i}'}'"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=log.open("w")) for i, log in enumerate(logs)]
    frozen, killed, _ = workers
    try:
        def mid_unit():  # the victim's unit has journaled rows in the store (its uploads)
            for rec in _s3_held_by(s3, out, killed.pid):
                if s3.fs.glob(f"{out}/_units/{rec['tag']}/g{rec['gen']:06d}/_journal/faq/*.arrows"):
                    return rec["tag"]
            return None
        victim_unit = _freeze_one_kill_one(workers, logs, lambda pid: _s3_held_by(s3, out, pid), mid_unit)
        status = cli(s3, "status", f"s3://{out}")
        assert "12/12 units committed" in status.stdout and "run COMPLETE" in status.stdout, status.stdout
        ids = remote_ids(s3, out)
        assert len(ids) == len(set(ids)) == 360 and set(ids) == {d["id"] for d in docs}
        assert f"unit {victim_unit}: resuming from generation" in logs[2].read_text()
        before = _s3_visible(s3, out)
        os.kill(frozen.pid, signal.SIGCONT)
        assert frozen.wait(timeout=60) == 6, logs[0].read_text()[-3000:]
        assert _s3_visible(s3, out) == before  # nothing visible written after it woke
        assert sorted(remote_ids(s3, out)) == sorted(ids)
    finally:
        _end(workers)
