"""engine/schedule/retry.py in-process: RetryFeed's attempts per key, its backoff (due after
backoff * 2**(n-1)), due retries before new requests, `pending`, the second pass after the input ends,
and the stop event. The clock is fake (the module's `time` is replaced), and so is the stop event's wait:
it moves the clock instead of sleeping, so nothing here depends on how fast the machine is."""
from __future__ import annotations

import itertools
import threading
import types

import pytest

from engine.schedule import retry as retry_mod
from engine.schedule.retry import RetryFeed
from engine.types import Request


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now


class FakeStop:
    """A stop event whose wait advances the fake clock by its timeout (what sleeping would do), recording it;
    `set_on_wait` sets the event during the wait, as a signal arriving then would."""

    def __init__(self, clock: Clock, set_on_wait: bool = False):
        self.clock, self.set_on_wait, self.flag, self.waits = clock, set_on_wait, False, []

    def is_set(self) -> bool:
        return self.flag

    def set(self) -> None:
        self.flag = True

    def wait(self, timeout: float) -> bool:
        assert timeout is not None and timeout >= 0, "the feed must never block without a bound"
        self.waits.append(timeout)
        self.clock.now += timeout
        if self.set_on_wait:
            self.flag = True
        return self.flag


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(retry_mod, "time", types.SimpleNamespace(monotonic=c.monotonic))
    return c


def req(key: int) -> Request:
    return Request(key=key, prompt="faq", input_ids=[1, 2, 3], prefix_len=1, max_new_tokens=8)


def new_requests(start: int = 100):
    return (req(k) for k in itertools.count(start))


def test_attempts_are_counted_per_key_and_the_last_one_is_final(clock):
    feed = RetryFeed(iter([]), max_attempts=3, backoff_seconds=1.0, stop=threading.Event())
    a, b = req(1), req(2)
    assert [feed.retry(a), feed.retry(a)] == [True, True]  # tries 2 and 3 scheduled
    assert feed.retry(b) is True  # b's count is its own
    assert feed.retry(a) is False  # a has used its 3 tries: final
    assert feed.retry(b) is True and feed.retry(b) is False
    assert feed.attempts == {}, "a final error forgets its key"
    assert len(feed.waiting) == 4  # only the scheduled tries wait; a final error is not queued


def test_one_attempt_means_no_retry(clock):
    feed = RetryFeed(iter([]), max_attempts=1, backoff_seconds=1.0, stop=threading.Event())
    assert feed.retry(req(1)) is False
    assert feed.waiting == [] and feed.attempts == {}


def test_a_success_resets_the_count_of_its_key(clock):
    feed = RetryFeed(iter([]), max_attempts=2, backoff_seconds=1.0, stop=threading.Event())
    assert feed.retry(req(7)) is True
    feed.succeeded(7)
    assert 7 not in feed.attempts
    assert feed.retry(req(7)) is True, "counted from the first try again"
    feed.succeeded(12345)  # a key that never failed: nothing to forget, no error


def test_due_time_doubles_with_each_attempt(clock):
    feed = RetryFeed(iter([]), max_attempts=5, backoff_seconds=0.5, stop=threading.Event())
    t0 = clock.now
    for _ in range(4):
        assert feed.retry(req(1))
    assert sorted(due - t0 for due, _, _ in feed.waiting) == [0.5, 1.0, 2.0, 4.0]


def test_a_retry_is_served_only_once_due_and_then_before_new_requests(clock):
    feed = RetryFeed(new_requests(), max_attempts=3, backoff_seconds=2.0, stop=threading.Event())
    it = iter(feed)
    first = next(it)
    assert feed.retry(first)
    clock.now += 1.999
    assert next(it).key == 101, "not due yet: the next new request is served meanwhile"
    clock.now += 0.001
    assert next(it) is first, "due: served before the next new request"
    assert next(it).key == 102


