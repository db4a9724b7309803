"""engine/backends/async_window.py in-process, with a fake engine (asyncio coroutines, no server): the window
of requests in flight (never more than max_in_flight, the next request pulled only when one finishes),
completions yielded as they finish, a failed request as an error completion, BackendDead from a request or
from `dead()`, stop, close (in-flight requests cancelled, then aclose) and a loop thread that died.

Each request of the fake waits on its own gate, opened by the test; the test waits for readiness signals
(a request started, a batch yielded, generate returned) under a generous deadline, never for a sleep."""
from __future__ import annotations

import asyncio
import queue
import threading

import pytest

from engine.backends.async_window import AsyncWindowBackend
from engine.errors import BackendDead
from engine.types import Completion, Request

DEADLINE = 30.0  # seconds: only reached when something is broken


def req(key: int) -> Request:
    return Request(key=key, prompt="faq", input_ids=[1, 2, 3, 4], prefix_len=1, max_new_tokens=8)


class Counted:
    """The scheduler's side: requests pulled one at a time, counted."""

    def __init__(self, n: int):
        self.n, self.pulled = n, 0

    def __iter__(self):
        return self

    def __next__(self) -> Request:
        if self.pulled >= self.n:
            raise StopIteration
        self.pulled += 1
        return req(self.pulled - 1)


class FakeEngine(AsyncWindowBackend):
    name = "fake"

    def __init__(self, max_in_flight: int, gated: bool = True, outcomes: dict | None = None):
        super().__init__(max_in_flight)
        self.gated, self.outcomes = gated, outcomes or {}
        self.cond = threading.Condition()
        self.started: list[int] = []
        self.cancelled: list[int] = []
        self.live = self.peak = 0
        self.gates: dict[int, asyncio.Event] = {}  # loop thread only
        self.reason: str | None = None
        self.calls: list[str] = []

    async def astart(self) -> None:
        self.calls.append("astart")

    async def aclose(self) -> None:
        self.calls.append("aclose")

    def dead(self) -> str | None:
        return self.reason

    async def agenerate(self, r: Request) -> Completion:
        gate = self.gates.setdefault(r.key, asyncio.Event())
        with self.cond:
            self.live += 1
            self.peak = max(self.peak, self.live)
            self.started.append(r.key)
            self.cond.notify_all()
        try:
            if self.gated:
                await gate.wait()
            else:
                await asyncio.sleep(0)
            outcome = self.outcomes.get(r.key)
            if isinstance(outcome, BaseException):
                raise outcome
            return Completion(r.key, "stop", output_ids=[7], prompt_tokens=len(r.input_ids), completion_tokens=1)
        except asyncio.CancelledError:
            self.cancelled.append(r.key)
            raise
        finally:
            with self.cond:
                self.live -= 1

    # the test's side
    def release(self, *keys: int) -> None:
        def open_gates():
            for k in keys:
                self.gates.setdefault(k, asyncio.Event()).set()
        self.loop.call_soon_threadsafe(open_gates)

    def wait_started(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.started) >= n, DEADLINE), (n, self.started)


class Consumer:
    """Runs generate() on its own thread, as Run does on the main one; batches and the end come back on a queue."""

    def __init__(self, engine: FakeEngine, requests, stop: threading.Event | None = None):
        self.stop = stop or threading.Event()
        self.out: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(engine, requests), daemon=True)
        self.thread.start()

    def _run(self, engine, requests) -> None:
        try:
            for batch in engine.generate(iter(requests), self.stop):
                self.out.put(batch)
            self.out.put("end")
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.out.put(exc)

    def next(self):
        return self.out.get(timeout=DEADLINE)

    def rest(self) -> tuple[list[int], object]:
        """Keys of every batch until generate ends, and how it ended ("end" or the exception)."""
        keys = []
        while True:
            item = self.next()
            if not isinstance(item, list):
                self.thread.join(DEADLINE)
                return keys, item
            keys += [c.key for c in item]


@pytest.fixture
def engines():
    made: list[FakeEngine] = []

    def make(*args, **kwargs) -> FakeEngine:
        e = FakeEngine(*args, **kwargs)
        e.start()
        made.append(e)
        return e
    yield make
    for e in made:
        if e.loop is not None:
            e.gated = False
            e.close()


def test_start_runs_astart_on_the_loop_and_close_runs_aclose_and_ends_the_thread(engines):
    e = engines(2)
    assert e.calls == ["astart"] and e.thread.is_alive()
    thread = e.thread
    e.close()
    assert e.calls == ["astart", "aclose"]
    assert not thread.is_alive() and e.loop is None
    e.close()  # a second close is a no-op


