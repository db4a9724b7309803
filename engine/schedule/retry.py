"""Retries with exponential backoff, between the scheduler and the backend.

A completion with finish_reason "error" goes back into a waiting heap, due after
`backoff_seconds * 2**(attempt-1)`; the backend pulls due retries before new requests. After
`max_attempts` tries the error is final: the collector (collect.py) stores it as a row with finish_reason "error"
(it counts as done, so a resumed run does not retry it forever). Failures that come back after the
backend has drained its input are served by another pass over this feed (see Run.execute).
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Iterator

from engine.types import Request


class RetryFeed:
    def __init__(self, source: Iterator[Request], max_attempts: int, backoff_seconds: float,
                 stop: threading.Event):
        self.source, self.max_attempts, self.backoff, self.stop = source, max_attempts, backoff_seconds, stop
        self.waiting: list[tuple[float, int, Request]] = []
        self.attempts: dict[int, int] = {}
        self.seq = itertools.count()
        self.exhausted = False

    def retry(self, request: Request) -> bool:
        """Schedule another try; False when the request has used all its attempts."""
        n = self.attempts.get(request.key, 1)
        if n >= self.max_attempts:
            self.attempts.pop(request.key, None)
            return False
        self.attempts[request.key] = n + 1
        heapq.heappush(self.waiting, (time.monotonic() + self.backoff * 2 ** (n - 1), next(self.seq), request))
        return True

    def succeeded(self, key: int) -> None:
        self.attempts.pop(key, None)

    @property
    def pending(self) -> bool:
        return bool(self.waiting) or not self.exhausted

    def __iter__(self) -> Iterator[Request]:
        while not self.stop.is_set():
            if self.waiting and self.waiting[0][0] <= time.monotonic():
                yield heapq.heappop(self.waiting)[2]
            elif not self.exhausted:
                try:
                    yield next(self.source)
                except StopIteration:
                    self.exhausted = True
            elif self.waiting:
                self.stop.wait(min(0.2, max(0.0, self.waiting[0][0] - time.monotonic())))
            else:
                return
