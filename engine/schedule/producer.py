"""The scheduler's producer: everything before the backend, on a background thread.

    reader batches -> drop duplicate ids and rejected rows -> skip what is done -> tokenise each
    document once -> render a request per (document, prompt) -> length-bucket a look-ahead window
    (document-major in render.layout = "document_first": a document's prompts back to back)
    -> a bounded queue of Pending (request + its document) that the collector admits in flight as the
    backend pulls (collect.py, through schedule/retry.py's RetryFeed)

The Rust tokenizer releases the GIL, so this thread overlaps tokenising with generation.
"""
from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from engine.config.run_config import DOCUMENT_FIRST, SchedulerConfig
from engine.ids import DoneSet, SeenIds, id_hash
from engine.input.reader import Reader
from engine.metrics import Counters
from engine.render.renderer import Renderer
from engine.schedule.buckets import length_buckets
from engine.types import REJECTED, Doc, Rejection, Request

_END = object()


@dataclass(slots=True)
class Pending:
    """A request handed to the backend, with the document it came from (kept for the output row)."""
    doc: Doc
    truncated: bool
    request: Request


def _request(p: Pending) -> Request:
    return p.request


class Producer:
    """Reader -> Pending requests on a background thread (see the module doc); iterate it to pull them."""

    def __init__(self, reader: Reader, renderer: Renderer, done: dict[str, DoneSet],
                 reject: Callable[[list[Rejection]], None], counters: Counters, stop: threading.Event,
                 scheduler: SchedulerConfig):
        """`done`: what is stored per prompt (and per REJECTED source), `reject`: where newly rejected rows go
        (the writer's REJECTED stream); one request per (document, prompt of `renderer`)."""
        self.reader, self.renderer, self.prompts, self.done = reader, renderer, list(renderer.rendered), done
        self.reject, self.counters, self.stop = reject, counters, stop
        self.lookahead, self.buckets = scheduler.lookahead, scheduler.length_buckets
        self.document_major = renderer.layout == DOCUMENT_FIRST  # a document's prompts share its prefix
        self.queue: queue.Queue = queue.Queue(maxsize=scheduler.prefetch_batches)
        self.keys = itertools.count()
        self.thread = threading.Thread(target=self._run, name="engine-producer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            seen = SeenIds()
            window: list[Pending] = []
            for batch in self.reader.batches():
                if self.stop.is_set():
                    return
                window.extend(self._requests(batch, seen))
                if len(window) >= self.lookahead:
                    if not self._put(length_buckets(window, self.buckets, _request, self.document_major)):
                        return
                    window = []
            if window:
                self._put(length_buckets(window, self.buckets, _request, self.document_major))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._put(exc)
        finally:
            self._put(_END)

    def _requests(self, batch, seen: SeenIds) -> list[Pending]:
        rejected = list(batch.rejected)
        docs: list[Doc] = []
        hashes = []
        batch_hashes = [id_hash(d.id) for d in batch.docs]
        for d, h, first in zip(batch.docs, batch_hashes, seen.first_time(batch_hashes)):
            if first:
                docs.append(d)
                hashes.append(h)
            else:
                rejected.append(Rejection(d.source, d.id, "duplicate id: an earlier row has the same id"))
        n_prompts = len(self.prompts)
        if rejected:
            self.counters.rejected += len(rejected)
            new = [r for r in rejected if not self.done[REJECTED].has(id_hash(r.source))]
            if new:
                self.reject(new)
            self.counters.skipped(len(rejected) * n_prompts)
        if not docs:
            return []
        hashes = np.array(hashes, dtype=np.uint64)
        todo = {p: ~self.done[p].contains(hashes) for p in self.prompts}
        need = np.zeros(len(docs), dtype=bool)
        for mask in todo.values():
            need |= mask
        skipped = int(sum((~m).sum() for m in todo.values()))
        if skipped:
            self.counters.skipped(skipped)
        idx = np.flatnonzero(need)
        if not len(idx):
            return []
        encoded = self.renderer.encode_documents([docs[i].text for i in idx])
        out = []
        for i, doc_ids in zip(idx, encoded):
            doc = docs[i]
            for p in self.prompts:
                if not todo[p][i]:
                    continue
                ids, truncated = self.renderer.request_ids(p, doc.text, doc_ids)
                key = next(self.keys)
                r = self.renderer.rendered[p]
                out.append(Pending(doc, truncated, Request(key, p, ids, self.renderer.prefix_len(p, ids),
                                                           r.max_new_tokens)))
        return out

    def __iter__(self) -> Iterator[Pending]:
        while True:
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item


