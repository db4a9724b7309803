"""The lease of a shard of an output in an object store (StoreLease; the protocol is in lease.py's doc), and
`take_lease`, which takes a shard's lease of either kind.

S3 (s3fs): the lease object is created with `If-None-Match: *` and renewed or taken over with
`If-Match: <its ETag>` (PutObject conditional writes; moto 5.2.5 implements both, s3fs 2026.9.0 passes
them through `call_s3`), so of two writers racing one wins and the other gets 412. Other stores (the
Hub, GCS through fsspec): write, then read back: best-effort. On the Hub each write is a commit, so
its lease is renewed every HUB_HEARTBEAT seconds at least (and goes stale after three of them).
"""
from __future__ import annotations

import logging
from pathlib import Path

import orjson

from engine.output.lease import FileLease, Lease, describe, exit_lost, lease_wait, stale_reason
from engine.stores import retrying, status_code

log = logging.getLogger(__name__)

HUB_HEARTBEAT = 120.0  # seconds, at least, between lease commits on the Hub (its timeout: 3 heartbeats at least)


def _precondition(exc: BaseException) -> bool:
    return isinstance(exc, FileExistsError) or status_code(exc) == 412 or "PreconditionFailed" in str(exc)


class StoreLease(Lease):
    """The lease of a shard of an output in an object store (module doc): conditional writes on S3."""

    FAILED = object()

    def __init__(self, fs, root: str, url: str, tag: str, heartbeat: float, timeout: float, wait: float,
                 give_up_after: float = 300.0, on_lost=None):
        super().__init__(url, tag, heartbeat, timeout, wait, on_lost)
        self.fs, self.path, self.give_up_after = fs, f"{root.rstrip('/')}/_lease/{tag}.json", give_up_after
        self.conditional = type(fs).__name__ == "S3FileSystem"
        if type(fs).__name__ == "HfFileSystem":  # every write is a commit: keep within the Hub's commit limits
            self.heartbeat = max(self.heartbeat, HUB_HEARTBEAT)
            self.timeout = max(self.timeout, 3 * self.heartbeat)
        self.etag: str | None = None

    def _call(self, fn, what: str):
        """fn() with transient errors retried; a failed precondition returns FAILED."""

        def once():
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified
                if _precondition(exc):
                    return self.FAILED
                raise
        return retrying(once, f"{self.where}: {what} the lease of shard {self.tag}", self.give_up_after)

    def _put(self, body: bytes, **cond):
        bucket, key, _ = self.fs.split_path(self.path)
        resp = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **cond)
        self.fs.invalidate_cache(self.path)
        return resp["ETag"]

    def _read(self) -> tuple[dict | None, str | None]:
        """The lease record and its ETag (both None when there is none)."""
        def get():
            self.fs.invalidate_cache(self.path)
            try:
                before = self.fs.info(self.path).get("ETag")
                body = self.fs.cat_file(self.path)
                after = self.fs.info(self.path).get("ETag")
            except FileNotFoundError:
                return None, None, True
            return orjson.loads(body), after, before == after
        while True:
            rec, etag, same = self._call(get, "reading")
            if same:
                return rec, etag

    def _take(self):
        body = orjson.dumps(self.record())
        if self.conditional:
            etag = self._call(lambda: self._put(body, IfNoneMatch="*"), "creating")
            if etag is not self.FAILED:
                self.etag = etag
                return None if self._ours() else self.RETRY
        rec, etag = self._read()
        if rec is None:
            if self.conditional:
                return self.RETRY
        else:
            why = stale_reason(rec, self.timeout)
            if why is None:
                return rec
            if why != "released":
                log.warning("shard %s: taking over the stale lease of %s (%s)", self.tag, describe(rec), why)
        if self.conditional:
            new = self._call(lambda: self._put(body, IfMatch=etag), "taking over")
            if new is self.FAILED:
                return self.RETRY
            self.etag = new
        else:  # best-effort: write, then read back
            self._call(lambda: self.fs.pipe_file(self.path, body), "writing")
        return None if self._ours() else self.RETRY

    def _ours(self) -> bool:
        rec, etag = self._read()
        if rec is None or rec.get("token") != self.token:
            return False
        self.etag = etag
        return True

    def _renew(self) -> bool:
        body = orjson.dumps(self.record())
        if self.conditional:
            etag = self._call(lambda: self._put(body, IfMatch=self.etag), "renewing")
            if etag is self.FAILED:
                return False
            self.etag = etag
            return True
        if not self._ours():
            return False
        self._call(lambda: self.fs.pipe_file(self.path, body), "renewing")
        return True

    def _drop(self) -> None:
        if self._ours():
            self._call(lambda: self.fs.rm(self.path), "releasing")


def take_lease(o, tag: str, out: Path | None = None, remote=None, on_lost=exit_lost) -> Lease:
    """The lease of shard `tag` of a local output `out` or a store output `remote` (RemoteOutput), taken
    (waiting as `o`, the OutputConfig, says); `on_lost` is called if another run takes it over later."""
    timing = (o.lease_heartbeat_seconds, o.lease_timeout_seconds,
              lease_wait(o.lease_wait_seconds, o.lease_timeout_seconds, o.lease_heartbeat_seconds))
    if remote is None:
        lease: Lease = FileLease(out, tag, *timing, on_lost=on_lost)
    else:
        lease = StoreLease(remote.fs, remote.root, remote.url, tag, *timing, give_up_after=o.store_give_up_seconds,
                           on_lost=on_lost)
    lease.acquire()
    return lease
