"""engine/output/record.py: the typed record of a shard's figures — state files and summaries round-trip,
older files are read, newer or damaged ones are refused naming the file, and totals add over attempts."""
from __future__ import annotations

import orjson
import pytest

from engine.errors import ExitCode, ResumeError
from engine.metrics import Clock, Counters, Tally
from engine.output.record import (
    SCHEMA_VERSION,
    ProcessFigures,
    ProcessReport,
    PromptFigures,
    Rates,
    RunSummary,
    ShardState,
    ShardTotals,
    SlurmAttempt,
    load_state,
    load_summary,
    read_state,
    read_states,
    state_path,
    write_state,
    write_summary,
)

TAG = "s00000-of-00001"

# A state file as the engine wrote it before schema versions (version 1), trimmed to its keys.
V1_STATE = {
    "shard": TAG, "input_rows": 10, "rejected": 1, "complete": True, "output_tokens": 900,
    "prompts": {"faq": {"done": 9, "failed": 1, "finish_reasons": {"stop": 8, "error": 1}, "output_tokens": 900,
                        "useful_tokens": 800, "duplicates": 0}},
    "elapsed_s": 12.5, "startup_s": 2.0, "generation_s": 9.0, "finishing_s": 1.5, "requests_per_s": 1.0,
    "output_tokens_per_s": 100.0, "useful_output_tokens": 800, "useful_output_tokens_per_s": 88.9,
    "flush_seconds": 2.0, "model": "m", "backend": "torch", "pid_host": "h:1",
    "totals": {"rows": 9, "output_tokens": 900, "attempts": 2, "generation_s": 15.0, "wall_s": 20.0},
    "this_process": {"requests": 5, "output_tokens": 500, "wall_s": 12.5},
    "slurm": {"job_id": "7", "task": "7_0", "restart_count": 1}, "exit_status": 0, "updated_at": 1.0,
}


def _state(**kw) -> ShardState:
    this = ProcessFigures(requests=4, output_tokens=40, wall_s=3.0, startup_s=1.0, generation_s=1.5)
    base = dict(shard=TAG, input_rows=4, prompts={"faq": PromptFigures.of({"stop": Tally(4, 40, 30)})}, rejected=0,
                complete=False, totals=ShardTotals().plus(this, 4, 40), this_process=this,
                rates=Rates(startup_s=1.0, generation_s=1.5, useful_output_tokens=30))
    return ShardState(**{**base, **kw})


def test_state_round_trips_and_carries_its_schema_version(tmp_path):
    st = _state(slurm=SlurmAttempt("9", "9_3", 2), exit_status=ExitCode.INTERRUPTED)
    write_state(tmp_path, st)
    raw = orjson.loads(state_path(tmp_path, TAG).read_bytes())
    assert raw["schema_version"] == SCHEMA_VERSION
    # the flat keys readers and users know: rates at the top level, the shard's output tokens
    assert raw["output_tokens"] == 40 and raw["startup_s"] == 1.0 and raw["prompts"]["faq"]["useful_tokens"] == 30
    back = read_state(tmp_path, TAG)
    assert back == st and back.slurm.task == "9_3" and back.exit_status == ExitCode.INTERRUPTED


def test_a_version_1_state_file_is_read(tmp_path):
    st = ShardState.from_dict(V1_STATE)
    assert st.schema_version == SCHEMA_VERSION and st.prompts["faq"].failed == 1
    assert st.totals.attempts == 2 and st.totals.generation_s == 15.0 and st.output_tokens == 900
    assert st.rates.output_tokens_per_s == 100.0 and st.slurm.restart_count == 1
    older = {k: v for k, v in V1_STATE.items() if k not in ("totals", "this_process", "slurm")}
    st = ShardState.from_dict(older)  # before per-attempt totals: one attempt, its wall clock as generation
    assert st.totals.attempts == 1 and st.totals.generation_s == 12.5 and st.totals.rows == 9


