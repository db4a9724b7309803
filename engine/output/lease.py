"""One writer per (output, shard): a lease, taken before anything in the output is read or written.

A run takes the lease of its shard in `Run._output_location`, renews it on a thread every
`output.lease_heartbeat_seconds`, and releases it at exit (whatever the status). A second run of the
same shard finds it held and exits with status 6 (`LeaseHeld`, naming the holder), or waits up to
`output.lease_wait_seconds` for it to end or go stale. A lease is stale when its holder released it,
when its heartbeat is older than `output.lease_timeout_seconds`, or, seen from the holder's own host,
as soon as its process is gone (kill -9, a crash): a stale lease is taken over, with a log line.

Local or shared directory (`FileLease`):
    OUTPUT_DIR/_lease/<shard>.lock          a kernel lock (fcntl.flock) held while the process lives; on
                                            a local disk it alone excludes a second writer, and the kernel
                                            drops it when the process dies
    OUTPUT_DIR/_lease/<shard>.<gen>.json    the lease record (host, pid, since, heartbeat, token): where
                                            kernel locks are unreliable (NFS, Lustre) this is what counts.
                                            The lease is the highest <gen>; taking it (over) is creating
                                            gen+1 with link(2), which fails if the file exists (atomic on
                                            NFS too), so of two runs taking over the same stale lease one
                                            wins and the other sees a live lease; the winner re-reads it.
Object store (`StoreLease`, lease_store.py): one object `<output.dir>/_lease/<shard>.json`. On S3 it is created with
`If-None-Match: *` and renewed / taken over with `If-Match: <etag>` (conditional writes: one writer
wins a race, the others get 412); on other stores (the Hub, GCS through fsspec) it is written and read
back: best-effort, a race in the same second can let two writers in.
A holder whose lease was taken over (its heartbeat stalled past the timeout) learns it at its next
renewal: it stops the run (status 6) rather than write beside the new holder.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson

from engine.atomic import fsync_dir, temp_name, write_atomic
from engine.errors import ExitCode, LeaseHeld

log = logging.getLogger(__name__)

WAIT_LOG_SECONDS = 30.0  # a run waiting for a lease says so this often


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _pid_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def describe(rec: dict, now: float | None = None) -> str:
    """The holder, as a message names it."""
    now = time.time() if now is None else now
    beat = rec.get("heartbeat")
    age = f"{max(0.0, now - beat):.0f} s ago" if isinstance(beat, (int, float)) else "unknown"
    since = _stamp(rec["since"]) if isinstance(rec.get("since"), (int, float)) else "?"
    return f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}, since {since}, last heartbeat {age}"


def stale_reason(rec: dict, timeout: float, now: float | None = None, frozen_is_stale: bool = False) -> str | None:
    """Why the lease `rec` no longer holds (None: it is live). A holder alive on this host is live whatever its
    heartbeat, unless `frozen_is_stale` (a unit's lease, output/units.py: a frozen worker must not keep its unit)."""
    now = time.time() if now is None else now
    if rec.get("released"):
        return "released"
    if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
        started = _pid_started(rec["pid"])
        if started is None or (rec.get("pid_started") and abs(started - rec["pid_started"]) > 1.0):
            return f"its process {rec['pid']} is gone from this host"
        if not frozen_is_stale:
            return None  # alive on this host: live, whatever its heartbeat
    beat = rec.get("heartbeat")
    if not isinstance(beat, (int, float)) or now - beat > timeout:
        return f"its heartbeat is older than output.lease_timeout_seconds = {timeout:g}"
    return None


class Lease:
    """The interface: `acquire()` (raises LeaseHeld), `release()`; subclasses implement `_take()` (None when
    taken, else the live holder's record), `_renew()` (False when the lease was lost) and `_drop()`."""

    RETRY = object()  # _take: lost a race; look again at once
    noun = "shard"  # what the lease is of, in messages (a unit's: output/units.py)

    def __init__(self, where: str, tag: str, heartbeat: float, timeout: float, wait: float, on_lost=None):
        self.where, self.tag = where, tag
        self.heartbeat, self.timeout, self.wait = heartbeat, timeout, wait
        self.on_lost = on_lost
        self.token = uuid.uuid4().hex
        self.since = time.time()
        self.held = False
        self.lost = False
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def record(self, **extra) -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_started": _pid_started(pid), "since": self.since,
                "heartbeat": time.time(), "timeout": self.timeout, "token": self.token, "shard": self.tag, **extra}

    def acquire(self) -> None:
        deadline, said = time.monotonic() + self.wait, 0.0
        poll = min(self.heartbeat, 2.0)
        while True:
            holder = self._take()
            while holder is self.RETRY:
                holder = self._take()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise LeaseHeld(f"shard {self.tag} of {self.where} is being written by another run "
                                f"({describe(holder)}); nothing was read or written")
            if time.monotonic() - said >= WAIT_LOG_SECONDS:
                said = time.monotonic()
                log.warning("shard %s of %s: its lease is held (%s); waiting up to %.0f s more for it to end or go "
                            "stale (output.lease_wait_seconds)", self.tag, self.where, describe(holder),
                            deadline - time.monotonic())
            time.sleep(max(0.05, min(poll, deadline - time.monotonic())))
        self._start_beat()

    def _start_beat(self) -> None:
        """Held from now: renew on a thread."""
        self.held = True
        self.thread = threading.Thread(target=self._beat, name=f"engine-lease-{self.tag}", daemon=True)
        self.thread.start()

    def _stop_beat(self) -> None:
        """Renew no more (release, or a unit's commit)."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        self.held = False

    def _beat(self) -> None:
        while not self.stop.wait(self.heartbeat):
            try:
                ok = self._renew()
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried; the timeout is the margin
                log.warning("renewing the lease of shard %s failed (%s); retrying in %.0f s", self.tag, exc,
                            self.heartbeat)
                continue
            if not ok:
                self.lost = True
                log.error("%s %s of %s: this run's lease was taken over by another run (its heartbeat had "
                          "stalled past the timeout); exiting (status 6) without writing more: what is "
                          "journaled is recovered by the run that holds the lease now", self.noun, self.tag,
                          self.where)
                if self.on_lost is not None:
                    self.on_lost()
                return

    def release(self) -> None:
        if not self.held:
            return
        self._stop_beat()
        if self.lost:
            return
        try:
            self._drop()
        except Exception as exc:  # noqa: BLE001 - it goes stale by itself (pid gone, heartbeat ages)
            log.warning("releasing the lease of %s %s failed (%s); it goes stale by itself", self.noun, self.tag, exc)

    def _take(self):  # pragma: no cover - interface
        raise NotImplementedError

    def _renew(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def _drop(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class FileLease(Lease):
    """The lease of a shard in a local or shared directory (module doc)."""

    def __init__(self, out: Path, tag: str, heartbeat: float, timeout: float, wait: float, on_lost=None):
        super().__init__(str(out), tag, heartbeat, timeout, wait, on_lost)
        self.dir = Path(out) / "_lease"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = None
        self.path: Path | None = None

    def _gens(self) -> dict[int, Path]:
        out = {}
        for p in self.dir.glob(f"{self.tag}.*.json"):
            gen = p.name[len(self.tag) + 1:-len(".json")]
            if gen.isdigit():
                out[int(gen)] = p
        return out

    def _lock(self) -> bool:
        """The kernel lock; False when another process holds it."""
        if self.fd is not None:
            return True
        import fcntl

        fd = os.open(self.dir / f"{self.tag}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:  # no kernel locks here (some NFS/Lustre mounts): the lease file decides
            log.info("%s: no kernel lock on this filesystem (%s); the lease file alone decides", self.dir, exc)
        self.fd = fd
        return True

    def _unlock(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None

    def current(self) -> dict | None:
        gens = self._gens()
        if not gens:
            return None
        return orjson.loads(gens[max(gens)].read_bytes())

    def _take(self):
        if not self._lock():
            try:
                holder = self.current()
            except (OSError, orjson.JSONDecodeError):
                holder = None
            return holder or {"host": socket.gethostname(), "pid": "? (a kernel lock on _lease/)"}
        gens = self._gens()
        top = max(gens, default=-1)
        if top >= 0:
            try:
                rec = orjson.loads(gens[top].read_bytes())
            except FileNotFoundError:
                return self.RETRY  # replaced or released just now
            except (OSError, orjson.JSONDecodeError):  # not written by us (ours are atomic): judged by its age
                rec = {"host": "?", "pid": "?", "heartbeat": gens[top].stat().st_mtime, "corrupt": str(gens[top])}
            why = stale_reason(rec, self.timeout)
            if why is None:
                self._unlock()
                return rec
            if why != "released":
                log.warning("shard %s: taking over the stale lease of %s (%s)", self.tag, describe(rec), why)
        path = self.dir / f"{self.tag}.{top + 1:06d}.json"
        tmp = temp_name(path)
        tmp.write_bytes(orjson.dumps(self.record(gen=top + 1)))
        try:
            os.link(tmp, path)  # fails if another run created this generation first
        except FileExistsError:
            return self.RETRY
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # no hard links: O_EXCL
            os.write(fd, tmp.read_bytes())
            os.close(fd)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.dir)
        self.path = path
        if not self._ours():
            self.path = None
            return self.RETRY
        for gen, p in gens.items():
            if gen <= top:
                p.unlink(missing_ok=True)
        return None

    def _ours(self) -> bool:
        gens = self._gens()
        if not gens or self.path is None or gens[max(gens)] != self.path:
            return False
        try:
            return orjson.loads(self.path.read_bytes()).get("token") == self.token
        except (OSError, orjson.JSONDecodeError):
            return False

    def _renew(self) -> bool:
        if not self._ours():
            return False
        rec = orjson.loads(self.path.read_bytes())
        write_atomic(self.path, orjson.dumps({**rec, "heartbeat": time.time()}))
        return True

    def _drop(self) -> None:
        try:
            if self._ours():
                self.path.unlink()
                fsync_dir(self.dir)
        finally:
            self._unlock()


def exit_lost() -> None:
    """What a run does when another run took its lease over: end at once, as a crash would (recovery handles
    that); committing parts or writing state now could collide with the new holder's files."""
    for stream in (sys.stderr, sys.stdout):
        stream.flush()
    os._exit(ExitCode.LEASE_HELD)


def lease_wait(configured: float, timeout: float, heartbeat: float) -> float:
    """output.lease_wait_seconds; -1 (the default): 0, or on a requeued Slurm attempt long enough for the old
    attempt's lease to go stale."""
    if configured >= 0:
        return configured
    try:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        restarts = 0
    return timeout + 2 * heartbeat if restarts > 0 else 0.0


def read_lease(out: Path, tag: str) -> dict | None:
    """The current lease record of a shard in a local directory (None: no lease, i.e. released)."""
    folder = Path(out) / "_lease"
    gens = sorted(folder.glob(f"{tag}.*.json")) if folder.is_dir() else []
    for p in reversed(gens):
        try:
            return orjson.loads(p.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
    single = folder / f"{tag}.json"  # a store's lease object, fetched by `engine status URL`
    if single.exists():
        try:
            return orjson.loads(single.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
    return None
