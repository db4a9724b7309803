"""Run counters, the live progress line, and the summary printed and saved at the end.

Time is split in three (Run marks the boundaries): start-up (`started` until the backend is ready:
model load, engine start), generation (ready until the last completion is collected) and finishing
(parts committed, summary, report, card). `process_startup_s` is the start-up counted from the
process's own start (interpreter, imports, model set-up, input preflight, lease): what a Slurm time
limit has to cover before any row is generated. Rates are over generation time; the progress line's recent
rate is over the last WINDOW_S seconds, and its ETA comes from that rate.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from tqdm import tqdm

WINDOW_S = 60.0  # the progress line's recent rate covers this many seconds


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
class Metrics:
    total_requests: int | None = None  # input rows x prompts, when the row count is known
    started: float = field(default_factory=time.perf_counter)
    requests_done: int = 0  # generated in this process
    requests_skipped: int = 0  # already done by an earlier run, or rejected input
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    truncated: int = 0
    rejected: int = 0
    last_error: str | None = None

    log_every: float = 30.0  # seconds between progress lines when stderr is not a terminal (a timer)
    ready_at: float | None = None  # the backend was ready (start-up ends, generation begins)
    generation_end: float | None = None  # the last completion was collected (finishing begins)
    # this process's rows and completion tokens per prompt and finish reason: {prompt: {reason: [rows, tokens]}}
    kinds: dict = field(default_factory=dict)
    useful_tokens: int = 0  # completion tokens of rows that pass the quality gate (USEFUL, non-empty)
    process_started: float | None = None  # the process's start (process_started()), when this run owns it

    def __post_init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=self.total_requests, unit="req", dynamic_ncols=True, file=sys.stderr,
                        mininterval=1.0, disable=not self.tty, smoothing=0.05)
        self.last_log = time.perf_counter()
        self.samples: deque = deque([(self.started, 0, 0)])  # (time, requests done, output tokens)
        self._lock = threading.Lock()
        self._timer_stop = threading.Event()
        self._timer: threading.Thread | None = None

    def completed(self, n: int, prompt_tokens: int, completion_tokens: int, cached: int, failed: int,
                  kinds: dict | None = None) -> None:
        """`kinds`: {(prompt, finish reason): [rows, tokens, useful tokens]} of these completions."""
        self.requests_done += n
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cached_tokens += cached
        self.failed += failed
        for (prompt, reason), (rows, tokens, useful) in (kinds or {}).items():
            slot = self.kinds.setdefault(prompt, {}).setdefault(reason, [0, 0, 0])
            slot[0] += rows
            slot[1] += tokens
            slot[2] += useful
            self.useful_tokens += useful
        self._sample()
        self.bar.update(n)
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        self._maybe_log()

    # ---- the three periods -----------------------------------------------------------------------
    def ready(self) -> None:
        """The backend is ready: start-up ends, generation begins."""
        self.ready_at = time.perf_counter()
        self.samples = deque([(self.ready_at, self.requests_done, self.completion_tokens)])

    def generation_done(self) -> None:
        if self.generation_end is None:
            self.generation_end = time.perf_counter()

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

    def rates(self) -> dict:
        """The state file's timing: start-up, generation and finishing seconds, rates over generation."""
        gen = max(self.generation_s, 1e-9)
        proc = self.process_startup_s
        return {"startup_s": round(self.startup_s, 1),
                **({"process_startup_s": round(proc, 1)} if proc is not None else {}),
                "generation_s": round(self.generation_s, 1),
                "finishing_s": round(self.finishing_s, 1), "requests_per_s": round(self.requests_done / gen, 3),
                "output_tokens_per_s": round(self.completion_tokens / gen, 1),
                "useful_output_tokens": self.useful_tokens,
                "useful_output_tokens_per_s": round(self.useful_tokens / gen, 1)}

    @property
    def finishing_s(self) -> float:
        return time.perf_counter() - self.generation_end if self.generation_end is not None else 0.0

    # ---- the progress line -----------------------------------------------------------------------
    def start_timer(self) -> None:
        """Print the progress line every `log_every` seconds (stderr not a terminal), completions or not."""
        if self.tty or self._timer is not None:
            return

        def tick() -> None:
            while not self._timer_stop.wait(self.log_every):
                self._sample()
                self._log(time.perf_counter())
        self._timer = threading.Thread(target=tick, name="progress", daemon=True)
        self._timer.start()

    def _sample(self) -> None:
        now = time.perf_counter()
        with self._lock:
            self.samples.append((now, self.requests_done, self.completion_tokens))
            while len(self.samples) > 2 and self.samples[1][0] <= now - WINDOW_S:
                self.samples.popleft()  # keep one sample at or before the window's start

    def recent(self) -> tuple[float, float, float]:
        """(seconds covered, requests/s, output tok/s) over the last WINDOW_S seconds of generation."""
        with self._lock:
            (t0, r0, k0), (t1, r1, k1) = self.samples[0], self.samples[-1]
        span = max(t1 - t0, 1e-9)
        return t1 - t0, (r1 - r0) / span, (k1 - k0) / span

    def skipped(self, n: int) -> None:
        self.requests_skipped += n
        self.bar.update(n)

    def _maybe_log(self) -> None:
        now = time.perf_counter()
        if not self.tty and now - self.last_log >= self.log_every:
            self._log(now)

    def _log(self, now: float) -> None:
        """A plain progress line for logs (Slurm, CI), where tqdm's bar is switched off: a UTC timestamp,
        the counts, the rates over generation time and over the last minute, and an ETA from the latter."""
        with self._lock:
            self.last_log = now
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if self.ready_at is None:
            print(f"{stamp} progress: starting the backend ({self.startup_s:.0f} s)", file=sys.stderr, flush=True)
            return
        done = self.requests_done + self.requests_skipped
        total = self.total_requests
        span, req_s, tok_s = self.recent()
        eta = ""
        if total is not None:
            eta = (f", ETA {(total - done) / req_s / 60:.1f} min" if req_s > 0
                   else ", ETA ? (nothing finished in the last minute)")
        print(f"{stamp} progress {done:,}/{total if total is not None else '?'} requests, {self.postfix()}, "
              f"last {span:.0f} s: {tok_s:,.1f} out tok/s {req_s:.2f} req/s{eta}", file=sys.stderr, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def postfix(self) -> str:
        hit = f" cache {self.cached_tokens / self.prompt_tokens:.0%}" if self.prompt_tokens else ""
        gen = max(self.generation_s, 1e-9)
        return (f"out {self.completion_tokens / gen:,.0f} tok/s useful {self.useful_tokens / gen:,.0f} tok/s{hit} "
                f"fail {self.failed}")

    def close(self) -> None:
        self._timer_stop.set()
        self.bar.close()

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for by in self.kinds.values():
            for reason, (rows, _, _) in by.items():
                out[reason] = out.get(reason, 0) + rows
        return out

    def per_prompt(self) -> dict[str, dict]:
        gen = self.generation_s
        out = {}
        for prompt, by in sorted(self.kinds.items()):
            tokens, useful = sum(v[1] for v in by.values()), sum(v[2] for v in by.values())
            out[prompt] = {"rows": sum(v[0] for v in by.values()), "finish_reasons": {r: v[0] for r, v in by.items()},
                           "output_tokens": tokens, "useful_output_tokens": useful,
                           "output_tokens_per_s": round(tokens / gen, 1) if gen else 0.0,
                           "useful_output_tokens_per_s": round(useful / gen, 1) if gen else 0.0}
        return out

    def summary(self) -> dict:
        """This process's figures; rates are over generation time (README, "What each figure covers")."""
        t, gen = self.elapsed, self.generation_s
        reasons = self.reasons()
        return {
            "requests_generated": self.requests_done,
            "requests_skipped": self.requests_skipped,
            "failed": self.failed,
            "retries": self.retries,
            "rejected_rows": self.rejected,
            "truncated": self.truncated,  # documents cut to fit the context (input truncation)
            "input_truncated": self.truncated,
            "output_truncated": reasons.get("length", 0),  # generations cut at max_new_tokens
            "repetition_stopped": reasons.get("repetition", 0),
            "finish_reasons": reasons,
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.completion_tokens,
            "useful_output_tokens": self.useful_tokens,
            "useful_share": round(self.useful_tokens / self.completion_tokens, 4) if self.completion_tokens else 0.0,
            "cached_tokens": self.cached_tokens,
            "prefix_cache_hit_rate": round(self.cached_tokens / self.prompt_tokens, 4) if self.prompt_tokens else 0.0,
            "wall_seconds": round(t, 2),
            "startup_s": round(self.startup_s, 2),
            **({"process_startup_s": round(self.process_startup_s, 2)} if self.process_startup_s is not None else {}),
            "generation_s": round(gen, 2),
            "finishing_s": round(self.finishing_s, 2),
            "requests_per_s": round(self.requests_done / gen, 2) if gen else 0.0,
            "output_tokens_per_s": round(self.completion_tokens / gen, 1) if gen else 0.0,
            "useful_output_tokens_per_s": round(self.useful_tokens / gen, 1) if gen else 0.0,
            "input_tokens_per_s": round(self.prompt_tokens / gen, 1) if gen else 0.0,
            "per_prompt": self.per_prompt(),
        }
