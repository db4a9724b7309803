"""`engine status` says what happened in plain words (engine/output/status.py): labelled columns (per prompt
left of `|`, per shard right of it), an ETA only on a running shard, "done" and "progress" that agree, a
double Ctrl-C shown as interrupted (not "killed or crashed"), a process that left no status shown as such.
The states are those a real 2-shard run wrote, then set as a later process would have left them."""
from __future__ import annotations

import re
import socket
import time

import orjson
import pytest
from conftest import engine_main, sample_docs, write_config, write_jsonl

from engine.output.record import read_states, write_state
from engine.output.status import render_status

PROMPTS = ["faq", "math"]


@pytest.fixture
def two_shards(tmp_path, tiny_model):
    """A 2-shard output, both shards complete (the instant backend)."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(12))], out,
                       prompts=PROMPTS)
    for i in range(2):
        assert engine_main("run", str(cfg), "--shard", f"{i}/2").returncode == 0
    return out


def _set(out, tag_index: int, **fields):
    """Shard `tag_index`'s state as a later process left it: not complete, with these fields."""
    st = sorted(read_states(out), key=lambda s: s.shard)[tag_index]
    st.complete = False
    st.rates.requests_per_s = 5.0  # it was moving: an ETA could be computed, and must not be shown stopped
    st.rates.output_tokens_per_s = 40.0
    for k, v in fields.items():
        setattr(st, k, v)
    write_state(out, st)
    return st.shard


def _row(text: str, tag: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(tag))


def _columns(line: str) -> list[str]:
    """The per-shard columns of a shard's first line (right of `|`): input rows, rejected, out tok, tok/s, ETA."""
    return line.split("|", 1)[1].split()


def test_the_header_labels_per_prompt_and_per_shard_columns(two_shards):
    text, complete = render_status(two_shards)
    assert complete
    assert "columns left of | are per prompt, right of it per shard" in text
    header = text.splitlines()[1]
    left, right = header.split("|")
    assert left.split() == ["shard", "prompt", "stored", "failed", "useful", "tok"]
    assert right.split()[:3] == ["input", "rows", "rejected"] and "ETA" in right
    assert text.splitlines()[-1].startswith("2/2 shards complete, 0 running, 0 stopped")
    assert "useful: finished by the model" in text  # what "useful" means, where it is shown


def test_a_double_ctrl_c_is_interrupted_and_a_stopped_shard_has_no_eta(two_shards):
    tag = _set(two_shards, 1, exit_status=3, ended_at=time.time())
    text, complete = render_status(two_shards)
    assert not complete
    line = _row(text, tag)
    assert "stopped (exit 3, interrupted)" in line and "killed or crashed" not in text, text
    cols = _columns(line)  # input rows, rejected, out tok, then straight to "updated": no tok/s, no ETA
    assert re.fullmatch(r"\d+s", cols[3]) and cols[4] == "ago", line
    assert text.splitlines()[-1].startswith("1/2 shards complete, 0 running, 1 stopped"), text
    assert "ETA -" in text.splitlines()[-1]


def test_a_process_that_left_no_status_is_named_killed_or_crashed(two_shards):
    tag = _set(two_shards, 0, exit_status=None, ended_at=None)
    line = _row(render_status(two_shards)[0], tag)
    assert "stopped (killed or crashed: no exit status recorded)" in line, line


def test_a_running_shard_shows_its_rate_and_an_eta_and_progress_agrees_with_done(two_shards):
    tag = _set(two_shards, 0, input_rows=24)  # 24 rows x 2 prompts = 48 requests, 12 stored per prompt
    st = next(s for s in read_states(two_shards) if s.shard == tag)
    lease = {"host": "another-host", "pid": 1, "heartbeat": time.time(), "timeout": 600.0, "token": "t",
             "since": time.time()}
    (two_shards / "_lease").mkdir(exist_ok=True)
    (two_shards / "_lease" / f"{tag}.json").write_bytes(orjson.dumps(lease))
    assert socket.gethostname() != "another-host"
    text, complete = render_status(two_shards)
    assert not complete
    line = _row(text, tag)
    assert line.rstrip().endswith("running"), line
    cols = _columns(line)
    assert cols[0] == "24" and cols[3] == "40"
    left = 24 * len(PROMPTS) - st.stored
    assert cols[4] == f"{left / 5.0 / 60:.0f}m", line  # ETA from the requests still to do at the shard's rate
    assert text.splitlines()[-1].startswith("1/2 shards complete, 1 running, 0 stopped"), text
    lines = text.splitlines()
    first = lines.index(line)
    mine = [lines[first][len(tag):]] + lines[first + 1:first + len(PROMPTS)]  # the shard's prompt lines
    per_prompt = {x.split()[0]: int(x.split()[1].replace(",", "")) for x in mine}
    assert per_prompt == {p: c.done for p, c in st.prompts.items()}
    assert sum(per_prompt.values()) == st.stored  # the "stored" column is the progress the ETA counts from
