"""The one small protocol every backend speaks.

A backend is started once, then `generate` pulls `Request`s from an iterator (the scheduler's: so
the backend decides when it has room for more) and yields lists of `Completion`s as they finish, in
any order. It stops pulling when `stop` is set (SIGTERM) and returns; requests it pulled but did not
finish are simply not yielded: they were never journaled, so a resumed run generates them again.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator, Protocol


@dataclass(slots=True)
class Request:
    key: int  # the runner's handle for the pending document row
    prompt: str  # prompt name
    input_ids: list[int]
    prefix_len: int  # leading tokens shared by every request of this prompt
    max_new_tokens: int


@dataclass(slots=True)
class Completion:
    key: int
    finish_reason: str  # stop | length | error
    output_ids: list[int] | None = None  # a backend returns ids or text; the writer decodes ids
    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None


@dataclass
class SamplingParams:
    """Run-wide sampling settings; max_new_tokens is per request (it depends on the prompt)."""
    temperature: float
    top_p: float
    seed: int | None  # None: no per-request seeds (backends with one global generator use 0)
    ignore_eos: bool = False  # benchmarks only: every request runs to its max_new_tokens
    top_k: int = 0  # 0: off (the whole vocabulary)
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off

    def extra(self) -> dict:
        """The sampling knobs beyond temperature/top_p that are switched on, under the names SGLang,
        vLLM and the OpenAI-compatible servers all use (sent only when on, so a server that lacks
        one still serves runs that do not use it)."""
        return {**({"top_k": self.top_k} if self.top_k > 0 else {}),
                **({"min_p": self.min_p} if self.min_p > 0 else {}),
                **({"repetition_penalty": self.repetition_penalty} if self.repetition_penalty != 1.0 else {})}


class BackendDead(RuntimeError):
    """The backend cannot serve any more requests; the run ends, resumable."""


class Backend(Protocol):
    name: str

    def start(self) -> None: ...

    def generate(self, requests: Iterator[Request], stop: threading.Event) -> Iterator[list[Completion]]: ...

    def close(self) -> None: ...
