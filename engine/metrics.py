"""This process's counters and clock (what the summary and the state file report; engine/progress.py shows them).

    Tally     rows, output tokens and useful output tokens (engine/gate.py) of some stored rows; adds with +
    Counters  requests generated, skipped, failed, retried; tokens in and out; the rows this process stored,
              per prompt and finish reason (reported by the writer, which applies the quality gate)
    Clock     start-up (`started` until the backend is ready: model load, engine start), generation (ready
              until the last completion is collected) and finishing (parts committed, summary, report,
              card). `process_startup_s` is start-up counted from the process's own start (interpreter,
              imports, model set-up, input preflight, lease): what a Slurm time limit must cover first.

The collector and the producer update the counters; Run reads them (engine/output/record.py turns them into
the summary). Counters are plain integers updated from one thread each; readers on other threads (the
progress line) may see a figure one update old, never a torn one.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field


def process_started() -> float | None:
    """This process's start on the `time.perf_counter()` clock (Linux: /proc), None where unknown."""
    try:
        with open("/proc/self/stat") as f:  # field 22, starttime, in clock ticks after boot
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.perf_counter() - max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))


@dataclass
class Tally:
    """Rows, their completion tokens, the completion tokens of those that pass the quality gate, and their prompt
    tokens, of which `cached_tokens` the backend served from its prefix cache (its own count)."""
    rows: int = 0
    tokens: int = 0
    useful_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.rows + other.rows, self.tokens + other.tokens, self.useful_tokens + other.useful_tokens,
                     self.prompt_tokens + other.prompt_tokens, self.cached_tokens + other.cached_tokens)


def add_tallies(into: dict[str, Tally], more: dict[str, Tally]) -> None:
    """Add `more` (per finish reason) into `into`, in place."""
    for reason, t in more.items():
        into[reason] = into.get(reason, Tally()) + t


@dataclass
class Counters:
    total_requests: int | None = None  # input rows x prompts, when the row count is known
    requests_done: int = 0  # generated in this process
    requests_skipped: int = 0  # already done by an earlier run, or rejected input
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    truncated: int = 0  # documents cut to fit the context
    rejected: int = 0  # input rows rejected
    last_error: str | None = None
    # rows this process stored: prompt -> finish reason -> Tally (reported by the writer after the gate)
    stored: dict[str, dict[str, Tally]] = field(default_factory=dict)

    def completed(self, n: int, prompt_tokens: int, completion_tokens: int, cached: int, failed: int) -> None:
        self.requests_done += n
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cached_tokens += cached
        self.failed += failed

    def skipped(self, n: int) -> None:
        self.requests_skipped += n

    def add_stored(self, prompt: str, by_reason: dict[str, Tally]) -> None:
        add_tallies(self.stored.setdefault(prompt, {}), by_reason)

    def absorb(self, other: Counters) -> None:
        """Add another run's counters to these (a worker's process over the units it ran)."""
        for f in dataclasses.fields(self):  # every count (a counter added later is summed too)
            if f.type == "int":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.last_error = other.last_error or self.last_error
        for prompt, by in other.stored.items():
            self.add_stored(prompt, by)

    @property
    def useful_tokens(self) -> int:
        return sum(t.useful_tokens for by in list(self.stored.values()) for t in list(by.values()))

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for by in self.stored.values():
            for reason, t in by.items():
                out[reason] = out.get(reason, 0) + t.rows
        return out


@dataclass
class Clock:
    started: float = field(default_factory=time.perf_counter)
    process_started: float | None = None  # the process's start (process_started()), when this run owns it
    ready_at: float | None = None  # the backend was ready (start-up ends, generation begins)
    generation_end: float | None = None  # the last completion was collected (finishing begins)

    def ready(self) -> None:
        self.ready_at = time.perf_counter()

    def generation_done(self) -> None:
        if self.generation_end is None:
            self.generation_end = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def startup_s(self) -> float:
        return (self.ready_at if self.ready_at is not None else time.perf_counter()) - self.started

    @property
    def process_startup_s(self) -> float | None:
        """Start-up from the process's own start; None when unknown or the backend was passed in."""
        if self.process_started is None:
            return None
        return (self.ready_at if self.ready_at is not None else time.perf_counter()) - self.process_started

    @property
    def generation_s(self) -> float:
        if self.ready_at is None:
            return 0.0
        return (self.generation_end if self.generation_end is not None else time.perf_counter()) - self.ready_at

    @property
    def finishing_s(self) -> float:
        return time.perf_counter() - self.generation_end if self.generation_end is not None else 0.0
