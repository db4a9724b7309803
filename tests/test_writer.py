"""engine/output/writer.py and sinks.py in-process: the writer thread reports what it stored through its
queue (never calling back), flushes on its interval, commits at close, hands its errors to the caller;
a shard's sinks recover journaled rows after a crash, drop error rows for --retry-errors and count duplicates."""
from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import wait_for

from engine.config.run_config import OutputConfig
from engine.errors import WriterError
from engine.ids import id_hash
from engine.metrics import Tally
from engine.output.layout import REJECTED, REJECTED_SCHEMA, result_schema
from engine.output.sinks import ShardSinks
from engine.output.writer import AsyncWriter, Flushed, Written

TAG = "s00000-of-00001"
SCHEMA = result_schema(None)


def rows(ids, reason="stop", text="an answer", tokens=4) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([
        {"id": i, "prompt": "faq", "model": "m", "generation": text, "finish_reason": reason, "prompt_tokens": 2,
         "completion_tokens": tokens, "cached_tokens": 1, "truncated": False, "error": None, "doc_ref": f"f:{i}",
         "text": "src"} for i in ids], schema=SCHEMA)


def open_sinks(out, drop_errors=False, prompts=("faq",)) -> ShardSinks:
    return ShardSinks.open(out, TAG, list(prompts), None, OutputConfig(), drop_errors=drop_errors)


def builders():
    # the items put on the queue are ready record batches here (RowBuilder is tested in test_collect.py)
    return {"faq": lambda items: items[0], REJECTED: lambda items: pa.RecordBatch.from_pylist(items,
                                                                                            schema=REJECTED_SCHEMA)}


def test_the_writer_reports_what_it_stored_and_commits_at_close(tmp_path):
    sinks = open_sinks(tmp_path)
    w = AsyncWriter(sinks, builders(), queue_size=4, flush_seconds=0.05)
    w.start()
    w.put("faq", [rows(["a", "b"])])
    w.put(REJECTED, [{"doc_ref": "f:9", "id": None, "reason": "empty"}])
    seen: list = []
    wait_for(lambda: seen.extend(w.drain()) or any(isinstance(r, Flushed) and r.stored.stored() == 2 for r in seen),
             "a flush report that counts both rows", 60)
    assert not list((tmp_path / "faq").glob("*.parquet"))  # journaled, not committed yet
    w.put("faq", [rows(["c"], reason="length")])
    w.close()
    seen += w.drain()
    written = [r for r in seen if isinstance(r, Written)]
    # rows, completion tokens, useful ones, prompt tokens, of which cached by the backend
    assert [(r.stream, r.tally) for r in written] == [("faq", {"stop": Tally(2, 8, 8, 4, 2)}), (REJECTED, {}),
                                                      ("faq", {"length": Tally(1, 4, 0, 2, 1)})]
    final = seen[-1]
    assert isinstance(final, Flushed) and final.final and final.stored.stored() == 3
    assert final.stored.rejected_rows() == 1
    parts = list((tmp_path / "faq").glob("*.parquet"))
    assert sum(pq.read_metadata(p).num_rows for p in parts) == 3
    assert w.drain() == []  # drained: nothing twice


def test_a_writer_error_reaches_the_caller(tmp_path):
    sinks = open_sinks(tmp_path)
    failing = {"faq": lambda items: (_ for _ in ()).throw(OSError(28, "No space left on device"))}
    w = AsyncWriter(sinks, failing, queue_size=1, flush_seconds=60)
    w.start()
    w.put("faq", [None])
    wait_for(lambda: w.error is not None, "the writer thread to fail", 60)
    with pytest.raises(WriterError, match="No space left"):
        w.put("faq", [None])
    with pytest.raises(WriterError, match="No space left"):
        w.close()


def test_put_blocks_on_a_full_queue_until_the_writer_catches_up(tmp_path):
    sinks = open_sinks(tmp_path)
    gate = threading.Event()

    def slow(items):
        gate.wait(60)
        return items[0]
    w = AsyncWriter(sinks, {"faq": slow}, queue_size=1, flush_seconds=60)
    w.start()
    w.put("faq", [rows(["a"])])  # taken by the thread, which now waits
    wait_for(lambda: w.queue.empty(), "the writer to take the first batch", 60)
    w.put("faq", [rows(["b"])])  # fills the queue
    done = threading.Event()
    threading.Thread(target=lambda: (w.put("faq", [rows(["c"])]), done.set()), daemon=True).start()
    assert not done.wait(0.3)  # back-pressure: the third waits for room
    gate.set()
    assert done.wait(60)
    w.close()
    assert open_sinks(tmp_path).snapshot().stored() == 3


def test_sinks_recover_journaled_rows_after_a_crash(tmp_path):
    a = open_sinks(tmp_path)
    a.streams["faq"].add(rows(["a", "b"]))
    a.streams["faq"].commit()
    a.streams["faq"].add(rows(["c"], reason="error", tokens=0))
    a.streams["faq"].flush(sync=True)  # journaled: then the process dies (no close)
    b = open_sinks(tmp_path)
    assert b.already_done() == 3 and all(b.done["faq"].has(id_hash(i)) for i in "abc")
    snap = b.snapshot()
    assert snap.stored() == 3 and snap.failed() == 1
    assert snap.per_prompt()["faq"].finish_reasons == {"stop": 2, "error": 1}
    for name in b.streams:
        b.streams[name].close()
    c = open_sinks(tmp_path, drop_errors=True)  # --retry-errors: the error row goes, its id is not done
    assert c.dropped == 1 and c.snapshot().stored() == 2 and c.snapshot().failed() == 0
    assert not c.done["faq"].has(id_hash("c")) and c.done["faq"].has(id_hash("a"))


def test_sinks_count_duplicates_and_per_prompt_streams(tmp_path):
    a = open_sinks(tmp_path, prompts=("faq", "math"))
    a.streams["faq"].add(rows(["a", "b"]))
    a.streams["faq"].commit()
    a.streams["faq"].add(rows(["b"]))  # the same id again: two writers before leases
    a.streams["faq"].commit()
    b = open_sinks(tmp_path, prompts=("faq", "math"))
    snap = b.snapshot()
    assert snap.per_prompt()["faq"].duplicates == 1 and snap.stored_per_prompt() == {"faq": 3, "math": 0}
    assert snap.output_tokens() == 12
