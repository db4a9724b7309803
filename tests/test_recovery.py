"""Crash recovery, interruption, resume refusal, sharding, retries: exactly one row per request. Runs that are
killed, signalled or run side by side are processes of their own (`start`); the others, and every resume after
them, run the command line in this process (`engine_main`)."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, engine_main, sample_docs, stored_rows, wait_for, write_config, write_jsonl, write_parquet

PROMPTS = ("faq", "math")


def check_exactly_once(out: Path, expected_ids: set[str], prompts=PROMPTS) -> dict[str, list]:
    """Every committed Parquet file reads; each (document, prompt) appears exactly once."""
    tables = {}
    for prompt in prompts:
        files = sorted((out / prompt).glob("*.parquet"))
        assert files, f"no parts for {prompt}"
        ids = []
        for f in files:
            ids += pq.read_table(f).column("id").to_pylist()  # raises if a part were partial
        assert len(ids) == len(set(ids)), f"{prompt}: duplicate rows"
        assert set(ids) == expected_ids, f"{prompt}: missing {len(expected_ids - set(ids))} rows"
        tables[prompt] = ids
    return tables


LAYOUTS = ("document_last", "document_first")


def slow_config(tmp_path, tiny_model, n_docs=1500, layout="document_last"):
    """A run paced by the instant backend's simulated latency, with small row groups and parts."""
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(n_docs))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [src], out, prompts=PROMPTS,
                       output={"row_group_rows": 40, "file_max_mb": 1, "flush_seconds": 0.2},
                       instant={"completion_tokens": 8, "delay_ms": 1.5}, render={"layout": layout})
    return cfg, out, {d["id"] for d in sample_docs(n_docs)}


def start(cfg: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg), *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kill_9_at_random_moments_then_resume(tmp_path, tiny_model, layout):
    trials = int(os.environ.get("ENGINE_STRESS_TRIALS", "5"))
    cfg, out, ids = slow_config(tmp_path, tiny_model, layout=layout)
    rng = random.Random(int(os.environ.get("ENGINE_STRESS_SEED", "0")))
    killed = 0
    for _ in range(trials):
        proc = start(cfg)
        time.sleep(rng.uniform(2.5, 6.0))  # start-up takes ~2.5 s; then the run is in full flow
        if proc.poll() is None:
            proc.kill()
            killed += 1
        proc.wait()
    assert killed >= 1, "the run finished before any kill: make it slower"
    final = engine_main("run", str(cfg), check=True)
    assert "complete:" in final.stdout
    check_exactly_once(out, ids)
    assert not list(out.rglob("*.tmp")) and not list((out / "_journal").rglob("*.arrows"))


def test_sigterm_flushes_and_exits_resumable(tmp_path, tiny_model):
    cfg, out, ids = slow_config(tmp_path, tiny_model, n_docs=3000)
    proc = start(cfg)
    wait_for(lambda: stored_rows(out) >= 50, "rows stored (the run in full flow)", 600, proc)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - t < 30
    assert proc.returncode == 3, err
    assert "resume" in err
    # What was finished is on disk, in readable Parquet, and the run is not marked complete.
    done = sum(pq.read_table(out / p).num_rows for p in PROMPTS)
    assert 0 < done < 2 * len(ids)
    status = engine_main("status", str(out), "--check")
    assert status.returncode == 1 and "not complete" in status.stdout
    resumed = engine_main("run", str(cfg), check=True)
    skipped = int(resumed.stdout.split("skipped (done before or rejected) ")[1].split()[0].replace(",", ""))
    assert skipped == done  # the resumed run regenerated nothing that was already stored
    check_exactly_once(out, ids)
    assert engine_main("status", str(out), "--check").returncode == 0


