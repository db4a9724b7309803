"""One started backend serving several runs' request streams, oldest first: a worker's units (engine/worker.py).

A worker claims its next unit while the current one still generates, so the backend never drains between
units. Each unit's `run.Run` gets a `RelayClient` as its backend: `generate(requests, stop)` hands the run's
request iterator to the relay and yields that run's completions. The relay's thread runs the real backend's
`generate` over one merged iterator that pulls from the oldest stream that still has requests, then the next:
so the tail of unit k (its last requests in flight) runs beside the first requests of unit k+1.

Keys: each request gets a relay-wide key on its way in (the runs' collectors count from 0 each), and its
completion goes back to its run under the run's own key. A run whose `stop` is set is pulled from no more and
its completions still in flight are dropped (they were never journaled: the unit's next holder generates them).
The merged iterator ends when no stream has requests ready to give, unless one is expected (`expect`: the worker
claimed the next unit and its run is starting), then it waits for it; once it ends, the backend finishes what is
in flight and returns, and the relay calls it again when a stream arrives (only when no next unit was claimed).
A backend that fails ends every client's `generate` with its error.
"""
from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Iterator

from engine.types import Completion, Request

_END = object()


class _Stream:
    def __init__(self, rank: int, requests: Iterator[Request], stop: threading.Event):
        self.rank, self.requests, self.stop = rank, requests, stop
        self.out: queue.Queue = queue.Queue()
        self.exhausted = False
        self.in_flight = 0
        self.ended = False


class Relay:
    """See the module doc. `backend` is started; the relay never starts or closes it."""

    def __init__(self, backend, on_exhausted=None):
        self.backend = backend
        self.on_exhausted = on_exhausted  # called with a client's rank once the backend pulled its last request
        self.name = getattr(backend, "name", "relay")
        self.cv = threading.Condition()
        self.streams: list[_Stream] = []
        self.keys = itertools.count()
        self.owner: dict[int, tuple[_Stream, int]] = {}
        self.stop = threading.Event()  # abort: the real backend stops what is in flight
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.ranks = itertools.count()
        self.expect_until = 0.0  # a stream is coming (the worker claimed the next unit): the pull waits for it

    def client(self) -> RelayClient:
        """The backend a unit's run gets; streams of earlier clients are pulled first."""
        return RelayClient(self, next(self.ranks))

    # ---- the clients' side -------------------------------------------------------------------------------
    def serve(self, rank: int, requests: Iterator[Request], stop: threading.Event) -> Iterator[list[Completion]]:
        stream = _Stream(rank, iter(requests), stop)
        with self.cv:
            if self.error is not None:
                raise self.error
            self.streams.append(stream)
            self.streams.sort(key=lambda s: s.rank)
            self.expect_until = 0.0
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="engine-relay", daemon=True)
                self.thread.start()
            self.cv.notify_all()
        try:
            while True:
                try:
                    item = stream.out.get(timeout=0.2)
                except queue.Empty:
                    if stop.is_set() or self.stop.is_set():
                        return
                    continue
                if item is _END:
                    if self.error is not None:
                        raise self.error
                    return
                yield item
        finally:
            with self.cv:
                stream.ended = True
                if stream in self.streams:
                    self.streams.remove(stream)

    def expect(self, seconds: float) -> None:
        """A stream is coming within `seconds` (the next unit, claimed while this one still generates): until it
        arrives the backend's pull waits for it rather than end its pass, so the batch does not drain."""
        with self.cv:
            self.expect_until = time.monotonic() + seconds
            self.cv.notify_all()

    def close(self) -> None:
        """No more streams: the thread ends (what is in flight is finished first unless `stop` is set)."""
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join()

    # ---- the backend's side ------------------------------------------------------------------------------
    closed = False

    def _ready(self) -> _Stream | None:
        for s in self.streams:
            if not s.exhausted and not s.stop.is_set() and not s.ended:
                return s
        return None

    def _merged(self) -> Iterator[Request]:
        while not self.stop.is_set():
            with self.cv:
                stream = self._ready()
                while stream is None and time.monotonic() < self.expect_until and not self.stop.is_set():
                    self.cv.wait(min(0.05, max(0.0, self.expect_until - time.monotonic())))
                    stream = self._ready()
            if stream is None:
                return
            try:
                request = next(stream.requests)
            except StopIteration:
                with self.cv:
                    stream.exhausted = True
                    if stream.in_flight == 0:
                        stream.out.put(_END)
                if self.on_exhausted is not None:
                    self.on_exhausted(stream.rank)
                continue
            key = next(self.keys)
            with self.cv:
                self.owner[key] = (stream, request.key)
                stream.in_flight += 1
            yield dataclasses.replace(request, key=key)

    def _run(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.closed and not self.stop.is_set() and self._ready() is None:
                        self.cv.wait(0.2)
                    if self.stop.is_set() or (self.closed and self._ready() is None):
                        return
                for completions in self.backend.generate(self._merged(), self.stop):
                    self._dispatch(completions)
        except BaseException as exc:  # noqa: BLE001 - the backend failed: every client raises it
            with self.cv:
                self.error = exc
                for s in self.streams:
                    s.out.put(_END)

    def _dispatch(self, completions: list[Completion]) -> None:
        by_stream: dict[int, tuple[_Stream, list[Completion]]] = {}
        with self.cv:
            for c in completions:
                stream, key = self.owner.pop(c.key)
                stream.in_flight -= 1
                c.key = key
                by_stream.setdefault(id(stream), (stream, []))[1].append(c)
            for stream, items in by_stream.values():
                if not stream.ended:
                    stream.out.put(items)
                if stream.exhausted and stream.in_flight == 0:
                    stream.out.put(_END)


class RelayClient:
    """The backend of one unit's run (see Relay): already started; closing it closes nothing."""

    def __init__(self, relay: Relay, rank: int):
        self.relay, self.rank = relay, rank
        self.name = relay.name

    def start(self) -> None:
        pass

    def generate(self, requests: Iterator[Request], stop: threading.Event) -> Iterator[list[Completion]]:
        return self.relay.serve(self.rank, requests, stop)

    def close(self) -> None:
        pass
