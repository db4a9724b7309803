"""SGLang's request and response format, which the `sglang` engine (`Engine.async_generate`) and the
native HTTP API (`/generate`, backend `http` with `http.api = "native"`) share: the `sampling_params`
of one request, and a `Completion` from the response's `output_ids` / `text` and `meta_info`.

Written against sglang 0.5.23: tests/test_sglang_backends.py checks every field sent against that
release's GenerateReqInput and /generate contract, and every `meta_info` key read against where its
tokenizer manager writes them.
"""
from __future__ import annotations

from engine.backends.repetition import cut_loop, repetition_params, sglang_repetition_stop
from engine.backends.seeds import request_seed
from engine.types import Completion, RepetitionStop, Request, SamplingParams

# Sampling parameter names sampling_params() sends (checked against sglang's SamplingParams in tests).
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "sampling_seed",
                 "ignore_eos", "stop_token_ids", "custom_params")
# The meta_info keys completion_from() reads (checked against sglang's tokenizer manager in tests).
META_INFO_KEYS = ("finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency")


def sampling_params(req: Request, sampling: SamplingParams, stop_ids: list[int] | None = None) -> dict:
    """SGLang's sampling_params dict of one request (the Engine and native /generate take the same)."""
    return {**({"stop_token_ids": stop_ids} if stop_ids else {}), "max_new_tokens": req.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, **sampling.extra(),
            **({"sampling_seed": request_seed(sampling.seed, req.key)} if sampling.seed is not None else {}),
            **({"ignore_eos": True} if sampling.ignore_eos else {}),
            **({"custom_params": repetition_params(sampling.repetition_stop, stop_ids)}
               if sglang_repetition_stop(sampling, stop_ids) else {})}


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
