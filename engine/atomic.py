"""Files that survive a crash: written under a temporary name, fsynced, renamed into place, and the
directory fsynced, so a reader sees the old file or the new one whole, never a torn one.

Every writer of a file that must survive a crash uses these two functions (state files, the
fingerprint, the dataset card, summaries, Parquet parts, mix and export files).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or deletion in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_synced(tmp: Path, final: Path) -> None:
    """Move a finished temporary file into place durably: fsync it, rename it, fsync the directory."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def temp_name(path: Path) -> Path:
    """A temporary name beside `path`, unique to this process and thread (two writers never share one)."""
    return path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old content or the new, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write() names no file: name it
            exc.filename = str(path)
        raise
    fsync_dir(path.parent)
