"""Honest rates and useful tokens: the progress line on a timer, start-up / generation / finishing
seconds, and the useful output tokens (rows that pass the quality gate) in the summary, `engine status`
and the dataset card, through the CLI on real files."""
import io
import json
import re
import sys
import time

from conftest import engine_cli, sample_docs, wait_for, write_config, write_jsonl

from engine.metrics import Clock, Counters, Tally
from engine.output.parts import PartSink, PartSpec
from engine.output.record import ProcessReport
from engine.progress import Progress

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ progress", re.M)


def test_progress_line_prints_on_a_timer_when_nothing_completes(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)  # not a terminal: the plain progress line
    c, clock = Counters(total_requests=10), Clock()
    progress = Progress(c, clock, log_every=0.05)
    progress.start()
    try:
        wait_for(lambda: err.getvalue().count("starting the backend") >= 2, "start-up progress lines", 60)
        clock.ready()
        progress.generation_started()
        wait_for(lambda: "ETA ?" in err.getvalue(), "a line while nothing has completed", 60)
        c.completed(4, 100, 400, 0, 0)
        c.add_stored("faq", {"stop": Tally(3, 300, 300), "length": Tally(1, 100, 0)})
        progress.refresh()
        wait_for(lambda: re.search(r"4/10 requests.*useful [\d,]+ tok/s.*last \d+ s: [\d.,]+ out tok/s [\d.]+ req/s, "
                                   r"ETA [\d.]+ min", err.getvalue()),
                 "a line with the recent rate and an ETA from it", 60)
    finally:
        progress.close()
    lines = [line for line in err.getvalue().splitlines() if line]
    assert lines and all(STAMP.match(line) for line in lines)
    s = ProcessReport.of(c, clock)
    assert s.useful_output_tokens == 300 and s.output_tokens == 400 and s.output_truncated == 1
    assert s.finish_reasons == {"stop": 3, "length": 1}
    assert s.per_prompt["faq"].useful_output_tokens == 300
    assert s.startup_s > 0 and s.generation_s > 0


def test_rates_are_over_generation_time_not_start_up(monkeypatch):
    c, clock = Counters(total_requests=1), Clock(started=0.0)
    now = [100.0]
    monkeypatch.setattr("engine.metrics.time.perf_counter", lambda: now[0])
    clock.ready()  # 100 s of start-up
    now[0] = 200.0
    c.completed(1, 10, 1000, 0, 0)
    c.add_stored("faq", {"stop": Tally(1, 1000, 1000)})
    now[0] = 210.0
    clock.generation_done()
    now[0] = 212.0
    s = ProcessReport.of(c, clock)
    assert s.startup_s == 100.0 and s.generation_s == 110.0 and s.finishing_s == 2.0
    assert s.output_tokens_per_s == round(1000 / 110, 1)  # not 1000 / 212


def test_part_sink_sums_completion_tokens_per_finish_reason_and_recovers_them(tmp_path):
    import pyarrow as pa

    from engine.output.layout import result_schema
    schema = result_schema(None)

    def sink():
        return PartSink(PartSpec(tmp_path, "faq", "s00000-of-00001", schema, "id", 1000, 1 << 20, 3,
                                 "finish_reason", "generation"))
    rows = [{"id": f"d{i}", "prompt": "faq", "model": "m", "generation": "x", "finish_reason": r,
             "prompt_tokens": 10 + i, "completion_tokens": t, "cached_tokens": i, "truncated": False, "error": None,
             "doc_ref": f"f:{i}", "text": "t"} for i, (r, t) in enumerate([("stop", 5), ("repetition", 7),
                                                                            ("stop", 3), ("length", 9)])]
    a = sink()
    a.recover()
    a.add(pa.RecordBatch.from_pylist(rows[:2], schema=schema))
    a.commit()
    a.add(pa.RecordBatch.from_pylist(rows[2:], schema=schema))
    a.flush(sync=True)  # journaled, not committed: a crash now
    # rows, completion tokens, useful ones, prompt tokens and the backend's cached share of them
    want = {"stop": Tally(2, 8, 8, 22, 2), "repetition": Tally(1, 7, 0, 11, 1), "length": Tally(1, 9, 0, 13, 3)}
    assert a.tally == want
    b = sink()
    _, replay = b.recover()
    b.replay(replay)
    assert b.tally == want


