"""The torch backend's sampling: the next token of every row of a batch from its logits, as transformers,
vLLM and SGLang sample (repetition penalty, temperature, top-k, top-p, min-p), with one generator for the
batch or each row's own (`sampling.seed` set)."""
from __future__ import annotations

import torch

from engine.types import SamplingParams


def penalize(logits: torch.Tensor, histories: list[list[int]], penalty: float) -> torch.Tensor:
    """Repetition penalty as transformers, vLLM and SGLang apply it: every token already in a row's
    prompt or output has its logit divided by `penalty` (multiplied when negative)."""
    width = max(map(len, histories))
    idx = torch.tensor([h + h[:1] * (width - len(h)) for h in histories], device=logits.device)  # pad: a repeat
    seen = logits.gather(1, idx)
    return logits.scatter(1, idx, torch.where(seen < 0, seen * penalty, seen / penalty))


def _draw(probs: torch.Tensor, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """One index per row drawn from [rows, n] weights: from one generator, or from each row's own."""
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator)


def sample(logits: torch.Tensor, s: SamplingParams, generator: torch.Generator | list[torch.Generator],
           histories: list[list[int]] | None = None) -> torch.Tensor:
    """Next token per row from [rows, vocab] logits: repetition penalty, then greedy at temperature 0,
    else temperature, top-k, top-p (nucleus) and min-p, in transformers' order. `generator` is one for
    the batch, or a list with each row's own (`sampling.seed` set: a row's draws then do not depend on
    which other rows share its batch).

    The nucleus is looked for among the 256 most likely tokens first (a top-k is far cheaper than
    sorting the vocabulary every step); only rows whose nucleus is wider fall back to a full sort,
    so the distribution is exactly top-p either way."""
    if s.repetition_penalty != 1.0 and histories:
        logits = penalize(logits, histories, s.repetition_penalty)
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    vocab = probs.shape[-1]
    k = s.top_k if 0 < s.top_k < vocab else 0
    if not k and s.top_p >= 1.0 and s.min_p <= 0:
        return _draw(probs, generator).squeeze(-1)
    if k:
        top, order = probs.topk(k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)  # the nucleus is taken within the top k
    else:
        top, order = probs.topk(min(256, vocab), dim=-1)
        if s.top_p >= 1.0 or not bool((top.sum(dim=-1) >= s.top_p).all()):
            top, order = probs.sort(dim=-1, descending=True)
    if s.top_p < 1.0:
        outside = top.cumsum(dim=-1) - top > s.top_p  # keep the smallest set whose mass reaches top_p
        top = top.masked_fill(outside, 0.0)
    if s.min_p > 0:
        top = top.masked_fill(top < s.min_p * top[:, :1], 0.0)  # the most likely token always stays
    choice = _draw(top, generator)
    return order.gather(-1, choice).squeeze(-1)
