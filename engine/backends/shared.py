"""What several backends share (no backend imports another): SGLang's request and response format (the
`sglang` engine and the native HTTP API speak it), per-request seeds, the context reserve, the
repetition stop (vLLM's loop test, the row cut at the loop, its vectorised form for the torch decode
loop, SGLang's custom logit processor), and what a backend needs to know about the machine (bf16
support, GPU memories, a model's size).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from engine.types import Completion, RepetitionStop, Request, SamplingParams

# SGLang caps max_new_tokens at max_req_len - input - 1 with max_req_len = context - 1
# (scheduler.py:2709, tp_worker.py:568): a request at the full budget gets 2 tokens fewer.
CONTEXT_RESERVE = 2
# Sampling parameter names sampling_params() sends (checked against sglang's SamplingParams in tests).
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "sampling_seed",
                 "ignore_eos", "stop_token_ids", "custom_params")


def sampling_params(req: Request, sampling: SamplingParams, stop_ids: list[int] | None = None) -> dict:
    """SGLang's sampling_params dict of one request (the Engine and native /generate take the same)."""
    return {**({"stop_token_ids": stop_ids} if stop_ids else {}), "max_new_tokens": req.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, **sampling.extra(),
            **({"sampling_seed": request_seed(sampling.seed, req.key)} if sampling.seed is not None else {}),
            **({"ignore_eos": True} if sampling.ignore_eos else {}),
            **({"custom_params": repetition_params(sampling.repetition_stop, stop_ids)}
               if sglang_repetition_stop(sampling, stop_ids) else {})}


def sglang_repetition_stop(sampling: SamplingParams, stop_ids: list[int] | None) -> bool:
    """Whether SGLang requests carry the repetition stop (it ends a request by forcing a stop token:
    not with ignore_eos, nor without a stop id to force)."""
    return sampling is not None and sampling.repetition_stop is not None and not sampling.ignore_eos \
        and bool(stop_ids)


def repetition_params(rs: RepetitionStop, stop_ids: list[int]) -> dict:
    return {"min_pattern": rs.min_pattern, "max_pattern": rs.max_pattern, "min_count": rs.min_count,
            "stop_id": min(stop_ids)}


def _repetition_processor_call(self, logits, custom_param_list=None):
    """SGLang 0.5.23 custom logit processor (`sampling/custom_logit_processor.py`): called by the sampler
    on the next token's logits of the rows that carry it, with each row's `custom_params` plus SGLang's
    `__req__` (its Req: `output_ids` so far, `schedule_batch.py:1148`). A row whose output ends in a
    loop gets only its stop token left, so the engine ends it at once (finish_reason stop, matched)."""
    for i, p in enumerate(custom_param_list or []):
        req = (p or {}).get("__req__")
        if req is None:
            continue
        ids, count = list(req.output_ids[-p["max_pattern"] * p["min_count"]:]), p["min_count"]
        for n in range(p["min_pattern"], p["max_pattern"] + 1):
            if n * count > len(ids):
                break
            tail = ids[-n * count:]
            if tail[n:] == tail[:-n]:
                logits[i, :] = float("-inf")
                logits[i, p["stop_id"]] = 0.0
                break
    return logits


def repetition_processor() -> str:
    """The processor, serialised as SGLang's `CustomLogitProcessor.to_str()` does (dill, hex, JSON), by
    value (a class of `__main__`), so a server without this package installed can load it."""
    import builtins
    import types

    import dill

    f = _repetition_processor_call  # a copy that belongs to no module: dill pickles it by value
    call = types.FunctionType(f.__code__, {"__builtins__": builtins}, "__call__")
    call.__module__ = "__main__"
    cls = type("RepetitionStopProcessor", (), {"__call__": call, "__module__": "__main__"})
    return json.dumps({"callable": dill.dumps(cls, recurse=True).hex()})


def loop_period(ids: list[int], rs: RepetitionStop) -> int:
    """The smallest n-gram size in min_pattern..max_pattern whose `min_count` copies end `ids`, else 0
    (vLLM's check_sequence_repetition, v1/core/sched/utils.py: the same test on every backend)."""
    for n in range(rs.min_pattern, rs.max_pattern + 1):
        span = n * rs.min_count
        if span > len(ids):
            return 0
        tail = ids[-span:]
        if tail[n:] == tail[:-n]:
            return n
    return 0


def loop_cut(ids: list[int], period: int, count: int = 2) -> int:
    """How many of `ids` a row stopped for repetition keeps: up to where the loop starts (the periodic
    tail followed back as far as it goes), and the repeated n-gram once (at its smallest period: a
    3-token loop found as 9 tokens keeps 3); its repetitions are cut."""
    tail = ids[-period * count:]
    period = next(p for p in range(1, period + 1) if period % p == 0 and tail[p:] == tail[:-p])
    start = len(ids) - period
    while start > 0 and ids[start - 1] == ids[start - 1 + period]:
        start -= 1
    return start + period


def cut_loop(ids: list[int], rs: RepetitionStop | None) -> list[int] | None:
    """`ids` kept up to their loop when they end in one (None when they do not)."""
    period = loop_period(ids, rs) if rs is not None else 0
    return ids[:loop_cut(ids, period)] if period else None


def tail_loops(outs: list[list[int]], rs: RepetitionStop):
    """Which rows end in a loop now, vectorised over the last max_pattern x min_count tokens of each (a
    decode loop calls it every few steps: the cost does not grow with the history). A bool tensor."""
    import torch

    width = rs.max_pattern * rs.min_count
    # rows shorter than the window are padded with distinct negative ids, which repeat nothing
    tail = torch.tensor([[-1 - i for i in range(width - len(o[-width:]))] + o[-width:] for o in outs])
    hit = torch.zeros(len(outs), dtype=torch.bool)
    for n in range(rs.min_pattern, rs.max_pattern + 1):
        span = n * rs.min_count
        hit |= (tail[:, width - span + n:] == tail[:, width - span: width - n]).all(dim=1)
    return hit


def request_seed(seed: int, key: int) -> int:
    """A per-request seed derived from the run's `sampling.seed` (sent only when the user sets one)."""
    return (seed * 1_000_003 + key) % (2 ** 31)


def completion_from(req: Request, out: dict, rs: RepetitionStop | None = None) -> Completion:
    """A completion from SGLang's response dict (engine and native HTTP `/generate` alike). With the
    repetition stop on, a stop whose output before the stop token ends in a loop is a "repetition"."""
    meta = out.get("meta_info", {})
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    if kind == "abort":
        msg = reason.get("message", "aborted") if isinstance(reason, dict) else "aborted"
        return Completion(req.key, "error", prompt_tokens=len(req.input_ids), error=f"aborted by SGLang: {msg}")
    ids = out.get("output_ids")
    text = out.get("text") if ids is None else None
    finish, generated = "length" if kind == "length" else "stop", int(meta.get("completion_tokens", len(ids or [])))
    kept = cut_loop(ids[:-1], rs) if finish == "stop" and rs is not None and ids else None
    if kept is not None:  # stopped by repetition_processor: kept up to the loop, every generated token counted
        finish, ids = "repetition", kept
    return Completion(req.key, finish, output_ids=ids, text=text,
                      prompt_tokens=int(meta.get("prompt_tokens", len(req.input_ids))),
                      completion_tokens=generated,
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