def test_a_newer_state_file_is_refused_naming_it(tmp_path):
    path = state_path(tmp_path, TAG)
    path.parent.mkdir(parents=True)
    path.write_bytes(orjson.dumps({**V1_STATE, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ResumeError, match=r"_state/s00000-of-00001\.json: written by a newer synth-engine") as e:
        read_state(tmp_path, TAG)
    assert e.value.exit_code == ExitCode.CONFIG
    with pytest.raises(ResumeError, match="newer"):
        read_states(tmp_path)


def test_a_damaged_state_file_is_named_by_status_and_ignored_at_resume(tmp_path, caplog):
    path = state_path(tmp_path, TAG)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ResumeError, match=r"s00000-of-00001\.json: damaged state file"):
        load_state(path)
    assert read_state(tmp_path, TAG) is None  # the parts are the truth; the state is written again
    assert "damaged state file" in caplog.text
    path.write_bytes(b"[1, 2]")
    with pytest.raises(ResumeError, match="not a shard state"):
        read_states(tmp_path)
    path.write_bytes(orjson.dumps({"schema_version": 2, "shard": TAG}))  # no prompts
    with pytest.raises(ResumeError, match="not a readable shard state"):
        read_states(tmp_path)


def test_totals_add_over_attempts():
    first = ProcessFigures(requests=5, output_tokens=50, wall_s=10.0, startup_s=2.0, generation_s=7.0,
                           finishing_s=1.0)
    t1 = ShardTotals.before(None).plus(first, rows=5, output_tokens=50)
    assert (t1.attempts, t1.wall_s, t1.rows) == (1, 10.0, 5)
    # the next attempt starts from the state the first left (rows and tokens come from the parts again)
    before = ShardTotals.before(_state(totals=t1))
    assert before.rows == 0 and before.attempts == 1 and before.generation_s == 7.0
    second = ProcessFigures(requests=3, output_tokens=30, wall_s=4.0, startup_s=1.0, generation_s=2.5)
    t2 = before.plus(second, rows=8, output_tokens=80)
    assert (t2.attempts, t2.wall_s, t2.generation_s, t2.startup_s, t2.rows, t2.output_tokens) == \
        (2, 14.0, 9.5, 3.0, 8, 80)


def test_prompt_figures_from_a_tally():
    f = PromptFigures.of({"stop": Tally(3, 30, 20), "error": Tally(1, 0, 0), "length": Tally(2, 64, 0)}, 1)
    assert (f.done, f.failed, f.output_tokens, f.useful_tokens, f.duplicates) == (6, 1, 94, 20, 1)
    assert f.finish_reasons == {"stop": 3, "error": 1, "length": 2}


def test_summary_is_flat_json_and_round_trips(tmp_path):
    c, clock = Counters(), Clock()
    clock.ready()
    c.completed(3, 30, 300, 10, 1)
    c.add_stored("faq", {"stop": Tally(2, 200, 150), "error": Tally(1, 100, 0)})
    clock.generation_done()
    this = ProcessFigures.of(c, clock)
    s = RunSummary(str(tmp_path), TAG, "m", "torch", ["faq"], False, True, 3, {"faq": 3}, ProcessReport.of(c, clock),
                   failed=1, error_rows_removed=0, shard_totals=ShardTotals().plus(this, 3, 300), this_process=this)
    path = write_summary(tmp_path, s, shard_count=1)
    assert path.name == "summary.json"
    d = orjson.loads(path.read_bytes())
    assert d["schema_version"] == SCHEMA_VERSION and d["useful_output_tokens"] == 150 and d["failed"] == 1
    assert d["failed_this_process"] == 1 and d["per_prompt"]["faq"]["finish_reasons"] == {"stop": 2, "error": 1}
    assert d["prefix_cache_hit_rate"] == round(10 / 30, 4) and d["shard_totals"]["attempts"] == 1
    assert "report" not in d and "process" not in d
    assert load_summary(path) == s
    assert write_summary(tmp_path, s, shard_count=4).name == f"summary-{TAG}.json"


def test_a_newer_summary_is_refused(tmp_path):
    path = tmp_path / "summary.json"
    path.write_bytes(orjson.dumps({"schema_version": SCHEMA_VERSION + 5}))
    with pytest.raises(ResumeError, match="summary.json: written by a newer synth-engine"):
        load_summary(path)
