"""`instant`: a model-free backend for host-overhead benchmarks and fast pipeline tests.

It answers every request at once with a deterministic completion of `instant.completion_tokens`
tokens (capped by the request's max_new_tokens): the request's own document tokens repeated, so the
writer decodes and stores realistic text. Nothing here measures or imitates a model's quality.
"""
from __future__ import annotations

import threading
from itertools import islice
from typing import Iterator

from .base import Completion, Request

CHUNK = 256  # requests answered per yielded list


class InstantBackend:
    name = "instant"

    def __init__(self, completion_tokens: int):
        self.completion_tokens = completion_tokens

    def start(self) -> None:
        pass

    def _complete(self, r: Request) -> Completion:
        n = min(self.completion_tokens, r.max_new_tokens)
        body = r.input_ids[r.prefix_len:] or r.input_ids
        reps = n // len(body) + 1
        out = (body * reps)[:n]
        return Completion(r.key, "length" if n == r.max_new_tokens else "stop", output_ids=out,
                          prompt_tokens=len(r.input_ids), completion_tokens=n)

    def generate(self, requests: Iterator[Request], stop: threading.Event) -> Iterator[list[Completion]]:
        while not stop.is_set():
            chunk = list(islice(requests, CHUNK))
            if not chunk:
                return
            yield [self._complete(r) for r in chunk]

    def close(self) -> None:
        pass
