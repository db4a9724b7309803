"""The one quality gate (engine/gate.py) and every place that counts with it: a whitespace-only "stop" row is
useful nowhere — not in the writer's report (the summary's useful tokens), not in the stored counts (state
file), not in `engine status`, not on the dataset card. (mix and export: tests/test_handoff.py.)"""
from __future__ import annotations

import orjson
import pyarrow as pa
import pytest

from engine.collect import RowBuilder
from engine.config.run_config import OutputConfig
from engine.gate import EMPTY, FAILED, REPEATED, TRUNCATED, UNKNOWN, passes_gate, rejection, useful_mask
from engine.metrics import Counters, Tally
from engine.output.card import render_card
from engine.output.layout import REJECTED, REJECTED_SCHEMA, shard_tag
from engine.output.record import ProcessFigures, Rates, ShardState, ShardTotals, read_states, write_state
from engine.output.sinks import ShardSinks
from engine.output.status import render_status
from engine.output.writer import AsyncWriter, Flushed, Written
from engine.schedule.producer import Pending
from engine.types import Completion, Doc, Request

BLANKS = ["", " ", "  \n\t ", "\u00a0\u2003\n", "\r\n", "\u3000"]


@pytest.mark.parametrize("text", BLANKS + [None])
def test_a_blank_stop_row_is_not_useful(text):
    assert not passes_gate("stop", text)
    assert rejection("stop", text) == EMPTY


def test_reasons_and_keep_truncated():
    assert passes_gate("stop", " a ")
    assert rejection("error", "text") == FAILED
    assert rejection("length", "text") == TRUNCATED and rejection("length", "text", keep_truncated=True) is None
    assert rejection("repetition", "x") == REPEATED and rejection("repetition", "x", keep_truncated=True) is None
    assert rejection("length", "  ", keep_truncated=True) == EMPTY  # kept cut-off rows still need text
    assert rejection("weird", "text") == UNKNOWN
    assert not passes_gate("length", "text")  # kept with --keep-truncated, but never *useful*


def test_the_column_form_agrees_with_the_row_form():
    whitespace = [chr(c) for c in range(0x3100) if chr(c).isspace()] + ["\u200b", "\ufeff", "x", "é"]
    texts = [w * 2 for w in whitespace] + BLANKS + [None, " ok ", "\u200bok"]
    reasons = ["stop", "length", "repetition", "error", None]
    rows = [(r, t) for r in reasons for t in texts]
    mask = useful_mask(pa.array([r for r, _ in rows], pa.string()), pa.array([t for _, t in rows], pa.string()))
    assert mask.to_pylist() == [passes_gate(r, t) for r, t in rows]


class FakeTokenizer:
    """RowBuilder decodes token ids with `tokenizer.backend_tokenizer.decode_batch`."""

    class backend_tokenizer:  # noqa: N801 - the attribute name transformers uses
        @staticmethod
        def decode_batch(ids, skip_special_tokens=True):
            return [" " * len(x) for x in ids]  # blank text from ids: the gate must read the decoded text


def _pending(i: int, prompt: str = "faq") -> Pending:
    doc = Doc(f"d{i}", f"document {i}", f"in.jsonl:{i}", {})
    return Pending(doc, False, Request(i, prompt, [1, 2, 3], 1, 16))


def test_a_blank_stop_row_is_useful_nowhere(tmp_path):
    out, tag = tmp_path, shard_tag(0, 1)
    (out / "_run").mkdir()
    (out / "_run" / "fingerprint.json").write_bytes(orjson.dumps(
        {"model": "m", "prompts": {"faq": "abc"}, "shard_count": 1, "sampling": {}}))
    sinks = ShardSinks.open(out, tag, ["faq"], None, OutputConfig())
    builders = {"faq": RowBuilder("faq", "m", FakeTokenizer(), sinks.schema, sinks.renames),
                REJECTED: lambda items: pa.RecordBatch.from_pylist([], schema=REJECTED_SCHEMA)}
    writer = AsyncWriter(sinks, builders, queue_size=8, flush_seconds=60)
    writer.start()
    writer.put("faq", [
        (_pending(0), Completion(0, "stop", text="A real answer.", completion_tokens=5)),
        (_pending(1), Completion(1, "stop", text="  \n\t ", completion_tokens=7)),  # whitespace only
        (_pending(2), Completion(2, "stop", output_ids=[4, 5, 6], completion_tokens=3)),  # decodes to blanks
        (_pending(3), Completion(3, "length", text="cut off", completion_tokens=11)),
    ])
    writer.close()
    reports = writer.drain()
    written = [r for r in reports if isinstance(r, Written)]
    assert [w.tally for w in written] == [{"stop": Tally(3, 15, 5), "length": Tally(1, 11, 0)}]
    counters = Counters()
    counters.add_stored("faq", written[0].tally)
    assert counters.useful_tokens == 5  # the summary's useful output tokens

    final = reports[-1]
    assert isinstance(final, Flushed) and final.final
    figures = final.stored.per_prompt()["faq"]
    assert figures.useful_tokens == 5 and figures.output_tokens == 26 and figures.done == 4
    # the state file, engine status and the card, from that record
    this = ProcessFigures(requests=4, output_tokens=26)
    write_state(out, ShardState(tag, 4, final.stored.per_prompt(), 0, True, ShardTotals().plus(this, 4, 26), this,
                                Rates(useful_output_tokens=counters.useful_tokens)))
    (state,) = read_states(out)
    assert state.prompts["faq"].useful_tokens == 5
    text, complete = render_status(out)
    assert complete and "useful 5 (19%)" in text
    card = render_card(out)
    assert "| faq | 4 | 0 | 0 | 26 | 5 |" in card and "useful (" in card

    # recovered from the parts: the same count (the gate reads the stored generation column)
    again = ShardSinks.open(out, tag, ["faq"], None, OutputConfig())
    assert again.snapshot().per_prompt()["faq"].useful_tokens == 5


def test_a_low_useful_share_says_why():
    from engine.gate import useful_notes

    notes = useful_notes({"faq": {"stop": 19, "length": 21}, "math": {"stop": 38, "length": 2},
                          "table": {"stop": 5, "repetition": 3}}, used={"faq": 256, "math": 256, "table": 1024},
                         recommended={"faq": 1024, "math": 1024, "table": 1024})
    assert notes[0] == ("faq: 21 of 40 rows cut at max_new_tokens = 256; the prompt recommends 1024: raise "
                        "sampling.max_new_tokens, or leave it unset to use each prompt's own")
    assert len(notes) == 2 and notes[1].startswith("table: 3 of 8 rows stopped in a repetition loop")
    assert useful_notes({"faq": {}}, {}, {}) == []
