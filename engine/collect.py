"""The collector: completions back from the backend, joined to their documents, handed to the writer.

    backend completions -> retry a failed one (schedule/retry.py) or count it and pair it with its
    document (schedule/producer.py's pending map) -> per prompt, to the writer's queue
    -> (writer thread) RowBuilder: decode, one Arrow record batch of output rows -> PartSink

A failed request that has used all its tries is stored as a row with finish_reason "error".
"""
from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from engine.metrics import Metrics
from engine.schedule.producer import Pending
from engine.schedule.retry import RetryFeed
from engine.types import USEFUL, Completion, Rejection


class Collector:
    """Completions -> (document, completion) pairs per prompt, put on the writer's queue; counts them."""

    def __init__(self, pending: dict[int, Pending], put: Callable[[str, list], None], metrics: Metrics,
                 feed: RetryFeed):
        self.pending, self.put, self.metrics, self.feed = pending, put, metrics, feed

    def __call__(self, completions: list[Completion]) -> None:
        metrics, feed, pending = self.metrics, self.feed, self.pending
        by_prompt: dict[str, list] = {}
        ptoks = ctoks = cached = failed = 0
        done = 0
        kinds: dict[tuple[str, str], list[int]] = {}  # (prompt, finish reason) -> rows, tokens, useful tokens
        for c in completions:
            if c.finish_reason == "error" and feed.retry(pending[c.key].request):
                metrics.retries += 1
                continue
            feed.succeeded(c.key)
            done += 1
            p = pending.pop(c.key)
            by_prompt.setdefault(p.request.prompt, []).append((p, c))
            ptoks += c.prompt_tokens
            ctoks += c.completion_tokens
            cached += c.cached_tokens
            if c.finish_reason == "error":
                failed += 1
                metrics.last_error = c.error
            metrics.truncated += p.truncated
            kind = kinds.setdefault((p.request.prompt, c.finish_reason), [0, 0, 0])
            kind[0] += 1
            kind[1] += c.completion_tokens
            if c.finish_reason in USEFUL and (c.output_ids if c.text is None else c.text.strip()):
                kind[2] += c.completion_tokens  # what passes the quality gate: finished by the model, not empty
        for prompt, items in by_prompt.items():
            self.put(prompt, items)
        metrics.completed(done, ptoks, ctoks, cached, failed, kinds)


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
