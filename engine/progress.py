"""The live progress display: a tqdm bar on a terminal, else a plain line on a timer (logs, Slurm, CI).

It only reads the run's Counters and Clock (engine/metrics.py). The plain line has a UTC timestamp, the
counts, the rates over generation time and over the last WINDOW_S seconds, and an ETA from the latter;
it is printed every `log_every` seconds whether or not anything completed.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import deque

from tqdm import tqdm

from engine.metrics import Clock, Counters

WINDOW_S = 60.0  # the progress line's recent rate covers this many seconds


class Progress:
    def __init__(self, counters: Counters, clock: Clock, log_every: float = 30.0, quiet: bool = False):
        """`quiet`: no bar and no line (a worker's unit: the worker reports its own progress, engine/worker.py)."""
        self.counters, self.clock, self.log_every = counters, clock, log_every if not quiet else float("inf")
        self.tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet
        self.bar = tqdm(total=counters.total_requests, unit="req", dynamic_ncols=True, file=sys.stderr,
                        mininterval=1.0, disable=not self.tty, smoothing=0.05)
        self.samples: deque = deque([(clock.started, 0, 0)])  # (time, requests done, output tokens)
        self.last_log = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    def start(self) -> None:
        """Off a terminal: print the line every `log_every` seconds, completions or not."""
        if self.tty or self.quiet or self._timer is not None:
            return

        def tick() -> None:
            while not self._stop.wait(self.log_every):
                self._sample()
                self._log(time.perf_counter())
        self._timer = threading.Thread(target=tick, name="progress", daemon=True)
        self._timer.start()

    def generation_started(self) -> None:
        """Rates over the recent window count from the backend's readiness, not from start-up."""
        with self._lock:
            self.samples = deque([(time.perf_counter(), self.counters.requests_done, self.counters.completion_tokens)])

    def refresh(self) -> None:
        """After completions were counted: the bar, and (off a terminal) a line when one is due."""
        c = self.counters
        self._sample()
        self.bar.update(c.requests_done + c.requests_skipped - self.bar.n)
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        now = time.perf_counter()
        if not self.tty and now - self.last_log >= self.log_every:
            self._log(now)

    def _sample(self) -> None:
        now = time.perf_counter()
        with self._lock:
            self.samples.append((now, self.counters.requests_done, self.counters.completion_tokens))
            while len(self.samples) > 2 and self.samples[1][0] <= now - WINDOW_S:
                self.samples.popleft()  # keep one sample at or before the window's start

    def recent(self) -> tuple[float, float, float]:
        """(seconds covered, requests/s, output tok/s) over the last WINDOW_S seconds of generation."""
        with self._lock:
            (t0, r0, k0), (t1, r1, k1) = self.samples[0], self.samples[-1]
        span = max(t1 - t0, 1e-9)
        return t1 - t0, (r1 - r0) / span, (k1 - k0) / span

    def postfix(self) -> str:
        c = self.counters
        hit = f" cache {c.cached_tokens / c.prompt_tokens:.0%}" if c.prompt_tokens else ""
        gen = max(self.clock.generation_s, 1e-9)
        return (f"out {c.completion_tokens / gen:,.0f} tok/s useful {c.useful_tokens / gen:,.0f} tok/s{hit} "
                f"fail {c.failed}")

    def _log(self, now: float) -> None:
        with self._lock:
            self.last_log = now
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if self.clock.ready_at is None:
            print(f"{stamp} progress: starting the backend ({self.clock.startup_s:.0f} s)", file=sys.stderr,
                  flush=True)
            return
        c = self.counters
        done, total = c.requests_done + c.requests_skipped, c.total_requests
        span, req_s, tok_s = self.recent()
        eta = ""
        if total is not None:
            eta = (f", ETA {(total - done) / req_s / 60:.1f} min" if req_s > 0
                   else ", ETA ? (nothing finished in the last minute)")
        print(f"{stamp} progress {done:,}/{total if total is not None else '?'} requests, {self.postfix()}, "
              f"last {span:.0f} s: {tok_s:,.1f} out tok/s {req_s:.2f} req/s{eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        self.bar.close()
