"""Backends, one per module, behind the protocol in base.py; `make_backend` picks one by name."""
from __future__ import annotations

from pathlib import Path

from .base import Backend, SamplingParams


def make_backend(cfg, model_dir: Path | str, tokenizer, sampling: SamplingParams, context: int) -> Backend:
    if cfg.backend == "instant":
        from .instant import InstantBackend
        i = cfg.instant
        return InstantBackend(i.completion_tokens, i.delay_ms, i.fail_rate, i.die_after, cfg.sampling.seed)
    if cfg.backend == "torch":
        from .torch_backend import TorchBackend
        eos = tokenizer.eos_token_id
        eos_ids = set(_generation_eos(model_dir)) | ({eos} if eos is not None else set())
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
        t = cfg.torch
        return TorchBackend(str(model_dir), sampling, eos_ids, pad, batch_size=t.batch_size,
                            refill_fraction=t.refill_fraction, prefix_cache=t.prefix_cache,
                            prefill_tokens=t.prefill_tokens,
                            device=cfg.model.device, dtype=cfg.model.dtype, threads=t.threads)
    if cfg.backend == "sglang":
        from .sglang_engine import SGLangEngineBackend
        args = dict(cfg.sglang.server_args)
        args.setdefault("context_length", context)
        return SGLangEngineBackend(str(model_dir), args, sampling, cfg.scheduler.max_in_flight)
    if cfg.backend == "sglang-http":
        from .sglang_http import SGLangHTTPBackend
        h = cfg.http
        return SGLangHTTPBackend(h.urls, h.api, sampling, cfg.scheduler.max_in_flight, h.timeout_s, h.retries,
                                 h.backoff_s, h.dead_after, h.model, h.connections)
    raise ValueError(f"unknown backend {cfg.backend!r}")


def _generation_eos(model_dir: Path) -> list[int]:
    import json
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
