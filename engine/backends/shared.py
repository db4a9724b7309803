"""What several backends share (no backend imports another): SGLang's request and response format (the
`sglang` engine and the native HTTP API speak it), per-request seeds, the context reserve, and what a
backend needs to know about the machine (bf16 support, GPU memories, a model's size).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from engine.types import Completion, Request, SamplingParams

# SGLang caps max_new_tokens at max_req_len - input - 1 with max_req_len = context - 1
# (scheduler.py:2709, tp_worker.py:568): a request at the full budget gets 2 tokens fewer.
CONTEXT_RESERVE = 2
# Sampling parameter names sampling_params() sends (checked against sglang's SamplingParams in tests).
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "sampling_seed",
                 "ignore_eos", "stop_token_ids")


def sampling_params(req: Request, sampling: SamplingParams, stop_ids: list[int] | None = None) -> dict:
    """SGLang's sampling_params dict of one request (the Engine and native /generate take the same)."""
    return {**({"stop_token_ids": stop_ids} if stop_ids else {}), "max_new_tokens": req.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, **sampling.extra(),
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


def cpu_has_bf16() -> bool:
    """bfloat16 matmuls are 3-4x faster than float32 on CPUs with AVX512-BF16 or AMX (measured here)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def generation_eos(model_dir: Path) -> list[int]:
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
    memories = gpu_memories()
    if len(memories) <= 1:
        return args
    params = estimate_params(model_dir)
    if params is not None and params * 2 < 0.4 * min(memories):  # bf16 weights under 40 % of one GPU: room for KV
        return {**args, "dp_size": len(memories)}
    return args


def gpu_memories() -> list[int]:
    """Total memory (bytes) of each visible GPU, from nvidia-smi: asking torch.cuda would initialise CUDA
    in this process, and SGLang's schedulers want all of every GPU's memory (review finding 31)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    mems = [int(float(x)) * 1024 ** 2 for x in out.split() if x.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # nvidia-smi lists every GPU of the node
        mems = [m for i, m in enumerate(mems) if str(i) in {v.strip() for v in visible.split(",") if v.strip()}]
    return mems
