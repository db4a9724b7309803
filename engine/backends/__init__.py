"""Backends, one per module, behind the protocol in base.py; `make_backend` picks one by name."""
from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from .base import Backend, SamplingParams

log = logging.getLogger(__name__)


def make_backend(cfg, model_dir: Path | str, tokenizer, sampling: SamplingParams, context: int) -> Backend:
    if cfg.backend == "instant":
        from .instant import InstantBackend
        i = cfg.instant
        return InstantBackend(i.completion_tokens, i.delay_ms, i.fail_rate, i.die_after, cfg.sampling.seed or 0)
    eos = tokenizer.eos_token_id
    eos_ids = set(_generation_eos(model_dir)) | ({eos} if eos is not None else set())
    if cfg.backend == "torch":
        from .torch_backend import TorchBackend
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
        t = cfg.torch
        return TorchBackend(str(model_dir), sampling, eos_ids, pad, batch_size=t.batch_size,
                            refill_fraction=t.refill_fraction, prefix_cache=t.prefix_cache,
                            prefill_tokens=t.prefill_tokens,
                            device=cfg.model.device, dtype=cfg.model.dtype, threads=t.threads)
    if cfg.backend == "sglang":
        from .sglang_engine import SGLangEngineBackend
        args = guard_server_args(default_parallelism(dict(cfg.sglang.server_args), model_dir),
                                 cfg.scheduler.max_in_flight)
        args.setdefault("context_length", context)
        return SGLangEngineBackend(str(model_dir), args, sampling, cfg.scheduler.max_in_flight, stop_ids=list(eos_ids))
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


LPM_MAX_WAITING = 128  # SGLang's WAITING_QUEUE_PREFIX_MATCH_MAX (schedule_policy.py:137)


def guard_server_args(args: dict, max_in_flight: int) -> dict:
    """Server arguments that SGLang 0.5.23 would take silently but not act on as written."""
    policy = str(args.get("schedule_policy", "fcfs"))
    running = int(args.get("max_running_requests") or 0)
    if policy in ("lpm", "dfs-weight") and running and max_in_flight - running > LPM_MAX_WAITING:
        log.warning("sglang.server_args.schedule_policy = %r has no effect here: SGLang switches to FCFS when more "
                    "than %d requests wait, and scheduler.max_in_flight %d - max_running_requests %d leaves ~%d "
                    "waiting (the radix cache still reuses the shared template prefix)", policy, LPM_MAX_WAITING,
                    max_in_flight, running, max_in_flight - running)
    drafts = args.get("speculative_num_draft_tokens")
    if str(args.get("speculative_algorithm", "")).upper() == "NGRAM" and drafts is not None \
            and "speculative_ngram_max_bfs_breadth" not in args and int(drafts) < 10:
        # SGLang sets speculative_num_steps = draft tokens // breadth (default 10): 0 below 10 drafts,
        # a path SGLang itself never takes by default; a breadth of the draft count keeps it at 1.
        args = {**args, "speculative_ngram_max_bfs_breadth": int(drafts)}
    return args


def context_reserve(backend: str) -> int:
    """Tokens of the context a backend will not generate into (SGLang: 2, see sglang_engine.CONTEXT_RESERVE):
    the renderer leaves them out of the document budget so a full-budget request gets all its new tokens."""
    if backend in ("sglang", "sglang-http"):
        from .sglang_engine import CONTEXT_RESERVE
        return CONTEXT_RESERVE
    return 0


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
    import os
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # nvidia-smi lists every GPU of the node
        mems = [m for i, m in enumerate(mems) if str(i) in {v.strip() for v in visible.split(",") if v.strip()}]
    return mems
