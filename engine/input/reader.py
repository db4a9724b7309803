"""Input: stream documents from Parquet, JSONL and JSONL.zst files in batches, validated.

Policy for bad input (see README, "Bad input"):
- fail fast, before any generation, naming the file: a path or glob that matches nothing, an unknown
  file type, a Parquet file that cannot be opened (truncated, another format), a text column that is
  missing or not a string type, a JSONL file with no parseable line among its first lines or whose
  lines lack the text field, a zstd stream that is truncated or corrupt, source columns whose types
  cannot be reconciled across files;
- skip and record in `rejected/` with the reason, the run going on: a row whose text is null, empty,
  whitespace only, not a string, or longer than `input.max_doc_chars`; a JSON line that does not
  parse (invalid JSON or invalid UTF-8); a duplicate id (the first occurrence wins);
- accept: empty files (a warning), control characters and any valid Unicode (passed to the model as
  they are), a row with no id or a null id (the id becomes "<file>:<row>"), multi-megabyte documents
  below the limit (truncated to the model's budget by the renderer, recorded per row).
"""
from __future__ import annotations

import contextlib
import copy
import glob
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from engine.errors import InputChanged, InputError, StoreError
from engine.input.identity import check_labels, label_for
from engine.input.json_columns import JsonCoercer, castable, json_schema
from engine.stores import filesystem, is_remote, open_input, retrying
from engine.types import Doc, Rejection

log = logging.getLogger(__name__)

PREFLIGHT_JSON_LINES = 50  # lines of each JSONL file looked at before the run starts


@dataclass
class InputFile:
    path: Path | str  # a local path, or a store URL (s3://, gs://, hf://...; see stores.py)
    label: str  # short name used in ids and messages
    kind: str  # parquet | jsonl | jsonl.zst
    rows: int | None = None  # known after preflight
    empty: bool = False


@dataclass
class DocBatch:
    docs: list[Doc] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    rows_seen: int = 0  # input rows of this shard covered by the batch (docs + rejected)


def _pure(path: Path | str) -> PurePosixPath:
    """The path part of a local path or URL (for names and labels)."""
    return PurePosixPath(str(path).split("://", 1)[-1])


def _remote(path: Path | str) -> bool:
    return isinstance(path, str) and is_remote(path)


@contextlib.contextmanager
def open_binary(path: Path | str):
    """A local file, or a store object streamed with read-ahead (stores.open_input)."""
    if _remote(path):
        with open_input(str(path)) as fh:
            yield fh
    else:
        with open(path, "rb") as fh:
            yield fh


def _size(path: Path | str) -> int:
    if _remote(path):
        fs, p = filesystem(str(path))
        return int(fs.size(p))
    return Path(path).stat().st_size


def file_kind(path: Path | str) -> str:
    name = _pure(path).name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl.zst", ".jsonl.zstd", ".json.zst")):
        return "jsonl.zst"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise InputError(f"{path}: unknown input type (expected .parquet, .jsonl or .jsonl.zst)")


def expand_paths(patterns: list[str]) -> list[Path | str]:
    return [p for p, _ in expand_inputs(patterns)]


def expand_inputs(patterns: list[str]) -> list[tuple[Path | str, str]]:
    """Every input file once, with its label (input/identity.py: relative to its own glob's base)."""
    files: dict[Path | str, str] = {}
    for pattern in patterns:
        if _remote(pattern):
            for m in _expand_remote(pattern):
                files.setdefault(m, label_for(m, pattern))
            continue
        if pattern.startswith("file://"):
            pattern = pattern[len("file://"):]
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if not os.path.isdir(m)]
        if not matches or not os.path.exists(matches[0]):
            raise InputError(f"input path {pattern!r} matches no file")
        for m in matches:
            files.setdefault(Path(m).resolve(), label_for(m, pattern))
    return check_labels(list(files.items()))


