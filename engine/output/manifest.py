"""The manifest of one stream of one shard: every committed part with its rows, size and checksum.

    <root>/_manifest/<stream>/<tag>.jsonl   one JSON line per commit: {part, rows, bytes, crc32, committed_at};
                                            a part rewritten (--retry-errors) gets a new line, the last counts;
                                            {part, removed} once a listed part is gone (recovery says so)

`check_part` compares a committed part with its record: missing, a size that differs (truncated or
replaced), a footer that does not read, a row count that differs; `deep` adds the whole file's CRC-32 (or,
for a part recorded before checksums, a read of every value). Recovery (parts.py) checks every part deep
before it trusts it; `engine status --check` checks quickly, `--check --deep` deep.
"""
from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

CHUNK = 8 << 20


@dataclass(frozen=True)
class PartRecord:
    part: str  # the file name, in <root>/<stream>/
    rows: int = 0
    bytes: int | None = None
    crc32: int | None = None  # None: recorded before checksums
    removed: str | None = None  # why a listed part is no longer expected


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def read_manifest(path: Path) -> dict[str, list[PartRecord]]:
    """Every part named in a manifest: its records since the last `removed` one, oldest first (a `removed`
    record, when last, is kept: the part is no longer expected). Torn or damaged lines are skipped."""
    out: dict[str, list[PartRecord]] = {}
    if not path.exists():
        return out
    names = set(PartRecord.__dataclass_fields__)
    for line in path.read_bytes().splitlines():
        try:
            d = orjson.loads(line)
            rec = PartRecord(**{k: v for k, v in d.items() if k in names})
        except (orjson.JSONDecodeError, TypeError, AttributeError):
            continue  # a torn last line from a crash (or a damaged one: its part is checked by its footer)
        if isinstance(rec.part, str):
            history = out.setdefault(rec.part, [])
            if rec.removed is not None or (history and history[-1].removed is not None):
                history.clear()
            history.append(rec)
    return out


def _append(path: Path, record: dict) -> None:
    with open(path, "ab") as fh:
        fh.write(orjson.dumps(record) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def record_part(path: Path, part: Path, rows: int, name: str | None = None) -> None:
    """List a committed part (its size and checksum read back from disk) in the manifest at `path`; `name`:
    the name it is listed under when `part` is still its temporary file."""
    _append(path, {"part": name or part.name, "rows": rows, "bytes": part.stat().st_size,
                   "crc32": file_crc32(part), "committed_at": time.time()})


def record_removed(path: Path, name: str, why: str) -> None:
    _append(path, {"part": name, "removed": why, "committed_at": time.time()})


def check_part(part: Path, history: list[PartRecord], deep: bool = False) -> str | None:
    """What is wrong with a committed part against its manifest records (None: nothing found). The part
    may match any of its records: a rewrite is recorded before its rename, so a crash between leaves the
    older file, which the older record lists."""
    recs = [r for r in history if r.removed is None]
    last = recs[-1] if recs else None
    if not part.exists():
        return f"missing (the manifest lists it with {last.rows:,} row(s))" if last else "missing"
    size = part.stat().st_size
    sized = [r for r in recs if r.bytes is None or r.bytes == size]
    if recs and not sized:
        return f"{size:,} bytes, the manifest says {last.bytes:,} (truncated or replaced)"
    summed = [r for r in sized if r.crc32 is not None]
    if deep and summed and sized == summed:
        crc = file_crc32(part)
        sized = [r for r in summed if r.crc32 == crc]
        if not sized:
            return "checksum mismatch (damaged on disk)"
    try:
        rows = pq.ParquetFile(part).metadata.num_rows
        if deep and not summed:  # no checksum to compare: read every value
            pq.read_table(part).validate(full=True)
    except (pa.ArrowException, OSError) as exc:
        return f"not readable Parquet ({exc})"
    if sized and rows not in {r.rows for r in sized}:
        return f"{rows:,} row(s), the manifest says {sized[-1].rows:,}"
    return None


def check_stream(root: Path, stream: str, tag: str, deep: bool = False) -> list[str]:
    """Problems of shard `tag`'s committed parts of one stream (root/stream/, listed in root/_manifest/stream/),
    one line each naming the part and what to do. A part not listed yet (committed just before a crash;
    the next run lists it) only has to read."""
    listed = read_manifest(root / "_manifest" / stream / f"{tag}.jsonl")
    folder = root / stream
    problems = []
    for name, history in sorted(listed.items()):
        if history[-1].removed is None and (problem := check_part(folder / name, history, deep)):
            todo = "" if problem.startswith("missing") else "delete it and "
            problems.append(f"{folder / name}: {problem}; {todo}run the same command again: its rows are generated "
                            f"again")
    for part in sorted(folder.glob(f"part-{tag}-*.parquet")) if folder.is_dir() else []:
        if part.name not in listed and (problem := check_part(part, [], deep)):
            problems.append(f"{part}: {problem}; delete it and run the same command again: its rows are generated "
                            f"again")
    return problems


def record_fetched(manifest: Path, part: Path) -> None:
    """List a part just fetched from a store (it replaces any local copy of that name: the store's is what
    counts); one whose footer does not read is left unlisted, for recovery to name."""
    try:
        rows = pq.ParquetFile(part).metadata.num_rows
    except (pa.ArrowException, OSError):
        return
    manifest.parent.mkdir(parents=True, exist_ok=True)
    record_part(manifest, part, rows)
