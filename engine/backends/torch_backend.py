"""`torch`: transformers models on CPU or CUDA, with our own batched decode loop.

Why not `model.generate`: it decodes a static batch until its longest member is done, so finished
rows keep burning compute and the batch cannot take new work. This loop
- drops a row the moment it finishes (EOS or max_new_tokens) and admits new requests once a
  `refill_fraction` of the batch has finished (continuous batching, in steps of a few rows), so one
  long request never idles the rest;
- keeps each row's KV cache left-padded to a common length, with its own position ids, so rows of
  different lengths and ages share one forward pass;
- reuses the KV cache of each prompt's shared prefix (chat header + instruction) across every
  request of that prompt (prefix caching): only the document and the suffix are prefilled.
The requests arrive length-bucketed from the scheduler, so a prefill group pads little.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterator

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .base import Completion, Request, SamplingParams

log = logging.getLogger(__name__)


class _Layer(DynamicLayer):
    """One layer's KV cache in a buffer with spare capacity [rows, heads, capacity, dim]: a decode step
    writes its token in place instead of copying the whole cache (DynamicLayer concatenates)."""

    def __init__(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int):
        super().__init__()
        self.kbuf, self.vbuf, self.n = kbuf, vbuf, length
        self.device, self.is_initialized = kbuf.device, True
        self._view()

    def _view(self) -> None:
        self.keys, self.values = self.kbuf[:, :, : self.n], self.vbuf[:, :, : self.n]

    def update(self, key_states, value_states, *args, **kwargs):
        m = key_states.shape[-2]
        if self.n + m > self.kbuf.shape[2]:
            cap = max(self.n + m, int(self.kbuf.shape[2] * 1.5) + 16)
            self.kbuf, self.vbuf = _resized(self.kbuf, self.n, cap), _resized(self.vbuf, self.n, cap)
        self.kbuf[:, :, self.n: self.n + m] = key_states
        self.vbuf[:, :, self.n: self.n + m] = value_states
        self.n += m
        self._view()
        return self.keys, self.values


def _resized(buf: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    out = buf.new_zeros((*buf.shape[:2], capacity, buf.shape[3]))
    out[:, :, :used] = buf[:, :, :used]
    return out


@dataclass
class _Rows:
    """The rows being decoded. Each row's cache is left-padded to the common length T."""
    layers: list[_Layer]
    mask: torch.Tensor  # [rows, T] 1 where the cache column is a real token of that row
    pos: torch.Tensor  # [rows] position id of each row's next token
    last: torch.Tensor  # [rows] last sampled token (the next step's input)
    reqs: list[Request]
    outs: list[list[int]]
    started: list[float]
    cached: list[int]

    def __len__(self) -> int:
        return len(self.reqs)

    def spare(self) -> int:
        """Cache columns still needed by the longest-running row."""
        return max(r.max_new_tokens - len(o) for r, o in zip(self.reqs, self.outs)) + 1


def _rebuild(parts: list[tuple[_Rows, torch.Tensor, int]], spare: int) -> list[_Layer]:
    """New cache buffers holding the given rows (row indices, leading columns to drop), right-aligned."""
    widths = [p.mask.shape[1] - first for p, _, first in parts]
    t = max(widths)
    n = sum(len(idx) for _, idx, _ in parts)
    layers = []
    for li in range(len(parts[0][0].layers)):
        ref = parts[0][0].layers[li].kbuf
        kbuf = ref.new_zeros((n, ref.shape[1], t + spare, ref.shape[3]))
        vbuf = torch.zeros_like(kbuf)
        row = 0
        for (p, idx, first), w in zip(parts, widths):
            layer = p.layers[li]
            kbuf[row: row + len(idx), :, t - w: t] = layer.keys.index_select(0, idx)[:, :, first:]
            vbuf[row: row + len(idx), :, t - w: t] = layer.values.index_select(0, idx)[:, :, first:]
            row += len(idx)
        layers.append(_Layer(kbuf, vbuf, t))
    return layers


