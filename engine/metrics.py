"""Run counters, the live progress line, and the summary printed and saved at the end."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm


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

    log_every: float = 10.0  # seconds between progress lines when stderr is not a terminal

    def __post_init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=self.total_requests, unit="req", dynamic_ncols=True, file=sys.stderr,
                        mininterval=1.0, disable=not self.tty, smoothing=0.05)
        self.last_log = time.perf_counter()

    def completed(self, n: int, prompt_tokens: int, completion_tokens: int, cached: int, failed: int) -> None:
        self.requests_done += n
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cached_tokens += cached
        self.failed += failed
        self.bar.update(n)
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        self._maybe_log()

    def skipped(self, n: int) -> None:
        self.requests_skipped += n
        self.bar.update(n)

    def _maybe_log(self) -> None:
        """A plain progress line for logs (Slurm, CI), where tqdm's bar is switched off."""
        now = time.perf_counter()
        if self.tty or now - self.last_log < self.log_every:
            return
        self.last_log = now
        done = self.requests_done + self.requests_skipped
        total = self.total_requests
        eta = ""
        if total and self.requests_done:
            left = (total - done) / (self.requests_done / self.elapsed)
            eta = f" ETA {left / 60:.1f} min"
        print(f"progress {done:,}/{total if total is not None else '?'} requests, {self.postfix()}{eta}",
              file=sys.stderr, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def postfix(self) -> str:
        hit = f" cache {self.cached_tokens / self.prompt_tokens:.0%}" if self.prompt_tokens else ""
        return f"out {self.completion_tokens / max(self.elapsed, 1e-9):,.0f} tok/s{hit} fail {self.failed}"

    def close(self) -> None:
        self.bar.close()

    def summary(self) -> dict:
        t = self.elapsed
        return {
            "requests_generated": self.requests_done,
            "requests_skipped": self.requests_skipped,
            "failed": self.failed,
            "retries": self.retries,
            "rejected_rows": self.rejected,
            "truncated": self.truncated,
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "prefix_cache_hit_rate": round(self.cached_tokens / self.prompt_tokens, 4) if self.prompt_tokens else 0.0,
            "wall_seconds": round(t, 2),
            "requests_per_s": round(self.requests_done / t, 2) if t else 0.0,
            "output_tokens_per_s": round(self.completion_tokens / t, 1) if t else 0.0,
            "input_tokens_per_s": round(self.prompt_tokens / t, 1) if t else 0.0,
        }
