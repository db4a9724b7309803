"""Crash-safe storage of one stream of rows (one prompt, or the rejected rows) of one shard.

Files, for shard tag T (`s00003-of-00016`) and part number k:
  <dir>/part-T-k.parquet              committed zstd Parquet part (appears only by atomic rename)
  <dir>/part-T-k.parquet.tmp          the part being written (never read; deleted on recovery)
  <root>/_journal/<stream>/T-k.arrows every row of part k, as an Arrow IPC stream of record batches,
                                      each with its checksum, flushed every few seconds (journal.py)
  <root>/_manifest/<stream>/T.jsonl   one line per committed part: name, rows, bytes, CRC-32, time (manifest.py)

Part k and journal k hold the same rows. Commit order: close the .tmp, fsync, rename, append to the
manifest, delete journal k. So after a crash at any point: a part under its final name is complete;
a journal whose part exists is stale (deleted); any other journal holds finished rows that are
re-emitted into the next part, and nothing else was lost but requests in flight.

Everything is checked when read back: a journal batch that fails its checksum is dropped with a warning
(its documents are generated again, journal.py); a part is checked against its manifest record (size,
CRC-32) before recovery trusts it: a missing one is said and its rows generated again, a damaged one stops
the run with a DamagedOutput naming it. A failed write (disk full) is a WriterError naming the file.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.atomic import fsync_dir, replace_synced
from engine.errors import DamagedOutput, WriterError
from engine.gate import useful_mask
from engine.ids import DoneSet, id_hash
from engine.metrics import Tally, add_tallies
from engine.output.journal import JournalWriter, read_journal
from engine.output.manifest import check_part, read_manifest, record_part, record_removed

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
    text_column: str | None = None  # with count_column: the generated text the quality gate reads (engine/gate.py)

    @property
    def data_dir(self) -> Path:
        return self.root / self.stream


@dataclass(frozen=True)
class StreamCounts:
    """A stream's stored rows at one moment: `rows` (committed + journaled), their tally per `count_column`
    value, and `duplicates` (found at recovery)."""
    rows: int
    tally: dict[str, Tally]
    duplicates: int = 0


class PartSink:
    """One stream of one shard: rows in, committed zstd Parquet parts out, crash-safe (module doc).

    Lifecycle: `recover()` once (clean up after a crash; returns what is done and the journaled rows),
    `replay()` those rows, then `add()` record batches (journaled at once, flushed by `flush()`),
    `commit()` whenever a part is full and at `close()`. Counts: `rows_total` (every stored row of the
    shard, recovered ones included), `tally` (per value of `count_column`: rows, their completion tokens and
    the tokens of rows that pass the quality gate, engine/gate.py), `dropped` (error rows removed by
    --retry-errors). `add()` returns the batch's own tally, so the writer can report what it stored.
    Used from one thread at a time (the writer thread once the run goes)."""

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
        self.journal: JournalWriter | None = None  # the open journal
        self.part_rows = 0
        self.rows_total = 0  # rows stored (committed + journaled), recovered ones included
        self.dropped = 0  # error rows removed by recover(drop_errors=True)
        self.duplicates = 0  # committed rows whose key another committed row of this shard has (found by recover)
        self.tally: dict[str, Tally] = {}  # per value of `count_column` (finish reasons), this shard
        self.token_column = "completion_tokens" if spec.schema.get_field_index("completion_tokens") >= 0 else None
        # prompt tokens and the backend's cached share of them, summed where the stream has them (results)
        self.prompt_columns = [c for c in ("prompt_tokens", "cached_tokens") if spec.schema.get_field_index(c) >= 0]
        self.text_column = spec.text_column

    def counts(self) -> StreamCounts:
        return StreamCounts(self.rows_total, dict(self.tally), self.duplicates)

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
        self._check_parts(parts)
        if drop_errors and self.count_column:
            parts = {k: p for k, p in parts.items() if self._drop_errors(p)}
        hashes: list[int] = []
        for p in parts.values():
            cols = [self.key_column] + ([self.count_column] if self.count_column else [])
            cols += [c for c in (self.token_column, self.text_column) if c and self.count_column]
            cols += self.prompt_columns if self.count_column else []
            try:
                table = pq.read_table(p, columns=cols)
            except (pa.ArrowException, OSError) as exc:
                raise _damaged(p, f"not readable Parquet ({exc})") from None
            keys = table.column(0).to_pylist()
            hashes.extend(map(id_hash, keys))
            self.rows_total += len(keys)
            if self.count_column:
                self._count(table)
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
            batches = read_journal(j, self.schema)
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
        self.k = max([*parts, *journals, *self._listed], default=-1) + 1  # a part's name is never reused
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
        tmp = part.with_suffix(".parquet.tmp")
        try:
            if not kept.num_rows:
                record_removed(self.manifest, part.name, "--retry-errors: only error rows")
                part.unlink()
                fsync_dir(self.data_dir)
                return False
            pq.write_table(kept, tmp, compression="zstd", compression_level=self.level,
                           row_group_size=self.row_group_rows)
            # recorded before the rename: a crash between leaves the old part, which its older record still lists
            record_part(self.manifest, tmp, kept.num_rows, name=part.name)
            replace_synced(tmp, part)
        except OSError as exc:
            raise WriterError.writing(tmp, exc) from exc
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

    def _check_parts(self, parts: dict[int, Path]) -> None:
        """Every part against the manifest before it is trusted (deep: its checksum); a part committed just
        before a crash, before its manifest line, is listed now; one listed but gone is said (its rows are
        not done: generated again); a damaged one stops the run, named (DamagedOutput)."""
        listed = read_manifest(self.manifest)
        self._listed = [int(m.group(1)) for name in listed
                        if (m := re.fullmatch(rf"part-{re.escape(self.shard_tag)}-(\d+)\.parquet", name))]
        on_disk = {p.name: p for p in parts.values()}
        try:
            for name, history in sorted(listed.items()):
                if name not in on_disk and history and history[-1].removed is None:
                    log.warning("%s: missing (the manifest lists it with %d row(s)): its rows are generated again",
                                self.data_dir / name, history[-1].rows)
                    record_removed(self.manifest, name, "missing at resume")
            for name, p in sorted(on_disk.items()):
                history = listed.get(name, [])
                if not history or history[-1].removed is not None:  # committed just before its manifest line
                    try:
                        rows = pq.ParquetFile(p).metadata.num_rows
                    except (pa.ArrowException, OSError) as exc:
                        raise _damaged(p, f"not readable Parquet ({exc})") from None
                    record_part(self.manifest, p, rows)
                    continue
                problem = check_part(p, history, deep=True)
                if problem:
                    raise _damaged(p, problem)
        except OSError as exc:
            raise WriterError.writing(self.manifest, exc) from exc

    # ---- writing ---------------------------------------------------------------------------------
    def add(self, batch: pa.RecordBatch) -> dict[str, Tally]:
        """Journal `batch` and buffer it for the current part; its tally (empty without a count column)."""
        path = self._journal(self.k)
        try:
            if self.journal is None:
                self.journal = JournalWriter(path, self.schema)
            self.journal.write(batch)
        except OSError as exc:
            raise self._failed(path, exc) from exc
        self.buffer.append(batch)
        self.buffered += batch.num_rows
        self.rows_total += batch.num_rows
        tally = self._count(batch) if self.count_column else {}
        if self.buffered >= self.row_group_rows:
            self._write_group()
        return tally

    def _count(self, rows: pa.RecordBatch | pa.Table) -> dict[str, Tally]:
        """Add the tally of `rows` (per `count_column` value) to the shard's; return the tally of `rows`."""
        values = rows.column(self.count_column)
        n = len(values)
        tokens = rows.column(self.token_column) if self.token_column else pa.array([0] * n, pa.int32())
        useful = pc.if_else(useful_mask(values, rows.column(self.text_column)), tokens, 0) \
            if self.text_column else pa.array([0] * n, pa.int64())
        zeros = pa.array([0] * n, pa.int32())
        prompt = [rows.column(c) if c in self.prompt_columns else zeros for c in ("prompt_tokens", "cached_tokens")]
        sums = pa.table({"v": values, "t": tokens, "u": useful, "p": prompt[0], "c": prompt[1]}).group_by(
            "v").aggregate([("t", "count", pc.CountOptions(mode="all")), ("t", "sum"), ("u", "sum"), ("p", "sum"),
                            ("c", "sum")])
        out: dict[str, Tally] = {}
        for v, rows_n, t, u, pt, ct in zip(*(sums.column(c).to_pylist()
                                             for c in ("v", "t_count", "t_sum", "u_sum", "p_sum", "c_sum"))):
            out[v] = Tally(int(rows_n), int(t or 0), int(u or 0), int(pt or 0), int(ct or 0))
        add_tallies(self.tally, out)
        return out

    def _write_group(self) -> None:
        if not self.buffer:
            return
        table = pa.Table.from_batches(self.buffer, schema=self.schema)
        try:
            if self.writer is None:
                self.writer = pq.ParquetWriter(self._tmp(), self.schema, compression="zstd",
                                               compression_level=self.level)
            self.writer.write_table(table, row_group_size=table.num_rows)
            full = self._tmp().stat().st_size >= self.file_max_bytes
        except OSError as exc:
            raise self._failed(self._tmp(), exc) from exc
        self.part_rows += table.num_rows
        self.buffer, self.buffered = [], 0
        if full:
            self.commit()

    def _tmp(self) -> Path:
        return self._part(self.k).with_suffix(".parquet.tmp")

    def flush(self, sync: bool = False) -> None:
        if self.journal is not None:
            try:
                self.journal.flush(sync)
            except OSError as exc:
                raise self._failed(self.journal.path, exc) from exc

    def commit(self) -> None:
        """Write what is buffered and make the current part visible under its final name."""
        self._write_group()
        if self.writer is None:
            return
        self.flush(sync=True)
        final = self._part(self.k)
        step = self._tmp()
        try:
            self.writer.close()
            self.writer = None
            replace_synced(self._tmp(), final)
            step = self.manifest
            record_part(self.manifest, final, self.part_rows)
            step = self._journal(self.k)
            self.journal.close()
            self.journal = None
            self._journal(self.k).unlink()
        except OSError as exc:
            raise self._failed(step, exc) from exc
        self.k += 1
        self.part_rows = 0

    def close(self) -> None:
        self.commit()

    def _failed(self, path: Path, exc: OSError) -> WriterError:
        """A write failed (disk full, permissions): close what is open without raising again (a half-written
        part stays a .tmp, deleted by the next recovery; the journal keeps its rows) and name the file."""
        self.abort()
        return WriterError.writing(path, exc)

    def abort(self) -> None:
        """Close the open part and journal without raising (after a failed write, or when another stream's
        write failed): nothing is committed; the next run recovers from the journal."""
        if self.writer is not None:
            try:
                self.writer.close()
            except (OSError, pa.ArrowException):
                self.writer.is_open = False  # or its __del__ tries again, with a traceback at exit
            self.writer = None
        if self.journal is not None:
            self.journal.abort()
            self.journal = None



def _damaged(part: Path, problem: str) -> DamagedOutput:
    return DamagedOutput(f"{part}: {problem}; this shard's committed results cannot be trusted as they are. Delete "
                         f"that file (or move it out of the output directory) and run the same command again: its "
                         f"rows are generated again")