def test_resume_refused_after_config_change_and_overwrite(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(10))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out)
    engine_main("run", str(cfg), check=True)
    p = engine_main("run", str(cfg), "--set", "sampling.temperature=0.9")
    assert p.returncode != 0 and "sampling.temperature: was 0.0, now 0.9" in p.stderr and "--overwrite" in p.stderr
    p = engine_main("run", str(cfg), "--set", "sampling.max_new_tokens=7")
    assert p.returncode != 0 and "max_new_tokens" in p.stderr
    own = tmp_path / "faq2.toml"
    own.write_text((REPO / "prompts" / "faq.toml").read_text().replace("frequently asked", "often asked"))
    p = engine_main("run", str(cfg), "--set", f"prompts=['{own}']")
    assert p.returncode != 0 and "prompts" in p.stderr
    p = engine_main("run", str(cfg), "--set", "render.layout=document_first")
    assert p.returncode == 2 and "render.layout: was 'document_last', now 'document_first'" in p.stderr
    p = engine_main("run", str(cfg), "--set", "sampling.temperature=0.9", "--overwrite", check=True)
    assert "generated  10 requests" in p.stdout
    assert pq.read_table(out / "faq").num_rows == 10


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shards_share_one_output_dir(tmp_path, tiny_model, layout):
    srcs = [write_parquet(tmp_path / f"in{i}.parquet", sample_docs(15, start=15 * i)) for i in range(2)]
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, srcs, out, prompts=PROMPTS, render={"layout": layout})
    procs = [start(cfg, "--shard", f"{i}/3") for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    check_exactly_once(out, {d["id"] for d in sample_docs(30)})
    status = engine_main("status", str(out), "--check")
    assert status.returncode == 0 and "3/3 shards complete" in status.stdout
    assert len(list((out / "faq").glob("part-s0000?-of-00003-*.parquet"))) == 3


def test_failed_requests_are_retried_then_recorded(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(200))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, instant={"fail_rate": 0.3},
                       retry={"max_attempts": 3, "backoff_seconds": 0.01, "max_error_fraction": 0.2})
    p = engine_main("run", str(cfg), check=True)
    t = pq.read_table(out / "faq")
    assert t.num_rows == 200 and len(set(t.column("id").to_pylist())) == 200
    reasons = t.column("finish_reason").to_pylist()
    failed = reasons.count("error")
    # 0.3^3 of 200 requests fail three times in a row: a handful, recorded, not retried forever.
    assert 0 < failed < 20 and reasons.count("length") + reasons.count("stop") == 200 - failed
    errors = [e for e, r in zip(t.column("error").to_pylist(), reasons) if r == "error"]
    assert all("injected failure" in e for e in errors)
    assert f"failed {failed}" in p.stdout
    # Failed rows count as done: a rerun generates nothing.
    again = engine_main("run", str(cfg), check=True)
    assert "generated  0 requests" in again.stdout


def test_too_many_error_rows_is_not_complete_and_retry_errors_regenerates_them(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(100))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, instant={"fail_rate": 0.3},
                       retry={"max_attempts": 2, "backoff_seconds": 0.01}, output={"row_group_rows": 30})
    p = engine_main("run", str(cfg))  # 0.3^2 = 9 % of the rows fail: above the default 2 %
    assert p.returncode == 5 and "incomplete:" in p.stdout and "--retry-errors" in p.stderr, p.stderr
    t = pq.read_table(out / "faq")
    failed = t.column("finish_reason").to_pylist().count("error")
    assert t.num_rows == 100 and 2 < failed < 20
    assert engine_main("status", str(out), "--check").returncode == 1
    # A plain resume generates nothing, and its summary counts the whole run's failures, as status does.
    again = engine_main("run", str(cfg))
    assert again.returncode == 5 and "generated  0 requests" in again.stdout
    assert f"failed {failed} (0 in this process)" in again.stdout
    # --retry-errors: the error rows are removed and those documents generated again, exactly once.
    fixed = engine_main("run", str(cfg), "--retry-errors", "--set", "instant.fail_rate=0.0", check=True)
    assert f"generated  {failed} requests" in fixed.stdout and "complete:" in fixed.stdout
    check_exactly_once(out, {d["id"] for d in sample_docs(100)}, prompts=("faq",))
    assert "error" not in pq.read_table(out / "faq").column("finish_reason").to_pylist()
    assert engine_main("status", str(out), "--check").returncode == 0


def test_a_run_that_mostly_fails_stops_early(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(2000))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, instant={"fail_rate": 1.0},
                       retry={"max_attempts": 1}, scheduler={"lookahead": 64})
    p = engine_main("run", str(cfg))
    assert p.returncode == 5 and "injected failure" in p.stderr, p.stderr
    assert pq.read_table(out / "faq").num_rows < 2000  # it stopped instead of storing 2,000 error rows


