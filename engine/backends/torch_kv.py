"""The torch backend's KV cache structures: a layer's cache in a buffer with spare room, and the cache of shared
prefixes' KV (a prompt's header + instruction, or in document_first a document's header + text)."""
from __future__ import annotations

from collections import OrderedDict

import torch
from transformers.cache_utils import DynamicLayer


class KVLayer(DynamicLayer):
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
            self.kbuf, self.vbuf = resized(self.kbuf, self.n, cap), resized(self.vbuf, self.n, cap)
        self.kbuf[:, :, self.n: self.n + m] = key_states
        self.vbuf[:, :, self.n: self.n + m] = value_states
        self.n += m
        self._view()
        return self.keys, self.values


def resized(buf: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    out = buf.new_zeros((*buf.shape[:2], capacity, buf.shape[3]))
    out[:, :, :used] = buf[:, :, :used]
    return out


class PrefixCache:
    """KV of shared prefixes (a prompt's chat header + instruction; in document_first a document's header +
    text), keyed by their tokens, within `budget_mb` of memory: the least recently used is dropped first.
    document_first sends a document's prompts together, so a document's prefix is used within one or two
    admissions and a small cache suffices (SmolLM2-135M on CPU: 46 KB a token, a 1,000-token document 46 MB)."""

    def __init__(self, budget_mb: int):
        self.budget = budget_mb * 2**20
        self.entries: OrderedDict[tuple, tuple[list, int]] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple) -> list | None:
        hit = self.entries.get(key)
        if hit is None:
            return None
        self.entries.move_to_end(key)
        return hit[0]

    def put(self, key: tuple, kv: list) -> None:
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if size > self.budget:
            return
        self.entries[key] = (kv, size)
        self.bytes += size
        while self.bytes > self.budget:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
