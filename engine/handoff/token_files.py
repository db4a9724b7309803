"""Token files in datatrove's format, the one nanotron's tokenized-folder loader reads.

    NAME.ds           token ids of every document, concatenated; little-endian uint16 when the
                      vocabulary fits (len(tokenizer) <= 65,536), else uint32; no header
    NAME.ds.index     little-endian uint64: the cumulative end (in tokens) of each document
    NAME.ds.metadata  "tokenizer_name|token_size", the token count, the count humanised ("497 T"),
                      joined by newlines with no trailing newline (datatrove's write_final_metadata)

Every document ends with the tokenizer's EOS and has no BOS. Documents are shuffled (seeded) before
writing, because nanotron reads a folder's samples in order: tokenised in a first pass to a
temporary file, then copied in a random document order through a memory map (bounded memory).
"""
from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import humanize
import numpy as np

from engine.atomic import replace_synced
from engine.errors import TokenFileError


@dataclass
class TokenFolder:
    folder: Path
    tokenizer_name: str
    token_size: int
    documents: int
    tokens: int


def token_size_for(tokenizer) -> int:
    return 2 if len(tokenizer) <= 2 ** 16 else 4


def _batches(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    batch = []
    for t in texts:
        batch.append(t)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def write_token_folder(texts: Iterable[str], tokenizer, tokenizer_name: str, folder: Path, seed: int = 0,
                       name: str = "000_tokens", batch_size: int = 1000, progress=None) -> TokenFolder:
    """Tokenise `texts` (EOS appended, no BOS) and write NAME.ds / .ds.index / .ds.metadata in `folder`,
    documents in a seeded random order. The files appear under their final names only when complete."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TokenFileError(f"tokenizer {tokenizer_name!r} has no EOS token: documents could not be delimited")
    token_size = token_size_for(tokenizer)
    dtype = np.dtype("<u2" if token_size == 2 else "<u4")
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / f".{name}.unshuffled.tmp"
    lengths = array("Q")
    with open(raw, "wb") as f:
        for batch in _batches(texts, batch_size):
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            for doc in ids:
                doc.append(eos)
                f.write(np.asarray(doc, dtype=dtype).tobytes())
                lengths.append(len(doc))
            if progress is not None:
                progress(len(batch))
    n = len(lengths)
    if n == 0:
        raw.unlink()
        raise TokenFileError(f"no documents to write into {folder}")
    lens = np.frombuffer(lengths, dtype=np.uint64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    order = np.random.default_rng(seed).permutation(n)
    total = int(lens.sum())

    ds, index, meta = (folder / f"{name}.ds", folder / f"{name}.ds.index", folder / f"{name}.ds.metadata")
    source = np.memmap(raw, dtype=dtype, mode="r")
    with open(_tmp(ds), "wb") as out:
        chunk: list[np.ndarray] = []
        size = 0
        for i in order:
            piece = source[starts[i]:starts[i] + int(lens[i])]
            chunk.append(piece)
            size += len(piece)
            if size >= 1 << 22:
                out.write(np.concatenate(chunk).tobytes())
                chunk, size = [], 0
        if chunk:
            out.write(np.concatenate(chunk).tobytes())
    del source
    _tmp(index).write_bytes(np.cumsum(lens[order]).astype("<u8").tobytes())
    _tmp(meta).write_text("\n".join([f"{tokenizer_name}|{token_size}", str(total),
                                     humanize.metric(total, unit="T")]))
    for path in (ds, index, meta):
        replace_synced(_tmp(path), path)
    raw.unlink()
    return TokenFolder(folder, tokenizer_name, token_size, n, total)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def read_metadata(path: Path) -> tuple[str, int, int]:
    """(tokenizer name, token size, token count) of a .ds.metadata file."""
    first, count, _ = path.read_text().split("\n")
    name, size = first.rsplit("|", 1)
    return name, int(size), int(count)
