"""The collector: what is in flight, and what comes back from the backend, joined to its documents.

    producer (Pending: document + request) -> Collector.admit: noted in flight, the request goes on
    -> RetryFeed (schedule/retry.py: failed requests back in with backoff) -> backend
    -> backend completions -> Collector: a failed one retried, or counted and paired with its document
    -> per prompt, to the writer's queue -> (writer thread) RowBuilder: decode, one Arrow record batch

The collector owns the in-flight map: it adds a request when the backend pulls it and removes it when its
completion is final. A failed request that has used all its tries is stored as a row with finish_reason
"error". Usefulness (engine/gate.py) is judged on the writer thread, where the text is decoded.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa

from engine.config.run_config import RetryConfig
from engine.metrics import Counters
from engine.schedule.producer import Pending
from engine.schedule.retry import RetryFeed
from engine.types import Completion, Rejection, Request


class Collector:
    """Requests in flight, and their completions -> (document, completion) pairs per prompt on the writer's
    queue; counts them. Iterate `requests` to feed the backend (retries first, then new work)."""

    def __init__(self, pending: Iterable[Pending], put: Callable[[str, list], None], counters: Counters,
                 retry: RetryConfig, stop: threading.Event):
        self.put, self.counters = put, counters
        self.in_flight: dict[int, Pending] = {}
        self.feed = RetryFeed(self.admit(pending), retry.max_attempts, retry.backoff_seconds, stop)

    def admit(self, pending: Iterable[Pending]) -> Iterator[Request]:
        for p in pending:
            self.in_flight[p.request.key] = p
            yield p.request

    @property
    def requests(self) -> RetryFeed:
        return self.feed

    @property
    def more(self) -> bool:
        """Work is left: retries waiting, or input not yet read to its end."""
        return self.feed.pending

    def __call__(self, completions: list[Completion]) -> None:
        counters, feed, in_flight = self.counters, self.feed, self.in_flight
        by_prompt: dict[str, list] = {}
        ptoks = ctoks = cached = failed = done = 0
        for c in completions:
            if c.finish_reason == "error" and feed.retry(in_flight[c.key].request):
                counters.retries += 1
                continue
            feed.succeeded(c.key)
            done += 1
            p = in_flight.pop(c.key)
            by_prompt.setdefault(p.request.prompt, []).append((p, c))
            ptoks += c.prompt_tokens
            ctoks += c.completion_tokens
            cached += c.cached_tokens
            if c.finish_reason == "error":
                failed += 1
                counters.last_error = c.error
            counters.truncated += p.truncated
        for prompt, items in by_prompt.items():
            self.put(prompt, items)
        counters.completed(done, ptoks, ctoks, cached, failed)


class RowBuilder:
    """Completions + their documents -> one Arrow record batch of output rows (called on the writer thread,
    so decoding token ids costs the generating thread nothing)."""

    def __init__(self, prompt: str, model: str, tokenizer, schema: pa.Schema, renames: dict[str, str]):
        self.prompt, self.model, self.schema, self.renames = prompt, model, schema, renames
        self.fast = tokenizer.backend_tokenizer

    def __call__(self, items: list[tuple[Pending, Completion]]) -> pa.RecordBatch:
        to_decode = [c.output_ids for _, c in items if c.text is None and c.output_ids is not None]
        decoded = iter(self.fast.decode_batch(to_decode, skip_special_tokens=True)) if to_decode else iter(())
        gens = [c.text if c.text is not None else (next(decoded) if c.output_ids is not None else None)
                for _, c in items]
        n = len(items)
        cols = {
            "id": [p.doc.id for p, _ in items], "prompt": [self.prompt] * n, "model": [self.model] * n,
            "generation": gens, "finish_reason": [c.finish_reason for _, c in items],
            "prompt_tokens": [c.prompt_tokens for _, c in items],
            "completion_tokens": [c.completion_tokens for _, c in items],
            "cached_tokens": [c.cached_tokens for _, c in items], "truncated": [p.truncated for p, _ in items],
            "error": [c.error for _, c in items], "doc_ref": [p.doc.source for p, _ in items],
            "text": [p.doc.text for p, _ in items],
        }
        for src, dst in self.renames.items():
            cols[dst] = [p.doc.columns.get(src) for p, _ in items]
        return pa.RecordBatch.from_arrays([pa.array(cols[f.name], type=f.type) for f in self.schema],
                                          schema=self.schema)


class RejectedRows:
    """Rejected input rows -> one Arrow record batch of the rejected stream (doc_ref, id, reason)."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema

    def __call__(self, items: list[Rejection]) -> pa.RecordBatch:
        return pa.RecordBatch.from_pydict({"doc_ref": [r.source for r in items], "id": [r.id for r in items],
                                           "reason": [r.reason for r in items]}, schema=self.schema)
