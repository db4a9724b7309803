"""The repetition stop (`[repetition]`), one test on every backend: a generation whose output ends in
`min_count` back-to-back copies of one n-gram of min_pattern..max_pattern tokens stops, and the row keeps
its ids up to the loop.

- `loop_period` is vLLM's check_sequence_repetition (v1/core/sched/utils.py), `loop_cut` / `cut_loop`
  the row's cut at the loop (every backend), `tail_loops` its vectorised form for the torch decode loop;
- `repetition_processor` is SGLang's custom logit processor (SGLang 0.5.23 has no detector of its own):
  it forces the stop token once the output ends in a loop, with `repetition_params` as each request's
  `custom_params`; `sglang_repetition_stop` says whether a request can carry it.
"""
from __future__ import annotations

import json

from engine.types import RepetitionStop, SamplingParams


def loop_period(ids: list[int], rs: RepetitionStop) -> int:
    """The smallest n-gram size in min_pattern..max_pattern whose `min_count` copies end `ids`, else 0
    (vLLM's check_sequence_repetition, v1/core/sched/utils.py: the same test on every backend)."""
    size, count = len(ids), rs.min_count
    for n in range(rs.min_pattern, rs.max_pattern + 1):
        if n * count > size:
            return 0
        # compared from the end, as vLLM does: most sizes fail on the first token, without a copy
        if all(ids[-k] == ids[-(n * m + k)] for k in range(1, n + 1) for m in range(1, count)):
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


def sglang_repetition_stop(sampling: SamplingParams, stop_ids: list[int] | None) -> bool:
    """Whether SGLang requests carry the repetition stop (it ends a request by forcing a stop token:
    not with ignore_eos, nor without a stop id to force)."""
    return sampling is not None and sampling.repetition_stop is not None and not sampling.ignore_eos \
        and bool(stop_ids)


def repetition_params(rs: RepetitionStop, stop_ids: list[int]) -> dict:
    """One request's `custom_params` for the processor: the loop test's bounds and the token it forces."""
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
        ids, count = req.output_ids, p["min_count"]
        for n in range(p["min_pattern"], p["max_pattern"] + 1):
            if n * count > len(ids):
                break
            # from the end, as vLLM's check: most sizes fail on the first token, nothing copied per step
            if all(ids[-k] == ids[-(n * m + k)] for k in range(1, n + 1) for m in range(1, count)):
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