def test_the_window_holds_max_in_flight_and_pulls_the_next_request_only_when_one_finishes(engines):
    e, source = engines(3), Counted(8)
    c = Consumer(e, source)
    e.wait_started(3)
    assert source.pulled == 3 and e.live == 3, "the window is full and nothing more is pulled"
    e.release(0)
    assert [x.key for x in c.next()] == [0]
    e.wait_started(4)
    assert source.pulled == 4 and e.started[3] == 3
    e.release(*range(1, 8))
    keys, end = c.rest()
    assert end == "end"
    assert sorted([0] + keys) == list(range(8))
    assert e.peak == 3 and source.pulled == 8


def test_many_requests_each_completed_once_within_the_window(engines):
    e, source = engines(8, gated=False), Counted(300)
    keys, end = Consumer(e, source).rest()
    assert end == "end"
    assert sorted(keys) == list(range(300)), "every request once, none lost or doubled"
    assert 1 <= e.peak <= 8


def test_completions_are_yielded_in_the_order_they_finish(engines):
    e = engines(4)
    c = Consumer(e, Counted(4))
    e.wait_started(4)
    e.release(2)
    assert [x.key for x in c.next()] == [2]
    e.release(0)
    assert [x.key for x in c.next()] == [0]
    e.release(3, 1)
    keys, end = c.rest()
    assert sorted(keys) == [1, 3] and end == "end"


def test_a_failed_request_comes_back_as_an_error_completion_and_the_rest_go_on(engines):
    e = engines(2, outcomes={1: ValueError("prompt too long")})
    c = Consumer(e, Counted(3))
    e.wait_started(2)
    e.release(1)
    (err,) = c.next()
    assert err.key == 1 and err.finish_reason == "error"
    assert err.error == "ValueError: prompt too long"
    assert err.prompt_tokens == 4 and err.output_ids is None, "its prompt is counted, its output is none"
    e.release(0, 2)
    keys, end = c.rest()
    assert sorted(keys) == [0, 2] and end == "end", "the other requests go on"


def test_backend_dead_from_a_request_raises_in_the_caller_after_what_finished(engines):
    e = engines(2, outcomes={1: BackendDead("the engine went away")})
    c = Consumer(e, Counted(4))
    e.wait_started(2)
    e.release(0)
    assert [x.key for x in c.next()] == [0], "what finished before is yielded"
    e.release(1)
    _, end = c.rest()
    assert isinstance(end, BackendDead) and "the engine went away" in str(end)


def test_dead_reported_by_the_subclass_raises_without_waiting_for_requests(engines):
    e = engines(3)
    c = Consumer(e, Counted(10))
    e.wait_started(3)
    e.reason = "an SGLang process died"
    keys, end = c.rest()  # the requests never finish: only dead() ends this
    assert keys == [] and isinstance(end, BackendDead) and str(end) == "an SGLang process died"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_loop_thread_that_died_raises_in_the_caller_and_close_still_runs_aclose(engines):
    """A BaseException that escapes a request (SystemExit here) ends the loop's thread: the results of the
    requests in flight never come. generate raises BackendDead instead of waiting forever, and close()
    runs the cleanup on the caller's thread instead of waiting on a loop that no longer runs."""
    e = engines(2, gated=False, outcomes={0: SystemExit("the engine called sys.exit")})
    c = Consumer(e, Counted(3))
    keys, end = c.rest()
    assert isinstance(end, BackendDead) and "event loop" in str(end), end
    assert not e.thread.is_alive()
    e.close()
    assert e.calls[-1] == "aclose" and e.loop is None


def test_stop_ends_generate_at_once_and_pulls_nothing_more(engines):
    e, source = engines(3), Counted(10)
    c = Consumer(e, source)
    e.wait_started(3)
    c.stop.set()
    keys, end = c.rest()  # without any request finishing: a SIGTERM does not wait for slow requests
    assert keys == [] and end == "end"
    assert source.pulled == 3
    e.close()
    assert sorted(e.cancelled) == [0, 1, 2], "close cancels the requests still in flight"
    assert e.calls[-1] == "aclose" and e.live == 0


def test_stop_set_before_generate_pulls_nothing(engines):
    e, source = engines(3), Counted(10)
    stop = threading.Event()
    stop.set()
    assert list(e.generate(source, stop)) == []
    assert source.pulled == 0 and e.started == []


def test_no_input_ends_at_once(engines):
    e = engines(3)
    assert list(e.generate(iter([]), threading.Event())) == []
