"""Backends, one per module, behind the protocol in base.py; `make_backend` picks one by name."""
from __future__ import annotations

from pathlib import Path

from .base import Backend, SamplingParams


def make_backend(cfg, model_dir: Path | str, tokenizer, sampling: SamplingParams, context: int) -> Backend:
    if cfg.backend == "instant":
        from .instant import InstantBackend
        i = cfg.instant
        return InstantBackend(i.completion_tokens, i.delay_ms, i.fail_rate, i.die_after, cfg.sampling.seed or 0)
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
        args = default_parallelism(dict(cfg.sglang.server_args), model_dir)
        args.setdefault("context_length", context)
        return SGLangEngineBackend(str(model_dir), args, sampling, cfg.scheduler.max_in_flight)
    if cfg.backend == "vllm":
        from .vllm_engine import VLLMEngineBackend
        return VLLMEngineBackend(str(model_dir), cfg.vllm.engine_args, sampling, cfg.scheduler.max_in_flight, context,
                                 dtype=cfg.model.dtype, device=cfg.model.device,
                                 cpu_threads_bind=cfg.vllm.cpu_threads_bind)
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


def estimate_params(model_dir: Path | str) -> int | None:
    """Rough parameter count from a transformers config (dense layers; MoE experts all counted)."""
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError):
        return None
    c = getattr(c, "text_config", None) or c
    h, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    attn = h * head_dim * (heads * 2 + kv * 2)
    experts = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None) or 1
    inter = getattr(c, "moe_intermediate_size", None) if experts > 1 else None
    mlp = 3 * h * (inter or c.intermediate_size) * experts
    embed = vocab * h * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return embed + layers * (attn + mlp)


def default_parallelism(args: dict, model_dir: Path | str) -> dict:
    """On a node with several GPUs and a model that fits one of them comfortably, one replica per GPU
    (data parallelism) unless the config chooses tp_size or dp_size itself."""
    if "dp_size" in args or "tp_size" in args:
        return args
    try:
        import torch
        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA: nothing to decide
        return args
    if gpus <= 1:
        return args
    params = estimate_params(model_dir)
    memory = torch.cuda.get_device_properties(0).total_memory
    if params is not None and params * 2 < 0.4 * memory:  # bf16 weights under 40 % of one GPU: room for KV
        return {**args, "dp_size": gpus}
    return args
