"""Integrity end to end (issue 33, items 3-8): damaged, changed or partial data is never called complete.

Through the command line on real files, with the instant backend (`instant.delay_ms` slows it so that
"mid-run" is reachable). A run whose process is what is tested (a signal, a closed stdout, an input changed
under it, a kill) is a process of its own, signalled or changed when its own log line says it got there;
what is only read afterwards (`engine status`, mix, export, report) runs in this process (`engine_main`).

    3  the input changes under a run: cut, replaced, removed -> status 1 naming the file, never "complete"
    4  a closed stdout changes no status and prints no traceback (interrupted: 3, backend dead: 4)
    5  a signal once the work is complete (interpreter shutting down, atexit hooks) -> 0, quietly
    6  `engine mix` killed mid-write leaves nothing in --out; the next mix is whole, once
    7  mix / export from an incomplete run: refused, or with --allow-incomplete said how much is missing
    8  a folder that is not an engine output: a one-line error from mix, export and report
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import (
    REPO,
    Watched,
    engine_main,
    reap_session,
    sample_docs,
    stored_rows,
    wait_for,
    write_config,
    write_jsonl,
    write_parquet,
)
from test_recovery import check_exactly_once

SLOW = {"delay_ms": 5.0}  # ~5 ms a request: 1,000 documents take seconds, so a change lands mid-run
SMALL_READS = {"input": {"batch_rows": 20}, "scheduler": {"lookahead": 20, "prefetch_batches": 1},
               "report": {"enabled": False}}


def ended(w: Watched, timeout: float = 300) -> tuple[int, str]:
    """The status and stderr of a Watched run whose stdout this test may have closed."""
    w.proc.wait(timeout=timeout)
    wait_for(lambda: w.lines.queue and w.lines.queue[-1] is None, "stderr to be read to its end", 30)
    return w.proc.returncode, "".join(w.err)


def clean(err: str) -> None:
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]


# ---- 3. the input changes under a run ---------------------------------------------------------------------------
def _cut(files: list[Path]) -> str:
    data = files[0].read_bytes()
    files[0].write_bytes(data[: int(len(data) * 0.4)])
    return f"{files[0].name} ({files[0]}) changed while the run read it (size"


def _replace(files: list[Path]) -> str:
    write_jsonl(files[1], sample_docs(300, start=7000))  # other documents, as many rows
    return f"{files[1].name} ({files[1]}) changed while the run read it"


def _remove(files: list[Path]) -> str:
    files[1].unlink()
    return f"{files[1].name} ({files[1]}) is gone"


@pytest.mark.parametrize("change", [_cut, _replace, _remove], ids=["cut", "replaced", "removed"])
def test_an_input_changed_under_a_run_is_status_1_naming_the_file_never_complete(tmp_path, tiny_model, change):
    files = [write_jsonl(tmp_path / "a.jsonl", sample_docs(1000))] if change is _cut else \
        [write_jsonl(tmp_path / "a.jsonl", sample_docs(300)), write_jsonl(tmp_path / "b.jsonl", sample_docs(300, 300))]
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, files, out, instant=SLOW, **SMALL_READS)
    w = Watched(cfg)
    assert w.wait_line("generating"), "".join(w.err)[-3000:]
    expected = change(files)  # a.jsonl is read first: b.jsonl is not opened yet
    code, err = ended(w)
    stdout = w.proc.stdout.read()
    assert code == 1, err[-3000:]
    assert expected in err and "not complete" in err, err[-3000:]
    clean(err)
    assert stdout.startswith("incomplete:"), stdout
    if change is not _replace:  # a replaced file's rows were stored: rows of a file that is not the recorded input
        assert stored_rows(out) < (1000 if change is _cut else 600)
    assert engine_main("status", str(out), "--check").returncode == 1
    # the output is not resumed from another input: refused, naming the file
    again = engine_main("run", str(cfg))
    if change is _remove:  # given by name: the input is refused before the output is touched
        assert again.returncode == 1 and f"{files[1]}' matches no file" in again.stderr, again.stderr[-2000:]
    else:
        assert again.returncode == 2 and f"input file {files[-1].name}" in again.stderr, again.stderr[-2000:]


# ---- 4. a closed stdout -----------------------------------------------------------------------------------------
def test_a_closed_stdout_changes_no_status_and_prints_no_traceback(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(1000))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [src], out, instant=SLOW, report={"enabled": False})
    # interrupted mid-run while the reader of stdout (`| tee log`, `| head`) is gone: 3, not 0
    w = Watched(cfg)
    w.proc.stdout.close()  # the reader of the pipe closes its end
    assert w.wait_line("generating"), "".join(w.err)[-3000:]
    wait_for(lambda: stored_rows(out) > 0, "rows stored", 120, w.proc)
    w.proc.send_signal(signal.SIGTERM)
    code, err = ended(w)
    assert code == 3, err[-3000:]
    assert "run the same command again to resume" in err
    clean(err)
    assert reap_session(w.proc.pid) == []
    # the backend dies, stdout closed: 4 and its message, one traceback-free report
    dead = write_config(tmp_path / "dead.toml", tiny_model, [src], tmp_path / "dead",
                        instant={"die_after": 50}, report={"enabled": False})
    w = Watched(dead)
    w.proc.stdout.close()
    code, err = ended(w)
    assert code == 4, err[-3000:]
    assert "error: injected: the backend died" in err and "resume" in err
    clean(err)
    # the interrupted output resumes, exactly once
    engine_main("run", str(cfg), "--set", "instant.delay_ms=0", check=True)
    check_exactly_once(out, {d["id"] for d in sample_docs(1000)}, ("faq",))


# ---- 5. a signal after the work is complete ---------------------------------------------------------------------
EXIT_HOOK = '''
import atexit, os, sys, time

def _slow_shutdown():  # registered first, so it runs last of the atexit hooks: the interpreter is shutting down
    print("test hook: shutting down", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(os.environ["ENGINE_TEST_GATE"]) and time.monotonic() < deadline:
        time.sleep(0.02)

if os.environ.get("ENGINE_TEST_GATE"):
    atexit.register(_slow_shutdown)
'''


def _no_pending_signal(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return all(int(line.split()[1], 16) == 0 for line in status.splitlines() if line.startswith(("SigPnd", "ShdPnd")))


def test_a_signal_once_the_work_is_complete_ends_the_process_with_status_0_quietly(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(40))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [src], out, report={"enabled": False})
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(EXIT_HOOK)
    gate = tmp_path / "gate"
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    w = Watched(cfg, env={"PYTHONPATH": path, "ENGINE_TEST_GATE": str(gate)})
    assert w.wait_line("test hook: shutting down"), "".join(w.err)[-3000:]  # summary printed, atexit hooks running
    w.proc.send_signal(signal.SIGTERM)  # Slurm's time limit, `scancel`
    w.proc.send_signal(signal.SIGINT)  # and a Ctrl-C: a second signal would abort a live run
    wait_for(lambda: _no_pending_signal(w.proc.pid), "the signals to be delivered", 30)
    gate.touch()
    code, stdout, err = w.finish()
    assert code == 0, err[-3000:]
    assert stdout.startswith("complete:"), stdout
    clean(err)
    assert "interrupted" not in err and "aborted" not in err, err[-3000:]
    assert engine_main("status", str(out), "--check").returncode == 0
    check_exactly_once(out, {d["id"] for d in sample_docs(40)}, ("faq",))


# ---- 6-8. the hand-off ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def complete_run(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("complete")
    src = write_jsonl(root / "in.jsonl", sample_docs(60))
    cfg = write_config(root / "run.toml", tiny_model, [src], root / "out", report={"enabled": False},
                       instant={"completion_tokens": 8}, sampling={"max_new_tokens": 64, "temperature": 0.0})
    engine_main("run", str(cfg), check=True)
    return root / "out"


def test_a_mix_killed_mid_write_leaves_nothing_in_out_and_the_next_is_whole(tmp_path, tiny_model, complete_run):
    mix_in = write_jsonl(tmp_path / "orig.jsonl", sample_docs(10_000, start=1000))
    out = tmp_path / "mix"
    args = [sys.executable, "-m", "engine.cli", "mix", str(complete_run), "--mix-in", str(mix_in), "--tokenizer",
            str(tiny_model), "--ratio", "0.002", "--out", str(out), "--part-rows", "5", "--shuffle-window", "5",
            "--allow-test-backend"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stderr:  # its own line: the parts are being written now
        if "writing the mix" in line:
            break
    work = tmp_path / f".mix.partial-{proc.pid}"
    wait_for(lambda: len(list(work.glob("part-*.parquet"))) >= 2, "parts being written", 120, proc, poll=0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the OOM killer, a lost node
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())  # nothing a glob could read
    assert list(work.glob("part-*.parquet"))  # it was killed mid-write, in the hidden folder
    again = engine_main("mix", str(complete_run), "--mix-in", str(mix_in), "--tokenizer", str(tiny_model),
                        "--ratio", "0.002", "--out", str(out), "--part-rows", "2000", "--allow-test-backend",
                        check=True)
    assert not work.exists()  # the killed mix's folder is removed
    summary = json.loads((out / "_mix.json").read_text())
    assert summary["run"]["complete"] is True
    table = pq.read_table(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(summary["parts"] + ["_mix.json"])
    assert table.num_rows == sum(s["rows"] for s in summary["sources"].values())
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids))  # every row once
    assert "mix written" in again.stdout


def test_hand_off_from_an_incomplete_run_is_refused_unless_allowed_and_then_says_what_is_missing(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(200))
    run = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [src], run, report={"enabled": False},
                       instant={"completion_tokens": 8, "die_after": 60, "delay_ms": 0.1},  # chunks of 8
                       sampling={"max_new_tokens": 64, "temperature": 0.0})
    assert engine_main("run", str(cfg)).returncode == 4  # stopped mid-run: resumable, not complete
    stored = stored_rows(run)
    assert 0 < stored < 200
    assert engine_main("status", str(run), "--check").returncode == 1
    mix_in = write_jsonl(tmp_path / "orig.jsonl", sample_docs(100, start=1000))
    base = ["--mix-in", str(mix_in), "--tokenizer", str(tiny_model), "--ratio", "0.5", "--allow-test-backend"]
    for cmd, out in ((["mix", str(run)], tmp_path / "mix"),
                     (["export", "nanotron", str(run), "--seq-len", "16", "--train-steps", "1", "--gpus", "1",
                       "--micro-batch-size", "1", "--grad-accum", "1"], tmp_path / "nt")):
        refused = engine_main(*cmd, *base, "--out", str(out))
        assert refused.returncode == 1, refused.stderr[-2000:]
        assert "the run is not complete" in refused.stderr and "--allow-incomplete" in refused.stderr
        assert f"{200 - stored:,} document(s) missing" in refused.stderr
        assert not out.exists()  # refused: nothing written
        allowed = engine_main(*cmd, *base, "--out", str(out), "--allow-incomplete")
        assert allowed.returncode == 0, allowed.stderr[-2000:]
        assert f"WARNING --allow-incomplete: {run}: the run is not complete" in allowed.stderr
        assert f"{200 - stored:,} document(s) missing" in allowed.stderr
        record = json.loads((out / ("_mix.json" if cmd[0] == "mix" else "_export.json")).read_text())
        assert record["run"] == {"complete": False, "shards": 1, "shards_complete": 0,
                                 "documents_missing": 200 - stored, "shards_not_started": 0}
    # the mix holds the stored rows only, each once
    generated = [i for i, s in zip(*pq.read_table(tmp_path / "mix", columns=["id", "source"]).to_pydict().values())
                 if s == "generated"]
    assert len(generated) == len(set(generated)) and len(generated) <= stored


def test_a_folder_that_is_not_an_engine_output_is_a_one_line_error(tmp_path, tiny_model):
    data = tmp_path / "dataset"
    (data / "train").mkdir(parents=True)
    write_parquet(data / "train" / "part-0.parquet", sample_docs(30))  # <name>/*.parquet: id, url, text
    mix_in = write_jsonl(tmp_path / "orig.jsonl", sample_docs(30, start=100))
    base = ["--mix-in", str(mix_in), "--tokenizer", str(tiny_model)]
    for cmd, out in ((["mix", str(data), *base], tmp_path / "mix"),
                     (["export", "nanotron", str(data), *base], tmp_path / "nt"),
                     (["report", str(data)], None)):
        p = engine_main(*cmd, *(["--out", str(out)] if out else []))
        assert p.returncode == 1, (cmd[0], p.stderr[-2000:])
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "not an engine output" in errors[0] and str(data) in errors[0], p.stderr
        if out:  # no fingerprint
            assert errors[0] == (f"error: {data}: not an engine output (no _run/fingerprint.json; give the output.dir "
                                 f"of an `engine run`)")
        else:  # `engine report` reads the parts: they lack the result columns
            assert "train/part-0.parquet has no column(s) model, generation" in errors[0]
        assert "Traceback" not in p.stderr and "KeyError" not in p.stderr
        assert out is None or not out.exists()
    assert not (data / "report").exists()
    # a fingerprint alone does not make one: the parts must have the result columns
    (data / "_run").mkdir()
    (data / "_run" / "fingerprint.json").write_text(json.dumps({"shard_count": 1}))
    p = engine_main("mix", str(data), *base, "--out", str(tmp_path / "mix2"))
    assert p.returncode == 1 and "train/part-0.parquet has no column(s) generation, finish_reason" in p.stderr