def test_dead_backend_ends_the_run_resumable(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(600))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, instant={"die_after": 300})
    p = engine_main("run", str(cfg))
    assert p.returncode == 4 and "backend died" in p.stderr and "resume" in p.stderr
    assert 0 < pq.read_table(out / "faq").num_rows <= 300  # what finished before the death is kept
    engine_main("run", str(cfg), "--set", "instant.die_after=0", check=True)
    check_exactly_once(out, {d["id"] for d in sample_docs(600)}, prompts=("faq",))


def test_bad_input_rows_go_to_rejected_and_good_rows_are_kept(tmp_path, tiny_model):
    good = sample_docs(5)
    path = tmp_path / "messy.jsonl"
    lines = [f'{{"id": "{d["id"]}", "text": "{d["text"].replace(chr(10), " ")}"}}'.encode() for d in good]
    lines += [b'{"id": "n", "text": null}', b'not json at all', b'{"id": "doc-00001", "text": "duplicate id"}',
              b'{"id": "w", "text": "  "}', b'{"id": "u", "text": "caf\xc3\xa9 \xe2\x80\x8f\\u0007 ok"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [path], out)
    p = engine_main("run", str(cfg), check=True)
    assert "rejected rows 4" in p.stdout
    assert sorted(pq.read_table(out / "faq").column("id").to_pylist()) == sorted([d["id"] for d in good] + ["u"])
    rej = pq.read_table(out / "rejected").to_pylist()
    by_ref = {r["doc_ref"]: r["reason"] for r in rej}
    assert set(by_ref) == {"messy.jsonl:5", "messy.jsonl:6", "messy.jsonl:7", "messy.jsonl:8"}
    assert "duplicate id" in by_ref["messy.jsonl:7"] and "not valid JSON" in by_ref["messy.jsonl:6"]
    # A resumed run records the rejections once, not again.
    engine_main("run", str(cfg), check=True)
    assert pq.read_table(out / "rejected").num_rows == 4


def test_write_errors_fail_loudly_and_committed_parts_stay_readable(tmp_path, tiny_model, monkeypatch):
    from engine.config.run_config import load_config
    from engine.errors import RunFailed
    from engine.output import parts as journal
    from engine.run import Run

    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(400))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, output={"row_group_rows": 50},
                       instant={"completion_tokens": 4})
    calls = {"n": 0}
    real = journal.PartSink._write_group

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return real(self)

    monkeypatch.setattr(journal.PartSink, "_write_group", failing)
    with pytest.raises(RunFailed) as err:
        Run(load_config(cfg)).execute()
    assert "No space left" in str(err.value) and err.value.code == 1
    for f in out.rglob("*.parquet"):
        pq.read_table(f)
    monkeypatch.setattr(journal.PartSink, "_write_group", real)
    Run(load_config(cfg)).execute()
    check_exactly_once(out, {d["id"] for d in sample_docs(400)}, prompts=("faq",))


def test_rows_in_two_journals_after_a_crash_in_replay_are_kept_once(tmp_path):
    """replay() writes the recovered rows into a new journal, then deletes the old ones: a crash in
    between leaves every row in two journals. Recovery keeps one copy."""
    import shutil

    import pyarrow as pa

    from engine.output.parts import PartSink, PartSpec

    schema = pa.schema([("id", pa.string()), ("finish_reason", pa.string())])

    def sink():
        return PartSink(PartSpec(tmp_path, "faq", "s00000-of-00001", schema, "id", 1000, 1 << 30, 3,
                        count_column="finish_reason"))
    first = sink()
    first.recover()
    first.add(pa.RecordBatch.from_pydict({"id": [f"d{i}" for i in range(10)], "finish_reason": ["stop"] * 10},
                                         schema=schema))
    first.flush(sync=True)
    journal = tmp_path / "_journal" / "faq" / "s00000-of-00001-00000.arrows"
    first.journal.close()
    shutil.copy(journal, journal.with_name("s00000-of-00001-00001.arrows"))  # the crash inside replay()
    again = sink()
    done, replay = again.recover()
    assert len(done) == 10 and sum(b.num_rows for b in replay) == 10
    again.replay(replay)
    again.close()
    ids = pq.read_table(tmp_path / "faq").column("id").to_pylist()
    assert sorted(ids) == sorted(f"d{i}" for i in range(10))