def test_due_retries_come_out_in_due_order_then_in_the_order_they_failed(clock):
    feed = RetryFeed(new_requests(), max_attempts=5, backoff_seconds=1.0, stop=threading.Event())
    a, b, c = req(1), req(2), req(3)
    feed.retry(c)
    feed.retry(c)
    feed.retry(c)  # c's third retry: due after 4 s, not yet
    feed.retry(a)
    feed.retry(a)  # a's second retry: due after 2 s
    feed.retry(b)  # due after 1 s, failed after c's and a's first
    clock.now += 2.0
    it = iter(feed)
    # due after 1 s in the order they failed (c, a, b), then after 2 s (c, a)
    assert [next(it).key for _ in range(5)] == [3, 1, 2, 3, 1]
    assert next(it).key == 100, "c's 4 s retry is not due: a new request"
    clock.now += 2.0
    assert next(it).key == 3


def test_pending_until_the_input_is_read_and_no_retry_waits(clock):
    feed = RetryFeed(iter([req(1)]), max_attempts=2, backoff_seconds=1.0, stop=threading.Event())
    assert feed.pending, "the input is not read yet"
    served = list(feed)
    assert [r.key for r in served] == [1] and feed.exhausted
    assert not feed.pending
    feed.retry(served[0])
    assert feed.pending, "a retry waits"


def test_a_failure_after_the_input_ended_is_served_by_a_second_pass(clock):
    """Run._generate's loop: a pass ends when the input is read and nothing waits; completions still in flight
    can fail after that; `pending` says another pass is needed, and it waits for the retry to be due."""
    stop = FakeStop(clock)
    feed = RetryFeed(iter([req(1), req(2)]), max_attempts=2, backoff_seconds=3.0, stop=stop)
    assert [r.key for r in feed] == [1, 2]
    assert feed.retry(req(2))  # came back failed after the pass ended
    assert feed.pending
    t0 = clock.now
    assert [r.key for r in feed] == [2]
    assert 3.0 <= clock.now - t0 < 3.0 + 0.21, "served once due, waiting in bounded steps"
    assert stop.waits and max(stop.waits) <= 0.2, "a wait is short, so a stop is seen at once"
    assert not feed.pending


def test_retried_until_final_with_doubling_gaps(clock):
    """A backend that fails request 1 every time: tried max_attempts times, each gap twice the last."""
    stop = FakeStop(clock)
    feed = RetryFeed(iter([req(1)]), max_attempts=4, backoff_seconds=1.0, stop=stop)
    served_at, answers = [], []
    t0 = clock.now
    for _ in range(10):  # passes, as Run._generate makes them
        for r in feed:
            served_at.append(clock.now - t0)
            answers.append(feed.retry(r))
        if not feed.pending:
            break
    assert answers == [True, True, True, False]
    gaps = [b - a for a, b in zip(served_at, served_at[1:])]
    for gap, backoff in zip(gaps, [1.0, 2.0, 4.0]):
        assert backoff <= gap < backoff + 0.21, (gaps, served_at)


def test_stop_ends_iteration_before_anything_is_served(clock):
    stop = threading.Event()
    stop.set()
    feed = RetryFeed(new_requests(), max_attempts=2, backoff_seconds=1.0, stop=stop)
    assert list(feed) == []


def test_stop_set_between_requests_ends_iteration(clock):
    stop = threading.Event()
    feed = RetryFeed(new_requests(), max_attempts=2, backoff_seconds=1.0, stop=stop)
    served = []
    for r in feed:
        served.append(r.key)
        if len(served) == 3:
            stop.set()
    assert served == [100, 101, 102]


def test_stop_while_waiting_for_a_retry_ends_iteration_without_it(clock):
    stop = FakeStop(clock, set_on_wait=True)
    feed = RetryFeed(iter([]), max_attempts=2, backoff_seconds=60.0, stop=stop)
    feed.retry(req(1))
    assert list(feed) == []
    assert len(stop.waits) == 1, "the wait is the stop event's, so the stop ends it"
    assert feed.pending, "the retry is still owed (a resumed run redoes it)"
