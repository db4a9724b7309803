"""`sglang`: an in-process `sglang.Engine` (the production path on GPUs).

The renderer's token ids go in (`skip_tokenizer_init=True`: SGLang's tokenizer is never run, output
ids come back and the writer thread decodes them), one `async_generate` per request under the
in-flight window. `meta_info` gives prompt, completion and cached tokens (the prefix-cache hit rate
is cached / prompt tokens), the finish reason and the latency.

Written against sglang 0.5.23 (the `[sglang]` extra pins it); tests check every server argument and
sampling parameter name against that release's source. `Engine.shutdown()` kills every child
process of the caller: the engine's helpers are threads, and nothing else is spawned.
"""
from __future__ import annotations

import logging

from .async_window import AsyncWindowBackend
from .base import BackendDead, Completion, Request, SamplingParams

log = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.23"
# Sampling parameter names this module sends (checked against sglang's SamplingParams in tests).
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "sampling_seed", "ignore_eos")


def sampling_params(req: Request, sampling: SamplingParams) -> dict:
    return {"max_new_tokens": req.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            **({"sampling_seed": request_seed(sampling.seed, req.key)} if sampling.seed is not None else {}),
            **({"ignore_eos": True} if sampling.ignore_eos else {})}


def request_seed(seed: int, key: int) -> int:
    """A per-request seed derived from the run's `sampling.seed` (sent only when the user sets one)."""
    return (seed * 1_000_003 + key) % (2 ** 31)


def completion_from(req: Request, out: dict) -> Completion:
    """A completion from SGLang's response dict (engine and native HTTP `/generate` alike)."""
    meta = out.get("meta_info", {})
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    if kind == "abort":
        msg = reason.get("message", "aborted") if isinstance(reason, dict) else "aborted"
        return Completion(req.key, "error", prompt_tokens=len(req.input_ids), error=f"aborted by SGLang: {msg}")
    ids = out.get("output_ids")
    text = out.get("text") if ids is None else None
    return Completion(req.key, "length" if kind == "length" else "stop", output_ids=ids, text=text,
                      prompt_tokens=int(meta.get("prompt_tokens", len(req.input_ids))),
                      completion_tokens=int(meta.get("completion_tokens", len(ids or []))),
                      cached_tokens=int(meta.get("cached_tokens", 0)),
                      latency_s=float(meta.get("e2e_latency", 0.0)))


class SGLangEngineBackend(AsyncWindowBackend):
    name = "sglang"

    def __init__(self, model_path: str, server_args: dict, sampling: SamplingParams, max_in_flight: int,
                 engine_factory=None):
        super().__init__(max_in_flight)
        self.model_path, self.server_args, self.sampling = model_path, dict(server_args), sampling
        self.engine_factory = engine_factory  # tests pass a double of sglang.Engine
        self.engine = None

    def engine_kwargs(self) -> dict:
        return {"model_path": self.model_path, "skip_tokenizer_init": True, **self.server_args}

    def start(self) -> None:
        # sglang.Engine installs signal handlers while it launches, which Python allows only on the
        # main thread: build it here (the runner's thread), then serve requests from the loop thread.
        factory = self.engine_factory
        if factory is None:
            try:
                import sglang
            except ImportError as exc:
                raise BackendDead(f"backend 'sglang' needs sglang {SGLANG_VERSION}: pip install -e '.[sglang]' "
                                  f"on a GPU machine ({exc})") from exc
            factory = sglang.Engine
        log.info("starting sglang.Engine(%s)", ", ".join(f"{k}={v!r}" for k, v in self.engine_kwargs().items()))
        self.engine = factory(**self.engine_kwargs())
        super().start()

    async def agenerate(self, req: Request) -> Completion:
        out = await self.engine.async_generate(input_ids=req.input_ids, sampling_params=sampling_params(req, self.sampling))
        return completion_from(req, out)

    def close(self) -> None:
        super().close()
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