def _expand_remote(pattern: str) -> list[str]:

    fs, path = filesystem(pattern)
    try:
        if glob.has_magic(path):
            found = sorted(retrying(lambda: fs.glob(path), f"listing {pattern}", 60))
            found = [m for m in found if not retrying(lambda m=m: fs.isdir(m), f"listing {pattern}", 60)]
        else:
            found = [path] if retrying(lambda: fs.isfile(path), f"reading {pattern}", 60) else []
    except StoreError as exc:
        raise InputError(f"input path {pattern!r}: {exc}") from None
    if not found:
        raise InputError(f"input path {pattern!r} matches no file")
    return [fs.unstrip_protocol(m) for m in found]


def _zst_chunks(path: Path | str) -> Iterator[bytes]:
    """Decompressed data of every frame; a stream that ends inside a frame raises ZstdError."""
    with open_binary(path) as fh:
        dobj, fed = zstandard.ZstdDecompressor().decompressobj(), False
        while chunk := fh.read(1 << 20):
            while chunk:
                out = dobj.decompress(chunk)
                fed = True
                if out:
                    yield out
                chunk = b""
                if dobj.eof:  # the next frame, if any, starts in unused_data
                    chunk = dobj.unused_data
                    dobj, fed = zstandard.ZstdDecompressor().decompressobj(), False
        if fed and not dobj.eof:
            raise zstandard.ZstdError("the stream ends inside a frame")


def _open_lines(f: InputFile) -> Iterator[bytes]:
    if f.kind != "jsonl.zst":
        with open_binary(f.path) as fh:
            yield from fh
        return
    rest = b""
    for chunk in _zst_chunks(f.path):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


