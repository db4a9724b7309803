"""Crash-safe storage of one stream of rows (one prompt, or the rejected rows) of one shard.

Files, for shard tag T (`s00003-of-00016`) and part number k:
  <dir>/part-T-k.parquet              committed zstd Parquet part (appears only by atomic rename)
  <dir>/part-T-k.parquet.tmp          the part being written (never read; deleted on recovery)
  <root>/_journal/<stream>/T-k.arrows every row of part k, as an Arrow IPC stream of record batches,
                                      flushed every few seconds (appending a batch is a memory copy)
  <root>/_manifest/<stream>/T.jsonl   one line per committed part: name, rows, bytes, time

Part k and journal k hold the same rows. Commit order: close the .tmp, fsync, rename, append to the
manifest, delete journal k. So after a crash at any point: a part under its final name is complete;
a journal whose part exists is stale (deleted); any other journal holds finished rows that are
re-emitted into the next part, and nothing else was lost but requests in flight.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.atomic import fsync_dir, replace_synced
from engine.errors import WriterError
from engine.ids import DoneSet, id_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartSpec:
    """What one stream of one shard is written as (see the module doc for the files)."""
    root: Path  # the output directory (its _journal/ and _manifest/ hold this stream's recovery files)
    stream: str  # a prompt name, or "rejected"; the parts go to root/stream/
    shard_tag: str  # "s00003-of-00016"
    schema: pa.Schema
    key_column: str  # the column whose values say what is done ("id"; "doc_ref" for rejected rows)
    row_group_rows: int
    file_max_bytes: int  # a part is committed once its file reaches this size
    compression_level: int  # zstd
    count_column: str | None = None  # rows are counted per value of this column ("finish_reason")

    @property
    def data_dir(self) -> Path:
        return self.root / self.stream


class PartSink:
    """One stream of one shard: rows in, committed zstd Parquet parts out, crash-safe (module doc).

    Lifecycle: `recover()` once (clean up after a crash; returns what is done and the journaled rows),
    `replay()` those rows, then `add()` record batches (journaled at once, flushed by `flush()`),
    `commit()` whenever a part is full and at `close()`. Counts: `rows_total` (every stored row of the
    shard, recovered ones included), `counts` (rows per value of `count_column`), `tokens` (their
    completion_tokens per value), `dropped` (error rows
    removed by --retry-errors). Used from one thread at a time (the writer thread once the run goes)."""

    def __init__(self, spec: PartSpec):
        self.spec = spec
        self.stream, self.shard_tag, self.schema, self.key_column = spec.stream, spec.shard_tag, spec.schema, \
            spec.key_column
        self.count_column = spec.count_column
        self.data_dir = spec.data_dir
        self.journal_dir = spec.root / "_journal" / spec.stream
        self.manifest = spec.root / "_manifest" / spec.stream / f"{spec.shard_tag}.jsonl"
        for d in (self.data_dir, self.journal_dir, self.manifest.parent):
            d.mkdir(parents=True, exist_ok=True)
        self.row_group_rows, self.file_max_bytes, self.level = spec.row_group_rows, spec.file_max_bytes, \
            spec.compression_level
        self.k = 0
        self.buffer: list[pa.RecordBatch] = []
        self.buffered = 0
        self.writer: pq.ParquetWriter | None = None
        self.journal = None  # the open journal file
        self.journal_ipc: pa.ipc.RecordBatchStreamWriter | None = None
        self.part_rows = 0
        self.rows_total = 0  # rows stored (committed + journaled), recovered ones included
        self.dropped = 0  # error rows removed by recover(drop_errors=True)
        self.duplicates = 0  # committed rows whose key another committed row of this shard has (found by recover)
        self.counts: dict[str, int] = {}  # rows per value of `count_column` (finish reasons), this shard
        # completion_tokens per value of `count_column` (when the schema has that column), this shard
        self.tokens: dict[str, int] = {}
        self.token_column = "completion_tokens" if spec.schema.get_field_index("completion_tokens") >= 0 else None

    # ---- names -----------------------------------------------------------------------------------
    def _part(self, k: int) -> Path:
        return self.data_dir / f"part-{self.shard_tag}-{k:05d}.parquet"

    def _journal(self, k: int) -> Path:
        return self.journal_dir / f"{self.shard_tag}-{k:05d}.arrows"

    def _numbers(self, folder: Path, pattern: str) -> dict[int, Path]:
        rx = re.compile(pattern.format(tag=re.escape(self.shard_tag)))
        out = {}
        for p in folder.iterdir():
            m = rx.fullmatch(p.name)
            if m:
                out[int(m.group(1))] = p
        return out

    # ---- recovery --------------------------------------------------------------------------------
    def recover(self, drop_errors: bool = False) -> tuple[DoneSet, list[pa.RecordBatch]]:
        """Clean up after a crash; return the finished keys and the journaled rows to re-emit.

        drop_errors (`engine run --retry-errors`): rows whose `count_column` is "error" are removed
        first (each part rewritten whole and renamed into place), so their keys are not done."""
        for tmp in self.data_dir.glob(f"part-{self.shard_tag}-*.parquet.tmp"):
            tmp.unlink()
        parts = self._numbers(self.data_dir, r"part-{tag}-(\d+)\.parquet")
        journals = self._numbers(self.journal_dir, r"{tag}-(\d+)\.arrows")
        self._reconcile_manifest(parts)
        if drop_errors and self.count_column:
            parts = {k: p for k, p in parts.items() if self._drop_errors(p)}
        hashes: list[int] = []
        for p in parts.values():
            cols = [self.key_column] + ([self.count_column] if self.count_column else [])
            cols += [self.token_column] if self.count_column and self.token_column else []
            table = pq.read_table(p, columns=cols)
            keys = table.column(0).to_pylist()
            hashes.extend(map(id_hash, keys))
            self.rows_total += len(keys)
            if self.count_column:
                self._count(table.column(1), table.column(2) if self.token_column else None)
        self.duplicates = len(hashes) - len(np.unique(np.asarray(hashes, dtype=np.uint64)))
        if self.duplicates:
            log.warning("DUPLICATES: %s holds %d row(s) whose %s is stored more than once (two runs wrote shard %s "
                        "at once, before leases existed); they are counted, not removed", self.data_dir,
                        self.duplicates, self.key_column, self.shard_tag)
        replay: list[pa.RecordBatch] = []
        for k, j in sorted(journals.items()):
            if k in parts:
                j.unlink()  # its part was committed before the crash
                continue
            batches = _read_journal(j, self.schema)
            if drop_errors and self.count_column:
                kept = [b.filter(pc.not_equal(b.column(self.count_column), "error")) for b in batches]
                self.dropped += sum(b.num_rows for b in batches) - sum(b.num_rows for b in kept)
                batches = [b for b in kept if b.num_rows]
            replay.extend(batches)
        # A crash between replay() writing its new journal and deleting the old ones leaves the same rows
        # in two journals: keep the first copy of each key (and none of a key already in a part).
        in_parts, seen = DoneSet(hashes), set()
        deduped = []
        for b in replay:
            keys = [id_hash(k) for k in b.column(self.key_column).to_pylist()]
            stored = in_parts.contains(np.asarray(keys, dtype=np.uint64))
            keep = [not s and h not in seen for h, s in zip(keys, stored)]
            seen.update(keys)
            if all(keep):
                deduped.append(b)
            elif any(keep):
                deduped.append(b.filter(pa.array(keep)))
            hashes.extend(h for h, k in zip(keys, keep) if k)
        replay = deduped
        self.k = max([*parts, *journals], default=-1) + 1
        self._stale_journals = [j for k, j in journals.items() if k not in parts]
        return DoneSet(hashes), replay

    def _drop_errors(self, part: Path) -> bool:
        """Rewrite a committed part without its error rows (atomically); False when nothing is left."""
        flags = pq.read_table(part, columns=[self.count_column]).column(0)
        errors = pc.sum(pc.equal(flags, "error")).as_py() or 0
        if not errors:
            return True
        table = pq.read_table(part)
        kept = table.filter(pc.not_equal(table.column(self.count_column), "error"))
        self.dropped += errors
        if not kept.num_rows:
            part.unlink()
            fsync_dir(self.data_dir)
            return False
        tmp = part.with_suffix(".parquet.tmp")
        pq.write_table(kept, tmp, compression="zstd", compression_level=self.level, row_group_size=self.row_group_rows)
        replace_synced(tmp, part)
        self._manifest_append(part, kept.num_rows)
        return True

    def replay(self, batches: list[pa.RecordBatch]) -> None:
        """Re-emit recovered rows into a new journal (flushed) before deleting the old ones."""
        for b in batches:
            self.add(b)
        if batches:
            self.flush(sync=True)
        for j in self._stale_journals:
            j.unlink()
        self._stale_journals = []

    def _reconcile_manifest(self, parts: dict[int, Path]) -> None:
        listed = set()
        if self.manifest.exists():
            for line in self.manifest.read_bytes().splitlines():
                try:
                    listed.add(orjson.loads(line)["part"])
                except (orjson.JSONDecodeError, KeyError):
                    pass  # a torn last line from a crash
        for _, p in sorted(parts.items()):
            if p.name not in listed:
                self._manifest_append(p, pq.ParquetFile(p).metadata.num_rows)

    def _manifest_append(self, part: Path, rows: int) -> None:
        line = orjson.dumps({"part": part.name, "rows": rows, "bytes": part.stat().st_size,
                             "committed_at": time.time()}) + b"\n"
        with open(self.manifest, "ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    # ---- writing ---------------------------------------------------------------------------------
    def add(self, batch: pa.RecordBatch) -> None:
        if self.journal is None:
            self.journal = open(self._journal(self.k), "wb", buffering=1 << 20)
            self.journal_ipc = pa.ipc.new_stream(self.journal, self.schema)
        self.journal_ipc.write_batch(batch)
        self.buffer.append(batch)
        self.buffered += batch.num_rows
        self.rows_total += batch.num_rows
        if self.count_column:
            self._count(batch.column(self.count_column),
                        batch.column(self.token_column) if self.token_column else None)
        if self.buffered >= self.row_group_rows:
            self._write_group()

    def _count(self, values: pa.Array | pa.ChunkedArray, tokens: pa.Array | pa.ChunkedArray | None = None) -> None:
        for item in pc.value_counts(values).to_pylist():
            v = item["values"]
            self.counts[v] = self.counts.get(v, 0) + item["counts"]
        if tokens is not None:
            sums = pa.table({"v": values, "t": tokens}).group_by("v").aggregate([("t", "sum")])
            for v, t in zip(sums.column("v").to_pylist(), sums.column("t_sum").to_pylist()):
                self.tokens[v] = self.tokens.get(v, 0) + int(t or 0)

    def _write_group(self) -> None:
        if not self.buffer:
            return
        table = pa.Table.from_batches(self.buffer, schema=self.schema)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self._tmp(), self.schema, compression="zstd",
                                           compression_level=self.level)
        self.writer.write_table(table, row_group_size=table.num_rows)
        self.part_rows += table.num_rows
        self.buffer, self.buffered = [], 0
        if self._tmp().stat().st_size >= self.file_max_bytes:
            self.commit()

    def _tmp(self) -> Path:
        return self._part(self.k).with_suffix(".parquet.tmp")

    def flush(self, sync: bool = False) -> None:
        if self.journal is not None:
            self.journal.flush()
            if sync:
                os.fsync(self.journal.fileno())

    def commit(self) -> None:
        """Write what is buffered and make the current part visible under its final name."""
        self._write_group()
        if self.writer is None:
            return
        self.flush(sync=True)
        self.writer.close()
        self.writer = None
        final = self._part(self.k)
        replace_synced(self._tmp(), final)
        self._manifest_append(final, self.part_rows)
        self.journal_ipc.close()
        self.journal.close()
        self.journal = self.journal_ipc = None
        self._journal(self.k).unlink()
        self.k += 1
        self.part_rows = 0

    def close(self) -> None:
        self.commit()


def _read_journal(path: Path, schema: pa.Schema) -> list[pa.RecordBatch]:
    """The batches of a journal; a batch torn by a crash (only the last can be) is dropped."""
    batches: list[pa.RecordBatch] = []
    try:
        with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
            for batch in reader:
                batches.append(batch)
    except (pa.ArrowInvalid, OSError) as exc:
        log.info("%s: ignoring a torn last batch after %d batches (%s)", path, len(batches), exc)
    if batches and batches[0].schema != schema:
        raise WriterError(f"{path}: journal schema differs from this run's output schema; inspect it before resuming")
    return batches
