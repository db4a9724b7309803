"""What the input of a run is: file labels (the `<file>` of derived ids and `doc_ref`) and the input record
kept in the run's fingerprint, so that a resume into an output made from other input is refused.

Labels: a file matched by a glob is labelled by its path relative to the glob's own base (the leading
path components without `*`, `?` or `[`): `data/**/*.jsonl` gives `2024/a.jsonl` for
`data/2024/a.jsonl`. A file given by name (no glob) is labelled by its name. A label depends only on the
file and its own pattern, never on which other files are in the run, so ids do not change when files
join. Two files with the same label would give colliding ids: refused (InputError), naming both.

Input record: per file its label, path (as expanded: absolute for local files, the URL for stores),
size, and a content signature: sha256 of the size, the first 64 KiB and the last 64 KiB (the Parquet
footer; the head and tail of a JSONL file), read with two range requests from a store.

At the end of a run (`check_read`) the files it read are signed again and compared with the record
taken at its start, and the rows it read (documents + rejected rows) with the rows preflight counted:
an input changed, cut or removed under a running run is an InputError naming the file, never "complete".
"""
from __future__ import annotations

import glob
import hashlib
from pathlib import Path, PurePosixPath

from engine.errors import InputChanged, InputError
from engine.stores import filesystem, is_remote, retrying

BLOCK = 64 * 1024


def _strip(path: str) -> str:
    return str(path).split("://", 1)[-1]


def label_for(match: str, pattern: str) -> str:
    """The label of `match`, a file `pattern` expanded to (module doc)."""
    m, p = PurePosixPath(_strip(match)), _strip(pattern)
    if not glob.has_magic(p):
        return m.name
    base: list[str] = []
    for part in PurePosixPath(p).parts:
        if glob.has_magic(part):
            break
        base.append(part)
    try:
        return m.relative_to(PurePosixPath(*base)).as_posix() if base else m.as_posix()
    except ValueError:
        return m.name


def check_labels(files: list[tuple[Path | str, str]]) -> list[tuple[Path | str, str]]:
    seen: dict[str, Path | str] = {}
    for path, label in files:
        if label in seen:
            raise InputError(f"input files {seen[label]} and {path} have the same label {label!r}: their derived ids "
                             f"(<file>:<row>) would collide. Give them as one glob whose base is their common "
                             f"folder (e.g. 'corpus/*/{PurePosixPath(label).name}'), so that labels keep their folders")
        seen[label] = path
    return files


def signature(path: Path | str) -> tuple[int, str]:
    """(size, content signature) of a local file or a store object, reading at most 128 KiB."""

    if isinstance(path, str) and is_remote(path):

        fs, p = filesystem(path)
        size = int(retrying(lambda: fs.size(p), f"{path}: size", 60))
        head = retrying(lambda: fs.cat_file(p, start=0, end=min(size, BLOCK)), f"{path}: reading", 60) if size else b""
        tail = retrying(lambda: fs.cat_file(p, start=max(0, size - BLOCK), end=size), f"{path}: reading", 60) \
            if size > BLOCK else b""
    else:
        size = Path(path).stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(BLOCK)
            tail = b""
            if size > BLOCK:
                fh.seek(max(0, size - BLOCK))
                tail = fh.read(BLOCK)
    h = hashlib.sha256(str(size).encode() + b"\0" + head + b"\0" + tail)
    return size, h.hexdigest()[:24]


def input_record(files) -> list[dict]:
    """The fingerprint's record of the input files (objects with .path and .label)."""
    out = []
    for f in files:
        size, sig = signature(f.path)
        out.append({"label": f.label, "path": str(f.path), "size": size, "signature": sig})
    return out


def compare(old: list[dict], new: list[dict]) -> tuple[list[str], list[str]]:
    """(what changed or went missing, labels that joined) between two input records."""
    before, after = {f["label"]: f for f in old}, {f["label"]: f for f in new}
    changed = []
    for label, f in before.items():
        g = after.get(label)
        if g is None:
            changed.append(f"input file {label} ({f['path']}) is no longer in the input")
        elif (f["size"], f["signature"]) != (g["size"], g["signature"]):
            what = f"size {f['size']:,} -> {g['size']:,} bytes" if f["size"] != g["size"] else "its content differs"
            changed.append(f"input file {label} ({g['path']}) is not the file these results were made from ({what})")
    return changed, [label for label in after if label not in before]


def check_read(record: list[dict], files, rows_read: int, rows_expected: int | None) -> None:
    """Raise InputError when the input a run has just read is not the input recorded at its start: a file
    (of `files`, those this shard read: objects with .path and .label) whose size or signature changed or
    that is gone, or a row count other than preflight's (`rows_expected`; None: not known, not compared)."""
    recorded = {f["label"]: f for f in record}
    problems = []
    for f in files:
        old = recorded.get(f.label)
        if old is None:
            continue
        try:
            size, sig = signature(f.path)
        except FileNotFoundError:
            problems.append(f"input file {f.label} ({f.path}) is gone: it was removed while the run read it")
            continue
        except OSError as exc:
            problems.append(f"input file {f.label} ({f.path}) cannot be read again: {exc}")
            continue
        if (size, sig) != (old["size"], old["signature"]):
            what = f"size {old['size']:,} -> {size:,} bytes" if size != old["size"] else "its content differs"
            problems.append(f"input file {f.label} ({f.path}) changed while the run read it ({what})")
    if rows_expected is not None and rows_read != rows_expected:
        problems.append(f"the run read {rows_read:,} input rows (documents + rejected rows) where {rows_expected:,} "
                        f"were counted at its start")
    if problems:
        raise InputChanged("the input changed under the run; its results are not complete:\n  " + "\n  ".join(problems))
