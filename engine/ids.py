"""Document ids: a stable hash, and compact sets of them (what is done, what was seen in this run)."""
from __future__ import annotations

import hashlib

import numpy as np


def id_hash(value: str) -> int:
    """A stable 63-bit hash of an id (Python's own str hash changes between processes)."""
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DoneSet:
    """Ids already finished: a sorted array of 63-bit hashes, 8 bytes an id (millions fit easily)."""

    def __init__(self, hashes: list[int] | np.ndarray = ()):
        self.arr = np.unique(np.asarray(hashes, dtype=np.uint64))

    def __len__(self) -> int:
        return len(self.arr)

    def has(self, h: int) -> bool:
        i = int(np.searchsorted(self.arr, np.uint64(h)))
        return i < len(self.arr) and int(self.arr[i]) == h

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        if not len(self.arr):
            return np.zeros(len(hashes), dtype=bool)
        idx = np.minimum(np.searchsorted(self.arr, hashes), len(self.arr) - 1)
        return self.arr[idx] == hashes


class SeenIds(DoneSet):
    """Ids met so far in this run, for duplicate detection, in about 8 bytes an id: recent ids sit in
    a Python set that is merged into the sorted array every `merge_every` ids."""

    def __init__(self, merge_every: int = 1 << 20):
        super().__init__()
        self.recent: set[int] = set()
        self.merge_every = merge_every

    def first_time(self, hashes: list[int]) -> list[bool]:
        """For each hash: True when it was not met before (and remember it)."""
        old = self.contains(np.asarray(hashes, dtype=np.uint64))
        out = []
        for h, seen in zip(hashes, old):
            new = not seen and h not in self.recent
            if new:
                self.recent.add(h)
            out.append(new)
        if len(self.recent) >= self.merge_every:
            self.arr = np.union1d(self.arr, np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
            self.recent.clear()
        return out
