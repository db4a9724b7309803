"""Object stores and the Hugging Face Hub, through fsspec: reading inputs, mirroring an output directory.

Inputs: `input.paths` may be fsspec URLs (`s3://`, `gs://`, `hf://datasets/ORG/NAME/...`, `file://`)
with globs; files are opened as streams with read-ahead (never downloaded first). Credentials come
from where each client looks (AWS_* variables and ~/.aws for s3fs, GOOGLE_APPLICATION_CREDENTIALS
for gcsfs, HF_TOKEN / `hf auth login` for the Hub), never from our config.

Outputs: an `output.dir` URL is mirrored from a local staging directory. The run writes there exactly
as to a local output (journal, atomic parts, state files: journal.py), and `RemoteOutput` uploads:
- every committed part, whole, under its final name (an S3/GCS object or a Hub commit appears
  complete or not at all), before the manifest and state files that count it;
- the run's fingerprint, manifests, state files, summary, report and dataset card (README.md);
- never the journal (the uncommitted window: a requeued task on another machine loses at most that).
On start `pull` brings this shard's committed parts (and the fingerprint) from the store into the
staging directory, so the local recovery sees what is committed remotely; where a local part and a
remote one of the same name differ, the remote one wins (another machine resumed this shard).
Transient store errors (connection errors, timeouts, HTTP 408/412/429/5xx, S3 SlowDown, the Hub's
LFS verification failures) are retried with exponential backoff; others (403, 404, bad
credentials) fail at once.
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import random
import re
import threading
import time
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

LOCAL_SCHEMES = ("", "file", "local")
TRANSIENT_CODES = {408, 412, 423, 425, 429, 500, 502, 503, 504}
TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                    getattr(errno, "EREMOTEIO", errno.EIO)}
TRANSIENT_TEXT = ("slowdown", "slow down", "reduce your request rate", "timeout", "timed out", "temporarily", "throttl", "connection",
                  "reset by peer", "service unavailable", "internal error", "lfs", "precondition failed",
                  "internalerror", "requesttimeout", "too many requests")


class StoreError(RuntimeError):
    """The store failed for good: after retries (`gave_up`: try again later), or a permanent error
    (credentials, a missing bucket or repository: fix the configuration)."""

    def __init__(self, message: str, gave_up: bool = False):
        super().__init__(message)
        self.gave_up = gave_up


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
                                 f"{time.monotonic() - start:.0f} s: {type(exc).__name__}: {exc}", gave_up=True) from exc
            log.warning("%s: %s (%s); retry %d in %.1f s", what, type(exc).__name__, str(exc)[:200], attempt, delay)
            sleep(delay * (0.5 + random.random() / 2))
            delay = min(cap, delay * 2)


def default_staging(url: str) -> Path:
    root = Path(os.environ.get("SYNTH_ENGINE_STAGING", Path.home() / ".cache" / "synth-engine" / "staging"))
    tag = hashlib.sha256(url.encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[-60:]
    return root / f"{name}-{tag}"


class RemoteOutput:
    """An output directory in a store, mirrored from a local staging directory (see the module doc)."""

    SKIP_DIRS = ("_journal",)

    def __init__(self, url: str, staging: Path, give_up_after: float = 300.0):
        self.url = url.rstrip("/")
        self.staging = Path(staging)
        self.fs, self.root = filesystem(self.url)
        self.root = self.root.rstrip("/")
        self.give_up_after = give_up_after
        self.hub = type(self.fs).__name__ == "HfFileSystem"
        self.uploaded: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last uploaded
        self.lock = threading.Lock()
        self.staging.mkdir(parents=True, exist_ok=True)

    def remote(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _retry(self, fn, what: str):
        return retrying(fn, f"{self.url}: {what}", self.give_up_after)

    # ---- start: what is committed remotely --------------------------------------------------------
    def pull(self, streams: list[str], shard_tag: str) -> int:
        """Bring the fingerprint and this shard's committed parts into staging; return parts fetched."""
        fetched = 0
        fp = "_run/fingerprint.json"
        if self._retry(lambda: self.fs.exists(self.remote(fp)), "checking the fingerprint"):
            self._get(fp)
        for stream in streams:
            pattern = self.remote(f"{stream}/part-{shard_tag}-*.parquet")
            names = self._retry(lambda p=pattern: self.fs.glob(p, detail=True), f"listing {stream}")
            for path, info in sorted(names.items()):
                rel = f"{stream}/{PurePosixPath(path).name}"
                local = self.staging / rel
                size = int(info.get("size") or 0)
                if local.exists() and local.stat().st_size == size:
                    self._mark(rel)
                    continue
                if local.exists():
                    log.warning("%s: the store's copy differs from the local one (another machine resumed this "
                                "shard); using the store's", rel)
                self._get(rel)
                self._mark(rel)
                fetched += 1
        return fetched

    def _get(self, rel: str) -> None:
        local = self.staging / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".download")
        self._retry(lambda: self.fs.get_file(self.remote(rel), str(tmp)), f"downloading {rel}")
        os.replace(tmp, local)

    def _mark(self, rel: str) -> None:
        st = (self.staging / rel).stat()
        self.uploaded[rel] = (st.st_size, st.st_mtime_ns)

    # ---- while running: upload what changed -------------------------------------------------------
    def changed(self) -> list[str]:
        out = []
        for p in self.staging.rglob("*"):
            if not p.is_file():
                continue
            rel = p.relative_to(self.staging).as_posix()
            if rel.split("/", 1)[0] in self.SKIP_DIRS or rel.endswith((".tmp", ".download")) or ".tmp" in p.name:
                continue
            st = p.stat()
            if self.uploaded.get(rel) != (st.st_size, st.st_mtime_ns):
                out.append(rel)
        # parts first: a manifest or state file never counts a part the store does not have yet
        return sorted(out, key=lambda r: (not r.endswith(".parquet"), r))

    def sync(self) -> int:
        """Upload every file of the staging directory that changed since the last sync, and delete from the
        store what was deleted here (a part emptied by --retry-errors); return how many files."""
        with self.lock:
            todo = self.changed()
            gone = [rel for rel in self.uploaded if not (self.staging / rel).exists()]
            for rel in gone:
                self._retry(lambda r=rel: self.fs.rm(self.remote(r)) if self.fs.exists(self.remote(r)) else None,
                            f"deleting {rel}")
                self.uploaded.pop(rel)
            if not todo:
                return len(gone)
            if self.hub:
                self._hub_commit(todo)
            else:
                for rel in todo:
                    stamp = self._stamp(rel)
                    self._retry(lambda r=rel: self._put(r), f"uploading {rel}")
                    self.uploaded[rel] = stamp
            return len(todo) + len(gone)

    def _stamp(self, rel: str) -> tuple[int, int]:
        st = (self.staging / rel).stat()
        return st.st_size, st.st_mtime_ns

    def _put(self, rel: str) -> None:
        parent = PurePosixPath(self.remote(rel)).parent.as_posix()
        try:
            self.fs.makedirs(parent, exist_ok=True)
        except (NotImplementedError, FileExistsError):
            pass
        self.fs.put_file(str(self.staging / rel), self.remote(rel))

    def _hub_commit(self, todo: list[str]) -> None:
        """One Hub commit for the batch (a commit per file would hit the Hub's commit rate limits)."""
        from huggingface_hub import CommitOperationAdd

        resolved = self.fs.resolve_path(self.root)
        prefix = resolved.path_in_repo.strip("/")
        stamps = {rel: self._stamp(rel) for rel in todo}
        ops = [CommitOperationAdd(path_in_repo=f"{prefix}/{rel}" if prefix else rel,
                                  path_or_fileobj=str(self.staging / rel)) for rel in todo]
        self._retry(lambda: self.fs._api.create_commit(
            repo_id=resolved.repo_id, repo_type=resolved.repo_type, revision=resolved.revision,
            operations=ops, commit_message=f"synth-engine: {len(ops)} file(s)"), f"committing {len(ops)} file(s)")
        self.uploaded.update(stamps)

    # ---- --overwrite ------------------------------------------------------------------------------
    def clear(self, names: list[str]) -> None:
        for name in names:
            path = self.remote(name)
            if self._retry(lambda p=path: self.fs.exists(p), f"checking {name}"):
                self._retry(lambda p=path: self.fs.rm(p, recursive=True), f"deleting {name}")