class Reader:
    """Validates the inputs up front, then yields `DocBatch`es of this shard's rows."""

    text_option = "input.text_column"  # the setting a hint names (`engine mix` reads with --text-column)

    def __init__(self, patterns: list[str], text_column: str, id_column: str, batch_rows: int,
                 max_doc_chars: int, shard_index: int = 0, shard_count: int = 1):
        self.text_column = text_column
        self.id_column = id_column
        self.batch_rows = batch_rows
        self.max_doc_chars = max_doc_chars
        self.files = [InputFile(p, label, file_kind(p)) for p, label in expand_inputs(patterns)]
        # Shards split whole files when there are enough of them, else rows (row % count).
        self.shard_index, self.shard_count = shard_index, shard_count
        self.split_files = len(self.files) >= shard_count
        if self.split_files:
            self.my_files = self.files[shard_index::shard_count]
        else:
            self.my_files = list(self.files)
        self.schema: pa.Schema | None = None  # passthrough columns (text and id excluded)
        self.warnings: list[str] = []
        self.rows_read = 0  # this shard's rows `batches()` has read so far (documents + rejected rows)
        self.window: dict[str, tuple[int, int]] | None = None  # a unit's rows: file label -> [first, end) (units())
        self.unit_rows = 0  # of a unit reader: the rows of its range

    # ---- units (input.unit_rows) -------------------------------------------------------------------
    def unit_count(self, unit_rows: int) -> int:
        """How many units of `unit_rows` contiguous rows the whole input makes (after preflight: rows known)."""
        total = sum(f.rows or 0 for f in self.files)
        return max(1, -(-total // unit_rows))

    def unit(self, index: int, unit_rows: int) -> Reader:
        """A reader of unit `index`: rows [index x unit_rows, (index + 1) x unit_rows) of the whole input, the
        files in their order (by label) and each file's rows in order. It depends only on the input and
        `unit_rows`, never on which process reads it or how many do. Needs preflight on every file
        (shard.count = 1): the row counts place the unit."""
        lo, hi = index * unit_rows, (index + 1) * unit_rows
        unit = copy.copy(self)
        unit.window, unit.my_files, unit.rows_read, unit.warnings = {}, [], 0, []
        start = 0
        for f in self.files:
            rows = f.rows or 0
            a, b = max(lo, start), min(hi, start + rows)
            if a < b:
                unit.my_files.append(f)
                unit.window[f.label] = (a - start, b - start)
            start += rows
        unit.unit_rows = max(0, min(hi, start) - lo)
        return unit

    # ---- preflight -------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Check every file of this shard before generation starts; count rows where cheap."""
        for f in self.my_files:
            if _size(f.path) == 0:
                f.empty, f.rows = True, 0
                self._warn(f"{f.path}: empty file, nothing to read")
                continue
            if f.kind == "parquet":
                self._preflight_parquet(f)
            else:
                self._preflight_jsonl(f)

    def _warn(self, msg: str) -> None:
        log.warning(msg)
        self.warnings.append(msg)

    def _preflight_parquet(self, f: InputFile) -> None:
        try:
            with open_binary(f.path) as fh:
                pf = pq.ParquetFile(fh)
                schema, rows = pf.schema_arrow, pf.metadata.num_rows
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad footer
            raise InputError(f"{f.path}: not a readable Parquet file (truncated or another format): {exc}") from None
        if self.text_column not in schema.names:
            raise InputError(f"{f.path}: no text column {self.text_column!r} (columns: {', '.join(schema.names)}); "
                             f"set {self.text_option}")
        tp = schema.field(self.text_column).type
        if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_string_view(tp)):
            raise InputError(f"{f.path}: text column {self.text_column!r} has type {tp}, expected a string type")
        f.rows = rows
        self._merge_schema(f, pa.schema([fl for fl in schema if fl.name not in (self.text_column, self.id_column)]))

    def _merge_schema(self, f: InputFile, schema: pa.Schema) -> None:
        if self.schema is None:
            self.schema = schema
            return
        extra = [n for n in schema.names if n not in self.schema.names]
        if extra:
            self._warn(f"{f.path}: column(s) {', '.join(extra)} are not in the first input file; not passed through")
        for fl in schema:
            if fl.name in self.schema.names:
                target = self.schema.field(fl.name).type
                if fl.type != target and not castable(fl.type, target):
                    raise InputError(f"{f.path}: column {fl.name!r} has type {fl.type}, but earlier files have "
                                     f"{target}; make the schemas agree or drop the column")

    def _preflight_jsonl(self, f: InputFile) -> None:
        rows = parsed = with_text = 0
        try:
            for line in _open_lines(f):
                rows += 1
                if rows <= PREFLIGHT_JSON_LINES and line.strip():
                    try:
                        obj = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(obj, dict):
                        parsed += 1
                        with_text += self.text_column in obj
                        if parsed == 1:
                            self._merge_schema(f, json_schema(obj, self.text_column, self.id_column))
        except zstandard.ZstdError as exc:
            raise InputError(f"{f.path}: zstd stream is truncated or corrupt after line {rows}: {exc}") from None
        if rows and not parsed:
            raise InputError(f"{f.path}: none of the first {min(rows, PREFLIGHT_JSON_LINES)} lines is a JSON object; "
                             "is this JSON lines?")
        if parsed and not with_text:
            raise InputError(f"{f.path}: the JSON objects have no field {self.text_column!r}; "
                             f"set {self.text_option}")
        f.rows = rows

    @property
    def total_rows(self) -> int | None:
        """Rows of this shard (or unit), when every file's row count is known."""
        if self.window is not None:
            return self.unit_rows
        if any(f.rows is None for f in self.my_files):
            return None
        total = sum(f.rows for f in self.my_files)  # type: ignore[misc]
        if self.split_files or self.shard_count == 1:
            return total
        return sum(len(range(self.shard_index, f.rows, self.shard_count)) for f in self.my_files)  # type: ignore[arg-type]

    # ---- streaming -------------------------------------------------------------------------------
    def batches(self) -> Iterator[DocBatch]:
        """This shard's rows in batches; `rows_read` counts them (documents + rejected rows), so that the end
        of a run can check it read what preflight counted (input/identity.py `check_read`). A file that is
        gone or unreadable when its turn comes is an InputError naming it."""
        self.rows_read = 0
        for f in self.my_files:
            if f.empty:
                continue
            rows = self._parquet_rows(f) if f.kind == "parquet" else self._jsonl_rows(f)
            first, end = self.window[f.label] if self.window is not None else (0, None)
            batch = DocBatch()
            try:
                for row, obj_or_rej in rows:
                    if row < first:
                        continue
                    if end is not None and row >= end:
                        break
                    if not self.split_files and row % self.shard_count != self.shard_index:
                        continue
                    batch.rows_seen += 1
                    self.rows_read += 1
                    if isinstance(obj_or_rej, Rejection):
                        batch.rejected.append(obj_or_rej)
                    else:
                        self._accept(f, row, obj_or_rej, batch)
                    if batch.rows_seen >= self.batch_rows:
                        yield batch
                        batch = DocBatch()
            except FileNotFoundError:
                raise InputChanged(f"input file {f.label} ({f.path}) is gone: it was removed or renamed while the "
                                   f"run read its input; the run is not complete") from None
            except (OSError, zstandard.ZstdError) as exc:
                raise InputChanged(f"input file {f.label} ({f.path}) could not be read mid-run ({exc}); the run is "
                                   f"not complete") from None
            if batch.rows_seen:
                yield batch

    def _accept(self, f: InputFile, row: int, obj: dict, batch: DocBatch) -> None:
        source = f"{f.label}:{row}"
        raw_id = obj.pop(self.id_column, None)
        doc_id = source if raw_id is None else str(raw_id)
        text = obj.pop(self.text_column, None)
        reason = None
        if text is None:
            reason = f"text field {self.text_column!r} is missing or null"
        elif not isinstance(text, str):
            reason = f"text field {self.text_column!r} is a {type(text).__name__}, not a string"
        elif not text.strip():
            reason = "text is empty or whitespace only"
        elif len(text) > self.max_doc_chars:
            reason = f"text has {len(text):,} characters, over input.max_doc_chars={self.max_doc_chars:,}"
        if reason:
            batch.rejected.append(Rejection(source, doc_id, reason))
            return
        batch.docs.append(Doc(doc_id, text, source, obj))

    def _parquet_rows(self, f: InputFile) -> Iterator[tuple[int, dict | Rejection]]:
        with open_binary(f.path) as fh:
            yield from self._parquet_file_rows(f, pq.ParquetFile(fh))

    def _parquet_file_rows(self, f: InputFile, pf: pq.ParquetFile) -> Iterator[tuple[int, dict | Rejection]]:
        names = [self.text_column] + ([self.id_column] if self.id_column in pf.schema_arrow.names else [])
        keep = [n for n in (self.schema.names if self.schema else []) if n in pf.schema_arrow.names]
        row, groups = 0, None
        if self.window is not None:  # a unit: only the row groups that hold its rows are read
            first, end = self.window[f.label]
            groups, start = [], 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if start + n > first and start < end:
                    if not groups:
                        row = start
                    groups.append(g)
                start += n
        try:
            for rb in pf.iter_batches(batch_size=self.batch_rows, columns=names + keep, row_groups=groups):
                for fl in self.schema or []:
                    if fl.name not in rb.schema.names:
                        rb = rb.append_column(fl, pa.nulls(rb.num_rows, fl.type))
                    elif rb.schema.field(fl.name).type != fl.type:
                        idx = rb.schema.get_field_index(fl.name)
                        rb = rb.set_column(idx, fl, rb.column(idx).cast(fl.type))
                for obj in rb.to_pylist():
                    yield row, obj
                    row += 1
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{f.path}: unreadable data after row {row}: {exc}") from None

    def _jsonl_rows(self, f: InputFile) -> Iterator[tuple[int, dict | Rejection]]:
        coerce = JsonCoercer(self.schema, f.path, self._warn)
        first = self.window[f.label][0] if self.window is not None else 0
        for row, line in enumerate(_open_lines(f)):
            if row < first:  # before a unit's rows: not parsed
                continue
            ref = f"{f.label}:{row}"
            if not line.strip():
                yield row, Rejection(ref, None, "blank line")
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield row, Rejection(ref, None, f"line {row + 1} is not valid JSON: {exc}")
                continue
            if not isinstance(obj, dict):
                yield row, Rejection(ref, None, f"line {row + 1} is a JSON {type(obj).__name__}, not an object")
                continue
            yield row, coerce(obj, self.text_column, self.id_column)
