"""A model's size, and how it spreads over this machine's GPUs: the parameter count estimated from its
transformers config, and the SGLang default of one replica per GPU when the model fits one comfortably."""
from __future__ import annotations

from pathlib import Path

from engine.machine import gpu_memories


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
    """SGLang server arguments with, on a node with several GPUs and a model that fits one of them
    comfortably, one replica per GPU (`dp_size`: data parallelism) unless they choose tp_size or dp_size."""
    if "dp_size" in args or "tp_size" in args:
        return args
    memories = gpu_memories()
    if len(memories) <= 1:
        return args
    params = estimate_params(model_dir)
    if params is not None and params * 2 < 0.4 * min(memories):  # bf16 weights under 40 % of one GPU: room for KV
        return {**args, "dp_size": len(memories)}
    return args
