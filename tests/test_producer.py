"""engine/schedule/producer.py in-process: one Pending request per (document, prompt) not yet done, rejected
and duplicate rows handed to the rejected stream once, length buckets inside a look-ahead window, counts,
and an input error raised in the consumer."""
from __future__ import annotations

import threading

import pytest
from conftest import sample_docs, write_jsonl

from engine.config.run_config import SchedulerConfig
from engine.errors import InputError
from engine.ids import DoneSet, id_hash
from engine.input.reader import Reader
from engine.metrics import Counters
from engine.render.prompts import load_prompts
from engine.render.renderer import Renderer
from engine.schedule.producer import Producer
from engine.types import REJECTED


@pytest.fixture(scope="module")
def renderer(tiny_model):
    from transformers import AutoTokenizer

    return Renderer(AutoTokenizer.from_pretrained(tiny_model), load_prompts(["faq", "math"]), 1024, 16)


def produce(renderer, path, done=None, lookahead=2048, buckets=True, stop=None):
    reader = Reader([str(path)], "text", "id", 4, 100_000)
    reader.preflight()
    rejected, counters = [], Counters()
    done = done or {}
    done = {p: done.get(p, DoneSet()) for p in ("faq", "math", REJECTED)}
    prod = Producer(reader, renderer, done, rejected.extend, counters, stop or threading.Event(),
                    SchedulerConfig(lookahead=lookahead, length_buckets=buckets))
    prod.start()
    return list(prod), rejected, counters


def test_one_request_per_document_and_prompt_with_its_document(renderer, tmp_path):
    docs = sample_docs(6)
    out, rejected, counters = produce(renderer, write_jsonl(tmp_path / "in.jsonl", docs))
    assert sorted((p.doc.id, p.request.prompt) for p in out) == sorted((d["id"], q) for d in docs
                                                                      for q in ("faq", "math"))
    assert len({p.request.key for p in out}) == 12 and not rejected and counters.requests_skipped == 0
    for p in out:
        prefix = renderer.rendered[p.request.prompt].prefix_ids
        assert tuple(p.request.input_ids[:len(prefix)]) == prefix and p.request.prefix_len == len(prefix)
        assert p.doc.source.startswith("in.jsonl:") and p.doc.columns["url"].startswith("https://")


def test_what_is_done_is_skipped_per_prompt(renderer, tmp_path):
    docs = sample_docs(5)
    done = {"faq": DoneSet([id_hash(d["id"]) for d in docs[:3]]), "math": DoneSet([id_hash(docs[0]["id"])])}
    out, _, counters = produce(renderer, write_jsonl(tmp_path / "in.jsonl", docs), done=done)
    got = sorted((p.doc.id, p.request.prompt) for p in out)
    assert got == sorted([(d["id"], "faq") for d in docs[3:]] + [(d["id"], "math") for d in docs[1:]])
    assert counters.requests_skipped == 4


def test_bad_and_duplicate_rows_are_rejected_once(renderer, tmp_path):
    docs = sample_docs(4)
    rows = [docs[0], {"id": "empty", "text": ""}, docs[1], dict(docs[0])]  # the last repeats docs[0]'s id
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out, rejected, counters = produce(renderer, path)
    assert sorted({p.doc.id for p in out}) == [docs[0]["id"], docs[1]["id"]]
    reasons = {r.source: r.reason for r in rejected}
    assert set(reasons) == {"in.jsonl:1", "in.jsonl:3"} and "duplicate id" in reasons["in.jsonl:3"]
    assert counters.rejected == 2 and counters.requests_skipped == 2 * 2  # each rejected row, every prompt
    # a rejected row already stored (an earlier run) is not stored again
    again, rejected2, _ = produce(renderer, path, done={REJECTED: DoneSet([id_hash("in.jsonl:1")])})
    assert [r.source for r in rejected2] == ["in.jsonl:3"]


def test_length_buckets_order_each_window(renderer, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", sample_docs(12))
    out, _, _ = produce(renderer, path, lookahead=8)
    windows = [out[i:i + 8] for i in range(0, len(out), 8)]
    for w in windows:
        keys = [(p.request.prompt, len(p.request.input_ids)) for p in w]
        assert keys == sorted(keys)
    plain, _, _ = produce(renderer, path, lookahead=8, buckets=False)
    assert [(p.doc.id, p.request.prompt) for p in plain] == [(d["id"], q) for d in sample_docs(12)
                                                            for q in ("faq", "math")]


def test_document_first_sends_a_documents_prompts_together_and_buckets_the_documents(tiny_model, tmp_path):
    """render.layout = "document_first": inside each window the documents are ordered by length and each
    document's prompts follow each other, every one with the whole header + document as its shared prefix."""
    from transformers import AutoTokenizer

    prompts = load_prompts(["faq", "math"], "document_first")
    renderer = Renderer(AutoTokenizer.from_pretrained(tiny_model), prompts, 1024, 16)
    path = write_jsonl(tmp_path / "in.jsonl", sample_docs(12))
    out, _, _ = produce(renderer, path, lookahead=8)
    for w in (out[i:i + 8] for i in range(0, len(out), 8)):
        assert [p.doc.id for p in w[0::2]] == [p.doc.id for p in w[1::2]]  # a document's two prompts, adjacent
        lengths = [p.request.prefix_len for p in w[0::2]]
        assert lengths == sorted(lengths)
    for a, b in zip(out[0::2], out[1::2]):
        assert a.request.input_ids[:a.request.prefix_len] == b.request.input_ids[:b.request.prefix_len]
        suffix = renderer.rendered[a.request.prompt].suffix_ids
        assert a.request.prefix_len == len(a.request.input_ids) - len(suffix)


def test_an_input_error_is_raised_in_the_consumer(renderer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "in.jsonl", sample_docs(3))

    def broken(self):
        raise InputError(f"{path}: row 2: the file changed while it was read")
        yield  # a generator

    monkeypatch.setattr(Reader, "batches", broken)
    with pytest.raises(InputError, match="row 2"):
        produce(renderer, path)


def test_a_stop_ends_the_stream(renderer, tmp_path):
    stop = threading.Event()
    stop.set()
    out, _, _ = produce(renderer, write_jsonl(tmp_path / "in.jsonl", sample_docs(50)), stop=stop)
    assert out == []
