"""The types every stage shares (imported downstream only: this module imports no other of the engine).

    Doc --(renderer)--> Request --(backend)--> Completion --(collector)--> output row
"""
from __future__ import annotations

from dataclasses import dataclass

REJECTED = "rejected"  # the output stream of skipped input rows (beside one stream per prompt)
# Folders of an output directory that are not prompts (so no prompt may be named so: render/prompts.py)
ENGINE_DIRS = ("_run", "_state", "_journal", "_manifest", "_units", REJECTED, "report")


@dataclass(slots=True)
class Doc:
    id: str
    text: str
    source: str  # "<file>:<row>", row counted from 0 (blank JSONL lines included)
    columns: dict  # the other source columns, passed through to the output


@dataclass(slots=True)
class Rejection:
    source: str
    id: str | None
    reason: str


@dataclass(slots=True)
class Request:
    key: int  # the request's handle: the collector's in-flight map (collect.py) finds its document by it
    prompt: str  # prompt name
    input_ids: list[int]
    prefix_len: int  # leading tokens shared with other requests: of this prompt, or (document_first) of this document
    max_new_tokens: int


@dataclass(slots=True)
class Completion:
    key: int
    finish_reason: str  # stop | length | repetition | error
    output_ids: list[int] | None = None  # a backend returns ids or text; the writer decodes ids
    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class RepetitionStop:
    """Stop a generation whose output ends in `min_count` back-to-back copies of one n-gram of
    `min_pattern`..`max_pattern` tokens (vLLM's RepetitionDetectionParams; the same test on every backend)."""
    min_pattern: int = 16
    max_pattern: int = 128
    min_count: int = 3


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
    repetition_stop: RepetitionStop | None = None  # None: degenerate loops run to max_new_tokens

    def extra(self) -> dict:
        """The sampling knobs beyond temperature/top_p that are switched on, under the names SGLang,
        vLLM and the OpenAI-compatible servers all use (sent only when on, so a server that lacks
        one still serves runs that do not use it)."""
        return {**({"top_k": self.top_k} if self.top_k > 0 else {}),
                **({"min_p": self.min_p} if self.min_p > 0 else {}),
                **({"repetition_penalty": self.repetition_penalty} if self.repetition_penalty != 1.0 else {})}