class Syncer:
    """Uploads the staging directory every `every` seconds on a thread; `close` does a last full sync."""

    def __init__(self, remote: RemoteOutput, every: float, before_sync=None):
        self.remote, self.every, self.before_sync = remote, every, before_sync
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="engine-store-sync", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                if self.before_sync:
                    self.before_sync()
                self.remote.sync()
                self.error = None
            except Exception as exc:  # noqa: BLE001 - retried at the next tick; the last sync reports it
                self.error = exc
                log.warning("uploading to %s failed (%s); retrying in %.0f s", self.remote.url, exc, self.every)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        if self.before_sync:
            self.before_sync()
        self.remote.sync()  # raises StoreError after retries: the run is resumable, nothing committed is lost


def fetch_progress(url: str, dest: Path) -> Path:
    """The fingerprint and state files of an output in a store, copied into `dest` (`engine status URL`)."""
    fs, root = filesystem(url.rstrip("/"))
    root = root.rstrip("/")
    for rel in ("_run/fingerprint.json",):
        if retrying(lambda r=rel: fs.exists(f"{root}/{r}"), f"{url}: reading {rel}", 60):
            (dest / "_run").mkdir(parents=True, exist_ok=True)
            retrying(lambda r=rel: fs.get_file(f"{root}/{r}", str(dest / r)), f"{url}: reading {rel}", 60)
    states = retrying(lambda: fs.glob(f"{root}/_state/*.json"), f"{url}: listing _state", 60)
    (dest / "_state").mkdir(parents=True, exist_ok=True)
    for path in states:
        name = PurePosixPath(path).name
        retrying(lambda p=path, n=name: fs.get_file(p, str(dest / "_state" / n)), f"{url}: reading {name}", 60)
    return dest


class RetryingFile(io.RawIOBase):
    """A store object read as a seekable stream of `block_size` range requests, `prefetch` blocks ahead
    on background threads (the next blocks download while this one is parsed: measured 2-4x faster
    than fetching on demand, tools/bench_storage.py); each range request is retried on transient errors,
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
