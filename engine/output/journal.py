"""The journal of one part being written: its rows as an Arrow IPC stream, each record batch checked.

    <root>/_journal/<stream>/<tag>-k.arrows   the schema, then one record batch per `write()`; flushed by
                                              the writer every few seconds, fsynced before a part commits

Every batch carries, in its IPC custom metadata, `crc32`: the CRC-32 of the batch's own IPC serialisation
(`RecordBatch.serialize()`; Arrow's IPC format has no checksum of its own). `read_journal` serialises each
batch it reads back again and compares, then validates the values (offsets, UTF-8 of string columns), so
a batch damaged on disk (bytes flipped, blocks a power cut left zero-filled) is dropped with a warning,
never replayed: its documents are generated again. A batch torn by a crash (only the last one can be) and
whatever follows an end-of-stream marker (zeros read as one) are dropped the same way. A journal written
before checksums (no `crc32`) is still read, its batches validated.
"""
from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import pyarrow as pa

from engine.errors import WriterError

log = logging.getLogger(__name__)

CRC_KEY = b"crc32"


def batch_crc(batch: pa.RecordBatch) -> int:
    """The checksum a journal records for `batch` (over its IPC serialisation: schema-free, deterministic)."""
    return zlib.crc32(batch.serialize())


class JournalWriter:
    """Appends record batches to one journal file; `flush(sync)` makes them survive a crash."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.file = open(path, "wb", buffering=1 << 20)
        self.ipc = pa.ipc.new_stream(self.file, schema)

    def write(self, batch: pa.RecordBatch) -> None:
        self.ipc.write_batch(batch, custom_metadata={CRC_KEY: str(batch_crc(batch)).encode()})

    def flush(self, sync: bool = False) -> None:
        self.file.flush()
        if sync:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.ipc.close()
        self.file.close()

    def abort(self) -> None:
        """Close without raising (after a failed write: the file stays as the disk has it, for recovery)."""
        for close in (self.ipc.close, self.file.close):
            try:
                close()
            except (OSError, pa.ArrowException, ValueError):
                pass


def read_journal(path: Path, schema: pa.Schema) -> list[pa.RecordBatch]:
    """The intact batches of a journal, in order; damaged, torn or trailing bytes are dropped (said in the log)."""
    batches: list[pa.RecordBatch] = []
    damaged: list[str] = []
    size = path.stat().st_size
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_stream(source)
    except (pa.ArrowInvalid, OSError) as exc:
        if size:
            log.warning("%s: unreadable journal (%s); its rows are generated again", path, exc)
        return []
    if reader.schema != schema:
        raise WriterError(f"{path}: journal schema differs from this run's output schema (damaged, or written by "
                          f"another version); delete the file to generate its rows again, then run the same command")
    index = 0
    while True:
        at = source.tell()
        try:
            batch, meta = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            if source.tell() < size:
                damaged.append(f"{size - source.tell():,} byte(s) after the end-of-stream marker (zero-filled?)")
            break
        except (pa.ArrowInvalid, OSError) as exc:  # torn by a crash (the last batch), or a damaged header
            if "Expected to" in str(exc) or size - at < 8:  # cut short: a crash in the middle of a write
                log.info("%s: ignoring a torn last batch after %d batch(es) (%s)", path, index, exc)
            else:
                damaged.append(f"everything from byte {at:,} on ({size - at:,} bytes: {exc})")
            break
        problem = _check(batch, meta)
        if problem:
            damaged.append(f"batch {index} ({batch.num_rows:,} row(s)): {problem}")
        else:
            batches.append(batch)
        index += 1
    source.close()
    for what in damaged:
        log.warning("%s: damaged on disk, dropped: %s; its documents are generated again", path, what)
    return batches


def _check(batch: pa.RecordBatch, meta) -> str | None:
    """Why a batch read back cannot be trusted, or None."""
    try:
        batch.validate(full=True)  # offsets and UTF-8 (first: serialising junk offsets is not safe)
    except pa.ArrowInvalid as exc:
        return f"invalid values ({exc})"
    if meta is None or CRC_KEY not in meta:
        return None  # a journal written before checksums: validated only
    try:
        expected = int(meta[CRC_KEY])
    except ValueError:
        return "its checksum record is damaged"
    return None if batch_crc(batch) == expected else "checksum mismatch"
