"""Shared machinery of the backends that serve one request per coroutine (in-process SGLang, HTTP).

An asyncio loop runs on its own thread. `generate` (on the caller's thread) keeps up to
`max_in_flight` requests submitted, pulling the next request from the scheduler only when one
finishes, and yields every completion that has arrived since the last yield. So the engine behind
it always has queued work (SGLang's guide: keep 100-2,000 requests waiting) and the input is never
submitted all at once.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator

from engine.errors import BackendDead
from engine.types import Completion, Request


class AsyncWindowBackend:
    name = "async"

    def __init__(self, max_in_flight: int):
        self.max_in_flight = max_in_flight
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.tasks: set[asyncio.Task] = set()  # requests in flight (touched on the loop thread only)

    # Subclasses implement these three coroutines.
    async def astart(self) -> None:
        pass

    async def agenerate(self, req: Request) -> Completion:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass

    def dead(self) -> str | None:
        """Why the engine can serve no more requests, when the subclass knows it without waiting for
        them (SGLang's requests never time out once its scheduler is gone)."""
        return None

    def start(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"engine-{self.name}-loop", daemon=True)
        self.thread.start()
        self._call(self.astart())

    def _call(self, coro, timeout: float | None = None):
        if not self.thread.is_alive():  # the loop died (a BaseException escaped a request): run it here
            return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _submit(self, req: Request, results: queue.Queue) -> None:
        async def one() -> None:
            task = asyncio.current_task()
            self.tasks.add(task)
            try:
                results.put(await self.agenerate(req))
            except BackendDead as exc:
                results.put(exc)
            except Exception as exc:  # noqa: BLE001 - a failed request, retried through the retry feed
                results.put(Completion(req.key, "error", prompt_tokens=len(req.input_ids),
                                       error=f"{type(exc).__name__}: {exc}"))
            finally:
                self.tasks.discard(task)
        asyncio.run_coroutine_threadsafe(one(), self.loop)

    def generate(self, requests: Iterator[Request], stop: threading.Event) -> Iterator[list[Completion]]:
        results: queue.Queue = queue.Queue()
        in_flight, exhausted = 0, False
        while True:
            while not exhausted and not stop.is_set() and in_flight < self.max_in_flight:
                req = next(requests, None)
                if req is None:
                    exhausted = True
                    break
                self._submit(req, results)
                in_flight += 1
            if in_flight == 0 or stop.is_set():
                return  # on stop, requests still in flight are dropped: a resumed run redoes them
            reason = self.dead()
            if reason is None and not self.thread.is_alive():
                reason = "the backend's event loop thread ended with requests in flight (their results never come)"
            if reason is not None:
                raise BackendDead(reason)
            try:
                batch = [results.get(timeout=0.2)]
            except queue.Empty:
                continue  # re-checks stop; a SIGTERM must not wait for slow requests
            while True:
                try:
                    batch.append(results.get_nowait())
                except queue.Empty:
                    break
            in_flight -= len(batch)
            dead = next((b for b in batch if isinstance(b, BackendDead)), None)
            done = [b for b in batch if isinstance(b, Completion)]
            if done:
                yield done
            if dead is not None:
                raise dead

    async def _cancel_in_flight(self) -> None:
        """Cancel every request still in flight and wait for each to unwind (an engine aborts it)."""
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        if self.loop is None:
            return
        try:
            try:
                self._call(self._cancel_in_flight(), timeout=30)
            finally:
                self._call(self.aclose(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop = None