def _merge(a: _Rows | None, b: _Rows) -> _Rows:
    if a is None or len(a) == 0:
        return b
    t = max(a.mask.shape[1], b.mask.shape[1])
    every = lambda r: torch.arange(len(r), device=r.mask.device)  # noqa: E731
    layers = _rebuild([(a, every(a), 0), (b, every(b), 0)], max(a.spare(), b.spare()))
    mask = torch.cat([_pad_left(a.mask, t), _pad_left(b.mask, t)])
    return _Rows(layers, mask, torch.cat([a.pos, b.pos]), torch.cat([a.last, b.last]), a.reqs + b.reqs,
                 a.outs + b.outs, a.started + b.started, a.cached + b.cached)


def _pad_left(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros((mask.shape[0], length - mask.shape[1])), mask], dim=1)


def _select(r: _Rows, keep: list[int]) -> _Rows:
    idx = torch.tensor(keep, dtype=torch.long, device=r.mask.device)
    mask = r.mask.index_select(0, idx)
    # Columns that are padding for every remaining row are dropped: the cache never outgrows its rows.
    first = int(mask.any(dim=0).nonzero()[0])
    sub = _Rows(r.layers, mask[:, first:], r.pos.index_select(0, idx), r.last.index_select(0, idx),
                [r.reqs[i] for i in keep], [r.outs[i] for i in keep], [r.started[i] for i in keep],
                [r.cached[i] for i in keep])
    sub.layers = _rebuild([(r, idx, first)], sub.spare())
    return sub


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Next token per row from [rows, vocab] logits: greedy at temperature 0, else nucleus sampling.

    The nucleus is looked for among the 256 most likely tokens first (a top-k is far cheaper than
    sorting the vocabulary every step); only rows whose nucleus is wider fall back to a full sort,
    so the distribution is exactly top-p either way."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    k = min(256, probs.shape[-1])
    top, order = probs.topk(k, dim=-1)
    if not bool((top.sum(dim=-1) >= top_p).all()):
        top, order = probs.sort(dim=-1, descending=True)
    outside = top.cumsum(dim=-1) - top > top_p  # keep the smallest set whose mass reaches top_p
    choice = torch.multinomial(top.masked_fill(outside, 0.0), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def cpu_has_bf16() -> bool:
    """bfloat16 matmuls are 3-4x faster than float32 on CPUs with AVX512-BF16 or AMX (measured here)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@dataclass
class TorchBackend:
    model_dir: str
    sampling: SamplingParams
    eos_ids: set[int]
    pad_id: int
    batch_size: int = 16
    refill_fraction: float = 0.5
    prefix_cache: bool = True
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 0
    name: str = "torch"
    model: object = None
    _prefix_kv: dict = field(default_factory=dict)  # prompt name -> per-layer (keys, values) of its prefix

    def start(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        auto = torch.bfloat16 if self.device.startswith("cuda") or cpu_has_bf16() else torch.float32
        dtype = {"auto": auto,
                 "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
        config = AutoConfig.from_pretrained(self.model_dir)
        if getattr(config, "sliding_window", None) or getattr(config, "layer_types", None) and any(
                t != "full_attention" for t in config.layer_types):
            log.warning("model uses sliding-window attention; the torch backend treats every layer as full attention")
        attn = "sdpa"
        if self.device == "cpu":
            from .cpu_attention import register
            attn = register()
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype, attn_implementation=attn)
        self.model = self.model.to(self.device).eval()
        self.generator = torch.Generator(device=self.device).manual_seed(self.sampling.seed)

    def close(self) -> None:
        self.model = None
        self._prefix_kv.clear()

    # ---- model calls -----------------------------------------------------------------------------
    def _forward(self, input_ids, mask, position_ids, layers: list[_Layer]) -> torch.Tensor:
        cache = DynamicCache(config=self.model.config)
        cache.layers = list(layers)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _empty_layers(self, rows: int, capacity: int) -> list[_Layer]:
        cfg = self.model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(self.model.parameters()).dtype
        return [_Layer(torch.zeros((rows, heads, capacity, dim), dtype=dtype, device=self.device),
                       torch.zeros((rows, heads, capacity, dim), dtype=dtype, device=self.device), 0)
                for _ in range(cfg.num_hidden_layers)]

    def _prefix(self, req: Request) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """KV of the prompt's shared prefix, computed once per prompt."""
        if req.prompt not in self._prefix_kv:
            plen = req.prefix_len
            layers = self._empty_layers(1, plen)
            ids = torch.tensor([req.input_ids[:plen]], device=self.device)
            self._forward(ids, torch.ones_like(ids), torch.arange(plen, device=self.device)[None], layers)
            self._prefix_kv[req.prompt] = [(l.keys, l.values) for l in layers]
        return self._prefix_kv[req.prompt]

    @torch.inference_mode()
    def _prefill(self, group: list[Request]) -> _Rows:
        """Prefill requests of one prompt: [prefix][padding][rest of prompt], rest right-aligned."""
        dev, n = self.device, len(group)
        use_prefix = self.prefix_cache and group[0].prefix_len > 0
        plen = group[0].prefix_len if use_prefix else 0
        rests = [r.input_ids[plen:] for r in group]
        width = max(map(len, rests))
        ids = torch.full((n, width), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((n, plen + width), dtype=torch.long, device=dev)
        pos = torch.ones((n, width), dtype=torch.long, device=dev)
        mask[:, :plen] = 1
        for i, rest in enumerate(rests):
            ids[i, width - len(rest):] = torch.tensor(rest, device=dev)
            mask[i, plen + width - len(rest):] = 1
            pos[i, width - len(rest):] = torch.arange(plen, plen + len(rest), device=dev)
        layers = self._empty_layers(n, plen + width + max(r.max_new_tokens for r in group) + 1)
        if use_prefix:
            for layer, (k, v) in zip(layers, self._prefix(group[0])):
                layer.kbuf[:, :, :plen] = k
                layer.vbuf[:, :, :plen] = v
                layer.n = plen
                layer._view()
        logits = self._forward(ids, mask, pos, layers)
        first = sample(logits, self.sampling.temperature, self.sampling.top_p, self.generator)
        now = time.perf_counter()
        return _Rows(layers, mask, pos[:, -1] + 1, first, list(group), [[int(t)] for t in first],
                     [now] * n, [plen] * n)

    @torch.inference_mode()
    def _step(self, rows: _Rows) -> _Rows:
        rows.mask = torch.cat([rows.mask, rows.mask.new_ones((len(rows), 1))], dim=1)
        logits = self._forward(rows.last[:, None], rows.mask, rows.pos[:, None], rows.layers)
        nxt = sample(logits, self.sampling.temperature, self.sampling.top_p, self.generator)
        for out, t in zip(rows.outs, nxt.tolist()):
            out.append(t)
        rows.pos, rows.last = rows.pos + 1, nxt
        return rows

    def _finish(self, rows: _Rows) -> tuple[_Rows | None, list[Completion]]:
        done, keep = [], []
        now = time.perf_counter()
        for i, (req, out) in enumerate(zip(rows.reqs, rows.outs)):
            if out[-1] in self.eos_ids:
                reason, ids = "stop", out[:-1]
            elif len(out) >= req.max_new_tokens:
                reason, ids = "length", out
            else:
                keep.append(i)
                continue
            done.append(Completion(req.key, reason, output_ids=ids, prompt_tokens=len(req.input_ids),
                                   completion_tokens=len(out), cached_tokens=rows.cached[i],
                                   latency_s=now - rows.started[i]))
        if not done:
            return rows, []
        return (_select(rows, keep) if keep else None), done

    # ---- the loop --------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: Iterator[Request], stop: threading.Event) -> Iterator[list[Completion]]:
        rows: _Rows | None = None
        exhausted = False
        refill_at = max(1, int(self.batch_size * (1 - self.refill_fraction)))
        while not stop.is_set():
            active = len(rows) if rows else 0
            if not exhausted and (active == 0 or active <= refill_at):
                new = list(islice(requests, self.batch_size - active))
                exhausted = len(new) < self.batch_size - active
                done: list[Completion] = []
                for group in _by_prompt(new):
                    part = self._prefill(group)
                    part, finished = self._finish(part)
                    done.extend(finished)
                    if part is not None:
                        rows = _merge(rows, part)
                if done:
                    yield done
                if rows is None or len(rows) == 0:
                    if exhausted:
                        return
                    continue
            if rows is None or len(rows) == 0:
                return
            rows = self._step(rows)
            rows, done = self._finish(rows)
            if done:
                yield done


def _by_prompt(reqs: list[Request]) -> list[list[Request]]:
    groups: dict[str, list[Request]] = {}
    for r in reqs:
        groups.setdefault(r.prompt, []).append(r)
    return list(groups.values())
