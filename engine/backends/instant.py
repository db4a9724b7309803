"""`instant`: a model-free backend for host-overhead benchmarks and fast pipeline tests.

It answers every request at once with a deterministic completion of `instant.completion_tokens`
tokens (capped by the request's max_new_tokens): the request's own document tokens repeated, so the
writer decodes and stores realistic text. Nothing here measures or imitates a model's quality.
"""
from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from itertools import islice

from engine.config.run_config import RunConfig
from engine.errors import BackendDead
from engine.model.setup import ModelSetup
from engine.types import Completion, Request

CHUNK = 256  # requests answered per yielded list


class InstantBackend:
    name = "instant"

    def __init__(self, completion_tokens: int, delay_ms: float = 0.0, fail_rate: float = 0.0, die_after: int = 0,
                 seed: int = 0):
        self.completion_tokens = completion_tokens
        self.delay_ms, self.fail_rate, self.die_after = delay_ms, fail_rate, die_after
        self.rng = random.Random(seed)
        self.completed = 0

    @classmethod
    def from_config(cls, cfg: RunConfig, setup: ModelSetup) -> InstantBackend:
        i = cfg.instant  # no model runs: of the setup only the tokenized requests matter
        slow = i.slow_array_task >= 0 and os.environ.get("SLURM_ARRAY_TASK_ID") == str(i.slow_array_task)
        return cls(i.completion_tokens, i.delay_ms * (i.slow_factor if slow else 1.0), i.fail_rate, i.die_after,
                   cfg.sampling.seed or 0)

    def start(self) -> None:
        pass

    def _complete(self, r: Request) -> Completion:
        if self.fail_rate and self.rng.random() < self.fail_rate:
            return Completion(r.key, "error", prompt_tokens=len(r.input_ids),
                              error="injected failure (instant.fail_rate)")
        self.completed += 1
        if self.die_after and self.completed > self.die_after:
            raise BackendDead(f"injected: the backend died after {self.die_after} completions (instant.die_after)")
        n = min(self.completion_tokens, r.max_new_tokens)
        body = r.input_ids[r.prefix_len:] or r.input_ids
        out = body[:n] if len(body) >= n else (body * (n // len(body) + 1))[:n]
        return Completion(r.key, "length" if n == r.max_new_tokens else "stop", output_ids=out,
                          prompt_tokens=len(r.input_ids), completion_tokens=n)

    def generate(self, requests: Iterator[Request], stop: threading.Event) -> Iterator[list[Completion]]:
        while not stop.is_set():
            chunk = list(islice(requests, CHUNK if not self.delay_ms else 8))
            if not chunk:
                return
            if self.delay_ms:
                time.sleep(len(chunk) * self.delay_ms / 1000)
            yield [self._complete(r) for r in chunk]

    def close(self) -> None:
        pass


BACKEND = InstantBackend  # what make_backend builds from this module (engine/config/backends.py names it)
