"""SIGTERM / SIGINT at any moment of `engine run`: at each stage of start-up, while generating and
during the final report. Each signal is sent when the run's own log line says it reached that stage
(a readiness signal, never a sleep), so the test means the same on an idle and on a loaded machine. The
signalled runs are processes of their own (`Watched`); `engine status` and the final resume run in this
process (`engine_main`)."""
import signal

import pyarrow.parquet as pq
from conftest import Watched, engine_main, reap_session, sample_docs, stored_rows, wait_for, write_config, write_jsonl
from test_recovery import check_exactly_once

PROMPTS = ("faq", "math")
# (log line that marks the stage, signal, expected status)
STAGES = [
    ("reading the config", signal.SIGTERM, 3),              # argument parsing done, before the heavy imports
    ("input checked", signal.SIGTERM, 3),                    # input checked, model not yet loaded
    ("tokenizer and config loaded", signal.SIGINT, 3),       # before the output directory is recovered
    ("backend", signal.SIGINT, 3),                           # "starting the instant backend"
    ("generating", signal.SIGTERM, 3),                       # requests in flight
    ("writing the diversity report", signal.SIGTERM, 0),    # the run is complete: 0, report skipped
]


def test_a_signal_at_every_stage_ends_with_a_documented_status_then_resumes_exactly_once(tmp_path, tiny_model):
    n = 2500
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(n))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [src], out, prompts=PROMPTS,
                       output={"row_group_rows": 40, "flush_seconds": 0.2},
                       instant={"completion_tokens": 8, "delay_ms": 1.0})
    stored = []
    for marker, sig, expected in STAGES:
        w = Watched(cfg, "--set", "report.enabled=true")
        reached = w.wait_line(marker)
        assert reached, f"the run ended before '{marker}':\n{''.join(w.err)[-3000:]}"
        w.proc.send_signal(sig)
        code, stdout, err = w.finish()
        assert code == expected, f"{sig.name} at '{marker}': status {code}\n{err[-3000:]}"
        assert "Traceback" not in err, err[-3000:]
        assert reap_session(w.proc.pid) == [], f"processes left after {sig.name} at '{marker}'"
        if expected == 3:
            assert "resume" in err
        rows = sum(pq.read_table(out / p).num_rows for p in PROMPTS) if (out / "faq").is_dir() and \
            list((out / "faq").glob("*.parquet")) else 0
        stored.append(rows)
        # What is on disk is readable and consistent with the state file.
        st = engine_main("status", str(out))
        assert st.returncode == (0 if out.is_dir() else 2), st.stderr  # no directory yet: an error (issue 24)
        assert "running" not in "\n".join(st.stdout.splitlines()[2:-1])  # the run ended: stopped or complete
    assert stored == sorted(stored) and stored[-1] == n * len(PROMPTS)
    assert "the work is complete and saved" in err or "the diversity report is skipped" in err
    check_exactly_once(out, {d["id"] for d in sample_docs(n)}, PROMPTS)
    assert engine_main("status", str(out), "--check").returncode == 0


def test_a_repeated_sigterm_is_the_same_request_and_a_second_sigint_aborts_without_traceback(tmp_path, tiny_model):
    """Slurm signals every process of a job and its task script forwards one more SIGTERM: a repeat is the
    same request (logged once), at start-up and while generating; Ctrl-C twice aborts, with a message."""
    n = 3000
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(n))], out,
                       prompts=PROMPTS, output={"row_group_rows": 40, "flush_seconds": 0.2},
                       instant={"completion_tokens": 8, "delay_ms": 1.0})
    for marker, first, repeat in (("reading the config", signal.SIGTERM, signal.SIGTERM),
                                  ("finishing writes", signal.SIGTERM, signal.SIGTERM),
                                  ("finishing writes", signal.SIGINT, signal.SIGINT)):
        before = stored_rows(out)
        w = Watched(cfg)
        if marker == "finishing writes":  # rows stored by this process: generating, the run's handlers in place
            wait_for(lambda b=before: stored_rows(out) > b, "rows stored", 300, w.proc)
            w.proc.send_signal(first)
            assert w.wait_line(marker), "".join(w.err)[-3000:]
        else:
            assert w.wait_line(marker), "".join(w.err)[-3000:]
            w.proc.send_signal(first)
        w.proc.send_signal(repeat)
        w.proc.send_signal(repeat)
        code, _, err = w.finish()
        assert code == 3, f"{first.name} then {repeat.name} at '{marker}': status {code}\n{err[-3000:]}"
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
        assert "resume" in err, err[-3000:]
        assert err.count("received again") <= 1, err[-3000:]
        if repeat == signal.SIGTERM:
            assert "aborted" not in err, err[-3000:]
        if "aborted" in err:  # a double Ctrl-C: `engine status` says interrupted, not "killed or crashed"
            st = engine_main("status", str(out)).stdout
            assert "exit 3, interrupted" in st and "killed or crashed" not in st, st
        assert reap_session(w.proc.pid) == []
    assert engine_main("run", str(cfg)).returncode == 0
    check_exactly_once(out, {d["id"] for d in sample_docs(n)}, PROMPTS)


def test_a_signal_whose_exception_was_swallowed_during_start_up_still_stops_the_run(tmp_path, tiny_model,
                                                                                      monkeypatch):
    """A SIGTERM during start-up raises Interrupted; where the interpreter swallows it (raised inside an
    at-fork hook while a backend spawns processes) the signal is still noted, and the run stops with the
    resumable status as soon as its own handler is in place, before any row is generated."""
    from engine import signals
    from engine.config.run_config import load_config
    from engine.errors import ExitCode
    from engine.run import Run

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(20))], out)
    monkeypatch.setattr(signals._Stop, "first", "SIGTERM")  # noted by stop_requested, its Interrupted lost
    code, _ = Run(load_config(cfg)).execute()
    assert code == ExitCode.INTERRUPTED
    assert stored_rows(out) == 0
    monkeypatch.setattr(signals._Stop, "first", None)
    code, _ = Run(load_config(cfg)).execute()  # the resume generates everything
    assert code == ExitCode.OK and stored_rows(out) == 20