def test_summary_status_and_card_show_useful_tokens_per_prompt(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(8))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", "tiny-random", [src], out, prompts=("faq", "summary"),
                       instant={"completion_tokens": 600})
    cfg.write_text(cfg.read_text().replace("max_new_tokens = 16\n", ""))  # each prompt's own: 1024 and 512
    began = time.monotonic()
    run = engine_cli("run", str(cfg))
    measured = time.monotonic() - began  # the process's whole life, as its caller sees it
    assert run.returncode == 0, run.stderr
    s = json.loads((out / "summary.json").read_text())
    # the figures match the clock: the summary's time, plus the interpreter and imports before the config was
    # read (process start-up less the run's own start-up), is the process's life but for its exit
    before_config = s["process_startup_s"] - s["startup_s"]
    assert s["wall_seconds"] + before_config <= measured + 0.5, (s, measured)
    assert measured - (s["wall_seconds"] + before_config) < 10.0, (s, measured)
    # faq: 600 of 1024 tokens, the model "ended" them (stop): useful; summary: cut at 512 (length): not useful
    assert s["per_prompt"]["faq"]["useful_output_tokens"] == 8 * 600
    assert s["per_prompt"]["summary"]["useful_output_tokens"] == 0
    assert s["useful_output_tokens"] == 8 * 600 and s["output_tokens"] == 8 * 600 + 8 * 512
    assert s["output_truncated"] == 8 and s["finish_reasons"] == {"stop": 8, "length": 8}
    assert s["input_truncated"] == 0
    assert s["startup_s"] + s["generation_s"] + s["finishing_s"] <= s["wall_seconds"] + 0.1
    # written again after the diversity report: its time and its warnings are in summary.json
    assert s["report"].endswith("report.md") and isinstance(s["report_warnings"], list)
    report_json = out / "report" / "report.json"
    assert s["finishing_s"] > 0 and (out / "summary.json").stat().st_mtime >= report_json.stat().st_mtime
    assert "process start-up, from the process's own start" in run.stdout
    # counted from the process's start: the interpreter, imports and model set-up come on top
    assert s["process_startup_s"] > s["startup_s"]
    state = json.loads(next((out / "_state").glob("*.json")).read_text())
    assert state["process_startup_s"] >= state["startup_s"]
    assert "useful 4,800" in run.stdout and "summary    output 4,096" in run.stdout
    status = engine_cli("status", str(out), check=True).stdout
    faq_line = next(line for line in status.splitlines() if " faq " in f" {line} ")
    assert "4,800" in faq_line
    assert "useful 4,800 (54%" in status
    card = (out / "README.md").read_text()
    assert "| faq | 8 | 0 | 0 | 4,800 | 4,800 |" in card and "| summary | 8 | 0 | 0 | 4,096 | 0 |" in card
    explained = "useful: finished by the model (finish_reason=stop) with a non-blank generation"
    assert explained in card and explained in status and explained in run.stdout and "repetition" in card


def test_bench_records_useful_throughput_and_ranks_on_it():
    from types import SimpleNamespace

    from engine.bench.driver import OK, metrics
    from engine.bench.report import summarise

    def record(useful, out, tier):
        s = {"wall_seconds": 100.0, "output_tokens": out, "useful_output_tokens": useful, "input_tokens": 10,
             "requests_generated": 10, "prompts": ["faq"], "prefix_cache_hit_rate": 0.0, "failed": 0,
             "repetition_stopped": 2, "output_truncated": 1}
        r = metrics({"summary": s, "gpus": 2, "startup_s": 1, "warmup_s": 1, "device": "GPU"}, 2.0)
        return {**r, "model": "m", "tier": tier, "outcome": OK, "key": tier, "knobs": tier}
    fast_loops, slower_useful = record(1000, 90_000, "baseline"), record(40_000, 60_000, "t1")
    assert fast_loops["output_tok_s_gpu"] == 450.0 and fast_loops["useful_tok_s_gpu"] == 5.0
    assert slower_useful["useful_gpu_hours_per_b"] == float(f"{1e9 / 200.0 / 3600:.4g}")  # 200 useful tok/s/GPU
    sweep = SimpleNamespace(models=[SimpleNamespace(label="m", quality=None, reference={})],
                            tiers=[SimpleNamespace(name="t1")])
    (row,) = summarise(sweep, [fast_loops, slower_useful], 2.0)
    assert row["best"]["tier"] == "t1" and row["score"] == "useful_tok_s_gpu"  # useful, not raw, decides
