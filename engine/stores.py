"""Object stores and the Hugging Face Hub, through fsspec: reading inputs, mirroring an output directory.

Inputs: `input.paths` may be fsspec URLs (`s3://`, `gs://`, `hf://datasets/ORG/NAME/...`, `file://`)
with globs; files are opened as streams with read-ahead (never downloaded first). Credentials come
from where each client looks (AWS_* variables and ~/.aws for s3fs, GOOGLE_APPLICATION_CREDENTIALS
for gcsfs, HF_TOKEN / `hf auth login` for the Hub), never from our config.

Outputs: an `output.dir` URL is mirrored from a local staging directory (engine/output/remote.py);
its uploads are retried as here.
Transient store errors (connection errors, timeouts, HTTP 408/412/429/5xx, S3 SlowDown, the Hub's
LFS verification failures) are retried with exponential backoff; others (403, 404, bad
credentials) fail at once.
"""
from __future__ import annotations

import errno
import io
import logging
import random
import re
import time
from pathlib import Path

from engine.errors import StoreError

log = logging.getLogger(__name__)

LOCAL_SCHEMES = ("", "file", "local")
TRANSIENT_CODES = {408, 412, 423, 425, 429, 500, 502, 503, 504}
TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                    getattr(errno, "EREMOTEIO", errno.EIO)}
TRANSIENT_TEXT = ("slowdown", "slow down", "reduce your request rate", "timeout", "timed out", "temporarily", "throttl",
                  "connection",
                  "reset by peer", "service unavailable", "internal error", "lfs", "precondition failed",
                  "internalerror", "requesttimeout", "too many requests")


def scheme(url: str | Path) -> str:
    s = str(url)
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", s)
    return m.group(1).lower() if m else ""


def is_remote(url: str | Path) -> bool:
    return scheme(url) not in LOCAL_SCHEMES


def filesystem(url: str):
    """(fsspec filesystem, path within it) of a URL."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url)
    except ImportError as exc:
        pkg = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub", "az": "adlfs",
               "abfs": "adlfs"}.get(scheme(url), "the fsspec implementation")
        raise StoreError(f"{url}: reading this store needs {pkg} (pip install {pkg}): {exc}") from None


def status_code(exc: BaseException) -> int | None:
    """The HTTP status of a store error, whichever client raised it (s3fs keeps botocore's error as the
    cause of the OSError it raises)."""
    seen = 0
    while exc is not None and seen < 5:
        code = _own_status(exc)
        if code is not None:
            return code
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _own_status(exc: BaseException) -> int | None:
    for attr in ("status_code", "status"):
        v = getattr(exc, attr, None)
        if isinstance(v, int):
            return v
    resp = getattr(exc, "response", None)
    if resp is not None:
        v = getattr(resp, "status_code", None)
        if isinstance(v, int):
            return v
        if isinstance(resp, dict):  # botocore ClientError
            v = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(v, int):
                return v
    return None


def transient(exc: BaseException) -> bool:
    code = status_code(exc)
    if code is not None:
        return code in TRANSIENT_CODES
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:  # s3fs: SlowDown/503 -> EBUSY, 500 -> EREMOTEIO
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(t in text for t in TRANSIENT_TEXT)


def retrying(fn, what: str, give_up_after: float = 300.0, first: float = 0.5, cap: float = 30.0, sleep=time.sleep):
    """Call `fn()`; retry transient store errors with exponential backoff (jittered) until it has
    failed for `give_up_after` seconds; a permanent error, or the deadline, raises StoreError."""
    start, delay, attempt = time.monotonic(), first, 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not transient(exc):
                raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from exc
            if time.monotonic() - start + delay > give_up_after:
                raise StoreError(f"{what}: still failing after {attempt} attempts over "
                                 f"{time.monotonic() - start:.0f} s: {type(exc).__name__}: {exc}",
                                 gave_up=True) from exc
            log.warning("%s: %s (%s); retry %d in %.1f s", what, type(exc).__name__, str(exc)[:200], attempt, delay)
            sleep(delay * (0.5 + random.random() / 2))
            delay = min(cap, delay * 2)


class RetryingFile(io.RawIOBase):
    """A store object read as a seekable stream of `block_size` range requests, `prefetch` blocks ahead
    on background threads (the next blocks download while this one is parsed: measured 2-4x faster
    than fetching on demand, python -m benchmarks.storage); each range request is retried on transient errors,
    so a 503 in the middle of a 10 GB input file costs a retry, not the run."""

    def __init__(self, url: str, block_size: int = 8 << 20, prefetch: int = 2, give_up_after: float = 300.0):
        from concurrent.futures import ThreadPoolExecutor

        super().__init__()
        self.url, self.block_size, self.prefetch, self.give_up_after = url, block_size, prefetch, give_up_after
        self.fs, self.path = filesystem(url)
        self.pos = 0
        self.size = int(retrying(lambda: self.fs.size(self.path), f"{url}: size", give_up_after))
        self.pool = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="engine-prefetch")
        self.blocks: dict = {}  # block index -> Future of its bytes

    def _fetch(self, i: int) -> bytes:
        start, end = i * self.block_size, min((i + 1) * self.block_size, self.size)
        return retrying(lambda: self.fs.cat_file(self.path, start=start, end=end),
                        f"{self.url}: reading bytes {start:,}-{end:,}", self.give_up_after)

    def _block(self, i: int) -> bytes:
        last = (self.size - 1) // self.block_size
        for j in range(i, min(i + self.prefetch, last) + 1):
            if j not in self.blocks:
                self.blocks[j] = self.pool.submit(self._fetch, j)
        for j in [j for j in self.blocks if j < i or j > i + self.prefetch]:
            self.blocks.pop(j).cancel()  # behind us (or far ahead after a seek): drop it
        return self.blocks[i].result()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.pos >= self.size:
            return 0
        i = self.pos // self.block_size
        data = self._block(i)
        off = self.pos - i * self.block_size
        n = min(len(b), len(data) - off)
        b[:n] = data[off:off + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        for f in self.blocks.values():
            f.cancel()
        self.blocks.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
        super().close()


def open_input(url: str, block_size: int = 16 << 20, prefetch: int = 2):
    """A streamed binary file of an input URL: `block_size` range requests, `prefetch` of them ahead,
    never downloaded whole first, transient errors retried (RetryingFile)."""
    return io.BufferedReader(RetryingFile(url, block_size, prefetch), buffer_size=1 << 20)
