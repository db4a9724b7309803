"""`torch`: transformers models on CPU or CUDA, with our own batched decode loop.

Why not `model.generate`: it decodes a static batch until its longest member is done, so finished
rows keep burning compute and the batch cannot take new work. This loop
- returns a row the moment it finishes (EOS or max_new_tokens) and admits new requests once a
  `refill_fraction` of the batch has finished (continuous batching), so one long request never
  idles the rest; finished rows are dropped from the cache in one copy, at the next admission or
  once an eighth of the batch has finished;
- keeps each row's KV cache left-padded to a common length, with its own position ids, so rows of
  different lengths and ages share one forward pass; buffers have room for the remaining tokens,
  so a decode step writes in place;
- reuses the KV cache of shared prefixes (PrefixCache): each prompt's chat header + instruction across
  every request of that prompt, or, with render.layout = "document_first", a document's chat header +
  text across every prompt of that document; only the rest of each prompt is prefilled;
- prefills in groups of at most `prefill_tokens` (rows x length): attention grows with the square
  of the length;
- on CPU keeps the cache in float32 while the weights may be bfloat16 (see cpu_attention.py).
The requests arrive length-bucketed from the scheduler, so a prefill group pads little.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch
from transformers.cache_utils import DynamicCache

from engine.backends.repetition import loop_cut, loop_period, tail_loops
from engine.backends.seeds import request_seed
from engine.backends.torch_kv import KVLayer, PrefixCache
from engine.backends.torch_sampling import sample
from engine.config.run_config import RunConfig, TorchConfig
from engine.machine import cpu_has_bf16
from engine.model.setup import ModelSetup
from engine.types import Completion, Request, SamplingParams

log = logging.getLogger(__name__)
# Decode steps between two repetition checks: a loop runs on, so one found up to 3 tokens late costs
# 3 tokens, while checking the last window of every row is one vectorised comparison per n-gram size.
REPETITION_CHECK_EVERY = 4


@dataclass
class _Rows:
    """The rows being decoded. Each row's cache is left-padded to the common length T. A finished row
    stays (dead) until the next compaction, so that its removal costs no copy of the whole cache."""
    layers: list[KVLayer]
    mask: torch.Tensor  # [rows, T] 1 where the cache column is a real token of that row
    pos: torch.Tensor  # [rows] position id of each row's next token
    last: torch.Tensor  # [rows] last sampled token (the next step's input)
    reqs: list[Request]
    outs: list[list[int]]
    started: list[float]
    cached: list[int]
    alive: list[bool] = field(default_factory=list)
    looping: set[int] = field(default_factory=set)  # rows whose output ends in a loop (repetition stop)

    def __post_init__(self) -> None:
        if not self.alive:
            self.alive = [True] * len(self.reqs)

    @property
    def live(self) -> int:
        return sum(self.alive)

    @property
    def dead(self) -> int:
        return len(self.alive) - self.live

    def spare(self) -> int:
        """Cache columns still needed by the longest-running live row."""
        return max((r.max_new_tokens - len(o) for r, o, a in zip(self.reqs, self.outs, self.alive) if a), default=0) + 1


def _compact(parts: list[_Rows]) -> _Rows | None:
    """One new set of cache buffers holding the live rows of `parts`, right-aligned; columns that are
    padding for every kept row are dropped. Spare columns for the remaining tokens are allocated but
    not initialised (they are written before they are read); left padding is zeroed."""
    kept = []
    for p in parts:
        idx = [i for i, a in enumerate(p.alive) if a]
        if idx:
            t_idx = torch.tensor(idx, dtype=torch.long, device=p.mask.device)
            mask = p.mask.index_select(0, t_idx)
            first = int(mask.any(dim=0).nonzero()[0])
            kept.append((p, idx, t_idx, mask[:, first:], first))
    if not kept:
        return None
    t = max(m.shape[1] for *_, m, _ in kept)
    n = sum(len(idx) for _, idx, *_ in kept)
    spare = max(p.spare() for p, *_ in kept)
    layers = []
    for li in range(len(kept[0][0].layers)):
        ref = kept[0][0].layers[li].kbuf
        kbuf = ref.new_empty((n, ref.shape[1], t + spare, ref.shape[3]))
        vbuf = torch.empty_like(kbuf)
        row = 0
        for p, idx, t_idx, mask, first in kept:
            w, rows = mask.shape[1], slice(row, row + len(idx))
            layer = p.layers[li]
            kbuf[rows, :, : t - w] = 0
            vbuf[rows, :, : t - w] = 0
            kbuf[rows, :, t - w: t] = layer.keys.index_select(0, t_idx)[:, :, first:]
            vbuf[rows, :, t - w: t] = layer.values.index_select(0, t_idx)[:, :, first:]
            row += len(idx)
        layers.append(KVLayer(kbuf, vbuf, t))
    pick = lambda p, idx, xs: [xs[i] for i in idx]  # noqa: E731
    return _Rows(
        layers, torch.cat([_pad_left(m, t) for *_, m, _ in kept]),
        torch.cat([p.pos.index_select(0, ti) for p, _, ti, *_ in kept]),
        torch.cat([p.last.index_select(0, ti) for p, _, ti, *_ in kept]),
        [r for p, idx, *_ in kept for r in pick(p, idx, p.reqs)],
        [o for p, idx, *_ in kept for o in pick(p, idx, p.outs)],
        [s for p, idx, *_ in kept for s in pick(p, idx, p.started)],
        [c for p, idx, *_ in kept for c in pick(p, idx, p.cached)])


def _pad_left(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros((mask.shape[0], length - mask.shape[1])), mask], dim=1)


@dataclass
class TorchBackend:
    model_dir: str
    sampling: SamplingParams
    eos_ids: set[int]
    pad_id: int
    settings: TorchConfig = field(default_factory=TorchConfig)  # `[torch]`: batch size, refill, prefix cache...
    device: str = "auto"
    dtype: str = "auto"
    name: str = "torch"
    model: object = None
    _prefix_kv: PrefixCache = None  # shared prefix tokens -> per-layer (keys, values); made in start()
    _steps: int = 0
    _row_generators: dict = field(default_factory=dict)  # request key -> its generator (sampling.seed set)

    @classmethod
    def from_config(cls, cfg: RunConfig, setup: ModelSetup) -> TorchBackend:
        eos_ids, tok = setup.eos_ids(), setup.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos_ids, default=0)
        return cls(str(setup.model_dir), setup.sampling, eos_ids, pad, cfg.torch, device=cfg.model.device,
                   dtype=cfg.model.dtype)

    def start(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        elif self.device == "cpu":  # as many threads as there are cores not busy with other work
            from engine.cpu_load import free_cores
            torch.set_num_threads(min(torch.get_num_threads(), len(free_cores())))
        auto = torch.bfloat16 if self.device.startswith("cuda") or cpu_has_bf16() else torch.float32
        dtype = {"auto": auto,
                 "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
        config = AutoConfig.from_pretrained(self.model_dir)
        if getattr(config, "sliding_window", None) or getattr(config, "layer_types", None) and any(
                t != "full_attention" for t in config.layer_types):
            log.warning("model uses sliding-window attention; the torch backend treats every layer as full attention")
        attn = "sdpa"
        if self.device == "cpu":
            from engine.backends.cpu_attention import register
            attn = register()
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype, attn_implementation=attn)
        self.model = self.model.to(self.device).eval()
        # transformers 5.19 (the pinned release, sglang's) calls the cache argument `past_key_values`;
        # later 5.x releases call it `cache`.
        import inspect
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        # On CPU the cache is float32 whatever the weights (see cpu_attention.py); on GPUs, the model's dtype.
        self.cache_dtype = torch.float32 if self.device == "cpu" else dtype
        self.generator = torch.Generator(device=self.device).manual_seed(self.sampling.seed or 0)
        self._prefix_kv = PrefixCache(self.settings.prefix_cache_mb)

    def _generators(self, reqs: list[Request], alive: list[bool] | None = None):
        """The batch's generator; with `sampling.seed` set, each live row's own, seeded from the seed and
        the request (request_seed, as the other backends' per-request seeds), so that a row samples the
        same tokens whatever else is in its batch (dead rows, still in the batch, draw from the shared one)."""
        seed = self.sampling.seed
        if seed is None:
            return self.generator
        gens = self._row_generators
        return [gens.setdefault(r.key, torch.Generator(device=self.device).manual_seed(request_seed(seed, r.key)))
                if alive is None or alive[i] else self.generator for i, r in enumerate(reqs)]

    def close(self) -> None:
        self.model = None
        if self._prefix_kv is not None:
            self._prefix_kv.clear()

    # ---- model calls -----------------------------------------------------------------------------
    def _forward(self, input_ids, mask, position_ids, layers: list[KVLayer]) -> torch.Tensor:
        cache = DynamicCache(config=self.model.config)
        cache.layers = list(layers)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         **{self._cache_kw: cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _empty_layers(self, rows: int, capacity: int) -> list[KVLayer]:
        cfg = self.model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = self.cache_dtype
        return [KVLayer(torch.zeros((rows, heads, capacity, dim), dtype=dtype, device=self.device),
                       torch.zeros((rows, heads, capacity, dim), dtype=dtype, device=self.device), 0)
                for _ in range(cfg.num_hidden_layers)]

    @torch.inference_mode()
    def _prefixes(self, reqs: list[Request]) -> tuple[dict[tuple, list], set[tuple]]:
        """KV of the shared prefixes of `reqs`, keyed like the cache: those the cache lacks are computed in batched
        forward passes (at most `prefill_tokens` rows x length each) and cached. Returns every one of them (held
        here, so that one dropped from a small cache by a newer one is still at hand) and the keys computed now."""
        out: dict[tuple, list] = {}
        missing: dict[tuple, None] = {}
        for r in reqs:
            key = _prefix_key(r)
            if key and key not in out and key not in missing:
                hit = self._prefix_kv.get(key)
                if hit is None:
                    missing[key] = None
                else:
                    out[key] = hit
        todo = sorted(missing, key=len)
        while todo:
            group = [todo.pop(0)]
            while todo and (len(group) + 1) * len(todo[0]) <= self.settings.prefill_tokens:
                group.append(todo.pop(0))
            width, dev = len(group[-1]), self.device
            ids = torch.full((len(group), width), self.pad_id, dtype=torch.long, device=dev)
            mask = torch.zeros((len(group), width), dtype=torch.long, device=dev)
            pos = torch.ones((len(group), width), dtype=torch.long, device=dev)
            for i, key in enumerate(group):
                ids[i, width - len(key):] = torch.tensor(key, device=dev)
                mask[i, width - len(key):] = 1
                pos[i, width - len(key):] = torch.arange(len(key), device=dev)
            layers = self._empty_layers(len(group), width)
            self._forward(ids, mask, pos, layers)
            for i, key in enumerate(group):
                kv = [(layer.keys[i:i + 1, :, width - len(key):].clone(),
                       layer.values[i:i + 1, :, width - len(key):].clone()) for layer in layers]
                out[key] = kv
                self._prefix_kv.put(key, kv)
        return out, set(missing)

    @torch.inference_mode()
    def _prefill(self, group: list[Request], prefixes: dict[tuple, list], unpaid: set[tuple]) -> _Rows:
        """Prefill requests: [padding][shared prefix][padding][rest of prompt], each part right-aligned; the
        prefix's KV is copied from `prefixes` (a prompt's header + instruction, or a document's header + text:
        _prefixes), so only the rest is computed. `unpaid`: prefixes computed for this admission whose first
        user is still to come (it counts the prefix as computed, the others as cached)."""
        dev, n = self.device, len(group)
        keys = [_prefix_key(r) if self.settings.prefix_cache else () for r in group]
        plens = [len(k) for k in keys]
        width_p = max(plens)
        rests = [r.input_ids[p:] for r, p in zip(group, plens)]
        width = max(map(len, rests))
        ids = torch.full((n, width), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((n, width_p + width), dtype=torch.long, device=dev)
        pos = torch.ones((n, width), dtype=torch.long, device=dev)
        for i, (rest, plen) in enumerate(zip(rests, plens)):
            ids[i, width - len(rest):] = torch.tensor(rest, device=dev)
            mask[i, width_p - plen:width_p] = 1
            mask[i, width_p + width - len(rest):] = 1
            pos[i, width - len(rest):] = torch.arange(plen, plen + len(rest), device=dev)
        layers = self._empty_layers(n, width_p + width + max(r.max_new_tokens for r in group) + 1)
        cached = []
        if width_p:
            rows_of: dict[tuple, list[int]] = {}
            for i, key in enumerate(keys):
                rows_of.setdefault(key, []).append(i)
            for key, rows in rows_of.items():
                if not key:
                    continue
                kv = prefixes[key]
                idx = torch.tensor(rows, dtype=torch.long, device=dev)
                for layer, (k, v) in zip(layers, kv):
                    layer.kbuf[idx, :, width_p - len(key):width_p] = k
                    layer.vbuf[idx, :, width_p - len(key):width_p] = v
            for layer in layers:
                layer.n = width_p
                layer._view()
        for key, plen in zip(keys, plens):  # a fresh prefix is computed for its first user, cached for the rest
            if key in unpaid:
                unpaid.discard(key)
                cached.append(0)
            else:
                cached.append(plen)
        logits = self._forward(ids, mask, pos, layers)
        first = sample(logits, self.sampling, self._generators(group), [r.input_ids for r in group])
        now = time.perf_counter()
        return _Rows(layers, mask, pos[:, -1] + 1, first, list(group), [[int(t)] for t in first],
                     [now] * n, cached)

    @torch.inference_mode()
    def _step(self, rows: _Rows) -> _Rows:
        rows.mask = torch.cat([rows.mask, rows.mask.new_ones((len(rows.reqs), 1))], dim=1)
        logits = self._forward(rows.last[:, None], rows.mask, rows.pos[:, None], rows.layers)
        histories = ([r.input_ids + o for r, o in zip(rows.reqs, rows.outs)]
                     if self.sampling.repetition_penalty != 1.0 else None)
        nxt = sample(logits, self.sampling, self._generators(rows.reqs, rows.alive), histories)
        for out, t, alive in zip(rows.outs, nxt.tolist(), rows.alive):
            if alive:
                out.append(t)
        rows.pos, rows.last = rows.pos + 1, nxt
        rs = self.sampling.repetition_stop
        self._steps += 1
        if rs is not None and self._steps % REPETITION_CHECK_EVERY == 0:
            rows.looping = {i for i in tail_loops(rows.outs, rs).nonzero().flatten().tolist() if rows.alive[i]}
        return rows

    def _finish(self, rows: _Rows) -> list[Completion]:
        """Completions of the rows that just finished; they are marked dead, not yet removed."""
        done = []
        now = time.perf_counter()
        for i, (req, out) in enumerate(zip(rows.reqs, rows.outs)):
            if not rows.alive[i]:
                continue
            if out[-1] in self.eos_ids and not self.sampling.ignore_eos:
                reason, ids = "stop", out[:-1]
            elif i in rows.looping:  # kept up to the loop; every generated token counted
                reason, ids = "repetition", out[:loop_cut(out, loop_period(out, self.sampling.repetition_stop))]
            elif len(out) >= req.max_new_tokens:
                reason, ids = "length", out
            else:
                continue
            rows.alive[i] = False
            self._row_generators.pop(req.key, None)
            done.append(Completion(req.key, reason, output_ids=ids, prompt_tokens=len(req.input_ids),
                                   completion_tokens=len(out), cached_tokens=rows.cached[i],
                                   latency_s=now - rows.started[i]))
        return done

    # ---- the loop --------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: Iterator[Request], stop: threading.Event) -> Iterator[list[Completion]]:
        rows: _Rows | None = None
        exhausted = False
        batch_size = self.settings.batch_size
        refill_at = max(1, int(batch_size * (1 - self.settings.refill_fraction)))
        compact_at = max(1, batch_size // 8)  # dead rows tolerated before the cache is compacted
        while not stop.is_set():
            live = rows.live if rows else 0
            if not exhausted and live <= refill_at:
                new = list(islice(requests, batch_size - live))
                exhausted = len(new) < batch_size - live
                parts, done = [], []
                prefixes, unpaid = self._prefixes(new) if self.settings.prefix_cache else ({}, set())
                for group in _prefill_groups(new, self.settings.prefill_tokens):
                    part = self._prefill(group, prefixes, unpaid)
                    done.extend(self._finish(part))
                    parts.append(part)
                rows = _compact(([rows] if rows else []) + parts)  # one copy: admit new, drop dead
                if done:
                    yield done
            elif rows is not None and rows.dead >= min(compact_at, len(rows.alive)):
                rows = _compact([rows])
            if rows is None:
                if exhausted:
                    return
                continue
            self._step(rows)
            done = self._finish(rows)
            if done:
                yield done
            if exhausted and rows.live == 0:
                return


BACKEND = TorchBackend  # what make_backend builds from this module (engine/config/backends.py names it)


def _prefix_key(r: Request) -> tuple:
    """The request's shared prefix (at least one token is left to compute: the next token's logits)."""
    return tuple(r.input_ids[:min(r.prefix_len, len(r.input_ids) - 1)])


def _prefill_groups(reqs: list[Request], budget: int) -> list[list[Request]]:
    """Requests in order of (shared prefix, length), split so that rows x longest prompt stays within `budget` tokens:
    prefill attention grows with the square of the length, and a padded 32 x 2,000-token forward
    pass costs far more on CPU than sixteen 2 x 2,000 ones (measured: 4x slower end to end). Rows of
    one prompt or one document (document_first) are adjacent, so a group shares few prefixes."""
    groups: list[list[Request]] = []
    group: list[Request] = []
    for r in sorted(reqs, key=lambda r: (r.prefix_len, len(r.input_ids))):
        if group and (len(group) + 1) * len(r.input_ids) > budget:
            groups.append(group)
            group = []
        group.append(r)
    if group:
        groups.append(group)
    return groups
