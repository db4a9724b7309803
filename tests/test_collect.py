"""engine/collect.py in-process: the collector owns what is in flight (admitted as the backend pulls, removed
when final), retries failures through the retry feed, counts, and hands rows per prompt to the writer;
RowBuilder turns (document, completion) pairs into output rows."""
from __future__ import annotations

import threading

import pyarrow as pa

from engine.collect import Collector, RejectedRows, RowBuilder
from engine.config.run_config import RetryConfig
from engine.metrics import Counters
from engine.output.layout import REJECTED_SCHEMA, result_schema, source_column_names
from engine.schedule.producer import Pending
from engine.types import Completion, Doc, Rejection, Request


def pending(key: int, prompt: str = "faq", truncated: bool = False) -> Pending:
    return Pending(Doc(f"d{key}", f"text {key}", f"in.jsonl:{key}", {"url": f"u{key}"}), truncated,
                   Request(key, prompt, [1, 2, 3], 1, 8))


def make(items, attempts: int = 3):
    put: list[tuple[str, list]] = []
    counters = Counters()
    collect = Collector(items, lambda stream, rows: put.append((stream, rows)), counters,
                        RetryConfig(max_attempts=attempts, backoff_seconds=0.0), threading.Event())
    return collect, put, counters


def test_requests_are_in_flight_from_pull_to_final_completion():
    collect, put, counters = make([pending(0), pending(1, "math", truncated=True), pending(2)])
    feed = iter(collect.requests)
    first, second = next(feed), next(feed)
    assert (first.key, second.key) == (0, 1) and set(collect.in_flight) == {0, 1}  # 2 not pulled yet
    collect([Completion(1, "stop", text="b", prompt_tokens=3, completion_tokens=4, cached_tokens=1),
             Completion(0, "length", output_ids=[5, 6], prompt_tokens=3, completion_tokens=2)])
    assert set(collect.in_flight) == set()
    assert [(s, [(p.doc.id, c.key) for p, c in rows]) for s, rows in put] == [("math", [("d1", 1)]),
                                                                          ("faq", [("d0", 0)])]
    assert (counters.requests_done, counters.prompt_tokens, counters.completion_tokens, counters.cached_tokens,
            counters.truncated, counters.failed) == (2, 6, 6, 1, 1, 0)
    assert next(feed).key == 2 and collect.more
    collect([Completion(2, "stop", text="c")])
    assert list(feed) == [] and not collect.more and not collect.in_flight


def test_a_failure_is_retried_then_stored_as_an_error_row():
    collect, put, counters = make([pending(7)], attempts=2)
    feed = iter(collect.requests)
    assert next(feed).key == 7
    collect([Completion(7, "error", error="boom 1")])
    assert counters.retries == 1 and put == [] and 7 in collect.in_flight  # still in flight: it comes again
    assert next(feed).key == 7
    collect([Completion(7, "error", error="boom 2")])  # its last try: final
    assert counters.failed == 1 and counters.last_error == "boom 2" and counters.requests_done == 1
    assert [c.finish_reason for _, rows in put for _, c in rows] == ["error"] and not collect.in_flight
    assert list(feed) == []


def test_a_retried_request_that_then_succeeds_is_counted_once():
    collect, put, counters = make([pending(1)])
    feed = iter(collect.requests)
    next(feed)
    collect([Completion(1, "error", error="x")])
    next(feed)
    collect([Completion(1, "stop", text="ok", completion_tokens=2)])
    assert (counters.requests_done, counters.failed, counters.retries, counters.completion_tokens) == (1, 0, 1, 2)
    assert len(put) == 1 and list(feed) == []


class Tok:
    class backend_tokenizer:  # noqa: N801 - transformers' attribute name
        @staticmethod
        def decode_batch(ids, skip_special_tokens=True):
            return ["-".join(map(str, x)) for x in ids]


def test_row_builder_decodes_ids_keeps_text_and_passes_source_columns_through():
    source = pa.schema([pa.field("url", pa.string()), pa.field("id", pa.string())])  # "id" clashes: source_id
    schema, renames = result_schema(source), source_column_names(source)
    p0, p1, p2 = pending(0), pending(1), pending(2)
    p1.doc.columns["id"] = "orig-1"
    batch = RowBuilder("faq", "model-x", Tok(), schema, renames)([
        (p0, Completion(0, "stop", output_ids=[1, 2], prompt_tokens=5, completion_tokens=2)),
        (p1, Completion(1, "stop", text="given text", completion_tokens=3)),
        (p2, Completion(2, "error", error="failed")),
    ])
    rows = batch.to_pylist()
    assert [r["generation"] for r in rows] == ["1-2", "given text", None]
    assert [r["id"] for r in rows] == ["d0", "d1", "d2"] and rows[1]["source_id"] == "orig-1"
    assert rows[0]["url"] == "u0" and rows[0]["model"] == "model-x" and rows[0]["doc_ref"] == "in.jsonl:0"
    assert rows[2]["error"] == "failed" and rows[0]["prompt_tokens"] == 5 and batch.schema == schema


def test_rejected_rows():
    batch = RejectedRows(REJECTED_SCHEMA)([Rejection("in.jsonl:3", None, "empty text")])
    assert batch.to_pylist() == [{"doc_ref": "in.jsonl:3", "id": None, "reason": "empty text"}]
