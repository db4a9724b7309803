"""Where a worker's units live (engine/worker.py): a local or shared directory, or an S3 output.

    LocalUnits   the protocol of output/units.py on a directory: leases by link(2), a unit's private directory
                 `_units/<unit>/g<gen>/`, adopted by copying and published by rename
    StoreUnits   the same on S3 (conditional writes): the lease object `_lease/<unit>.json` is claimed with
                 `If-None-Match: *` or taken over with `If-Match: <its ETag>`, renewed, committed (the commit
                 record is the fencing write: a holder whose lease was taken over gets 412) and released the same
                 way; the holder writes its unit in a local staging directory and uploads it to
                 `_units/<unit>/g<gen>/` every output.sync_seconds (journal included, so a successor on another
                 machine resumes from it) and completely before it commits; publishing is a server-side copy of
                 the parts, manifests and state to their final names, then the unit's prefix is deleted. A
                 successor downloads the last holder's prefix (adopt). Other stores have no conditional write and
                 are refused.

Both: `records(count)` (the current lease record of every unit), `lease(tag, rows)`, `adopt(tag, lease)` (the
local directory the unit's run writes), `unit_started(tag, lease, dir)` / `unit_finished(...)` (a store's
uploads), `publish(tag, gen)`, `roll_forward(tag, rec)`, `published(tag, rec)`, `dir` (the local directory of
the run's own files: the output itself, or a store's staging) and `finish(summary_files)` (a store: upload them).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from pathlib import Path, PurePosixPath

import orjson

from engine.config.run_config import OutputConfig
from engine.errors import ConfigError
from engine.output import layout
from engine.output.lease import describe
from engine.output.lease_store import StoreLease
from engine.output.units import (
    ADOPTED,
    UNITS_DIR,
    Claim,
    UnitLease,
    adopt,
    carried,
    commit_record,
    gen_dir,
    judge,
    publish,
    roll_forward,
    unit_records,
)

log = logging.getLogger(__name__)

class LocalUnits:
    def __init__(self, o: OutputConfig, on_lost):
        self.o, self.on_lost = o, on_lost
        self.dir = layout.writable_dir(Path(o.dir))

    def records(self, count: int, skip: set[str] = frozenset()) -> dict[str, dict]:
        return unit_records(self.dir, count)

    def lease(self, tag: str, rows: tuple[int, int]) -> UnitLease:
        return UnitLease(self.dir, tag, self.o.lease_heartbeat_seconds, self.o.lease_timeout_seconds, rows,
                         on_lost=self.on_lost)

    def adopt(self, tag: str, lease) -> Path:
        return adopt(self.dir, tag, lease)

    def unit_started(self, tag: str, lease, unit_dir: Path) -> None:
        pass

    def unit_finished(self, tag: str) -> None:
        pass

    def publish(self, tag: str, gen: int) -> int:
        return publish(self.dir, tag, gen)

    def roll_forward(self, tag: str, rec: dict) -> None:
        roll_forward(self.dir, tag, rec, self.o.lease_timeout_seconds)

    def published(self, tag: str, rec: dict) -> bool:
        """A committed unit's files are all in the output (its directories are gone)."""
        return not (self.dir / UNITS_DIR / tag).exists()

    def clear_units(self) -> None:
        for p in (self.dir / "_lease").glob("u*-of-*.*.json"):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.dir / UNITS_DIR, ignore_errors=True)

    def fetch_states(self) -> None:
        pass

    def finish(self, files: list[str]) -> None:
        pass


class StoreUnitLease(StoreLease):
    """A unit's lease on S3 (module doc); claim/commit/release as UnitLease's, by conditional writes."""
    noun = "unit"

    def __init__(self, remote, tag: str, heartbeat: float, timeout: float, rows: tuple[int, int], give_up: float,
                 on_lost=None):
        super().__init__(remote.fs, remote.root, remote.url, tag, heartbeat, timeout, 0.0, give_up, on_lost)
        self.rows, self.gen, self.failures, self.previous = rows, -1, 0, None

    def record(self, **extra) -> dict:
        return super().record(gen=self.gen, failures=self.failures, rows=list(self.rows), every=self.heartbeat,
                              **extra)

    def claim(self) -> Claim:
        while True:
            rec, etag = self._read()
            failures, gen = 0, 0
            if rec is not None:
                failures = judge(self.tag, rec, self.timeout)
                if isinstance(failures, Claim):
                    return failures
                gen = int(rec.get("gen", -1)) + 1
            self.gen, self.failures = gen, failures
            body = orjson.dumps(self.record())
            cond = {"IfNoneMatch": "*"} if rec is None else {"IfMatch": etag}
            new = self._call(lambda b=body, c=cond: self._put(b, **c), "claiming")
            if new is self.FAILED:
                continue  # another worker wrote it first: look again
            self.etag, self.previous = new, (gen - 1 if rec is not None else None)
            self._start_beat()
            return Claim("taken")

    def commit(self, files: list[str]) -> bool:
        self._stop_beat()
        if self.lost:
            return False
        rec = commit_record(self, files)
        new = self._call(lambda: self._put(orjson.dumps(rec), IfMatch=self.etag), "committing")
        if new is self.FAILED:
            self.lost = True
            return False
        return True

    def _drop(self) -> None:
        """Give the unit back unfinished (release()): a released record that keeps its failure count."""
        self._call(lambda: self._put(orjson.dumps(self.record(released=True)), IfMatch=self.etag), "releasing")


class StoreUnits:
    def __init__(self, o: OutputConfig, on_lost):
        from engine.output.remote import RemoteOutput, default_staging  # lazy: fsspec clients (s3fs ...)

        self.o, self.on_lost = o, on_lost
        staging = Path(o.staging_dir or default_staging(o.dir)) / f"worker-{socket.gethostname()}-{os.getpid()}"
        self.remote = RemoteOutput(o.dir, staging, o.store_give_up_seconds)
        if type(self.remote.fs).__name__ != "S3FileSystem":
            raise ConfigError(f"output.dir {o.dir}: workers claiming units need conditional writes (S3) or a local "
                              f"or shared directory; this store has none: use static shards (--shard i/N) there")
        self.dir = staging
        self.syncers: dict[str, object] = {}
        fp = "_run/fingerprint.json"
        if self.remote._retry(lambda: self.remote.fs.exists(self.remote.remote(fp)), "checking the fingerprint"):
            self.remote._get(fp)
            self.remote._mark(fp)

    def _unit_remote(self, tag: str, gen: int):
        from engine.output.remote import RemoteOutput

        # the journal too: a successor on another machine resumes from it
        return RemoteOutput(f"{self.o.dir.rstrip('/')}/{UNITS_DIR}/{tag}/g{gen:06d}", gen_dir(self.dir, tag, gen),
                            self.o.store_give_up_seconds, skip_dirs=())

    def _path(self, rel: str) -> str:
        return self.remote.remote(rel)

    def _list(self, what: str, fn):
        """A listing of the store, never from fsspec's cache (other workers write there)."""
        self.remote.fs.invalidate_cache(self.remote.root)
        return self.remote._retry(fn, what)

    def records(self, count: int, skip: set[str] = frozenset()) -> dict[str, dict]:
        fs, out = self.remote.fs, {}
        found = self._list("listing the units' leases", lambda: fs.glob(self._path("_lease/u*-of-*.json")))
        for path in found:
            if PurePosixPath(path).name[:-len(".json")] in skip:  # committed or failed for good: not read again
                continue
            try:
                out[PurePosixPath(path).name[:-len(".json")]] = orjson.loads(fs.cat_file(path))
            except (FileNotFoundError, orjson.JSONDecodeError):
                continue
        return out

    def lease(self, tag: str, rows: tuple[int, int]) -> StoreUnitLease:
        return StoreUnitLease(self.remote, tag, self.o.lease_heartbeat_seconds, self.o.lease_timeout_seconds, rows,
                              self.o.store_give_up_seconds, on_lost=self.on_lost)

    def adopt(self, tag: str, lease) -> Path:
        """The unit's local directory, with the last holder's uploaded work downloaded into it."""
        mine = gen_dir(self.dir, tag, lease.gen)
        shutil.rmtree(mine, ignore_errors=True)
        mine.mkdir(parents=True)
        fs = self.remote.fs
        prefix = self._path(f"{UNITS_DIR}/{tag}")
        marks = self._list(f"listing unit {tag}'s work", lambda: fs.glob(f"{prefix}/g*/{ADOPTED}"))
        numbers = [PurePosixPath(m).parent.name[1:] for m in marks]
        gens = sorted(int(n) for n in numbers if n.isdigit() and int(n) < lease.gen)
        if gens:
            src = f"{prefix}/g{gens[-1]:06d}"
            files = self._list(f"listing {src}", lambda: fs.find(src))
            copied = 0
            for path in files:
                rel = PurePosixPath(path).relative_to(PurePosixPath(src).as_posix())
                if not carried(rel, journal=False) and rel.parts[0] != "_journal":
                    continue
                local = mine / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp = local.with_name(local.name + ".download")
                try:
                    self.remote._retry(lambda p=path, t=tmp: fs.get_file(p, str(t)), f"downloading {rel}")
                except FileNotFoundError:
                    continue
                os.replace(tmp, local)
                copied += 1
            log.info("unit %s: resuming from generation g%06d's work in the store (%d file(s) downloaded)", tag,
                     gens[-1], copied)
        (mine / ADOPTED).write_bytes(b"")
        return mine

    def unit_started(self, tag: str, lease, unit_dir: Path) -> None:
        from engine.output.remote import Syncer

        remote = self._unit_remote(tag, lease.gen)
        remote.sync()  # the _adopted mark and what was adopted: a successor can start from here
        syncer = Syncer(remote, self.o.sync_seconds or 10.0)
        syncer.start()
        self.syncers[tag] = syncer

    def unit_finished(self, tag: str) -> None:
        """The unit's last upload (before its commit: a committed unit's files are all in the store)."""
        syncer = self.syncers.pop(tag, None)
        if syncer is not None:
            syncer.close()

    def publish(self, tag: str, gen: int) -> int:
        """Server-side copies of the committed unit's files to their final names (parts, manifests, state), then
        its prefix deleted; the local copy goes too."""
        fs = self.remote.fs
        src = self._path(f"{UNITS_DIR}/{tag}/g{gen:06d}")
        files = self._list(f"listing {src}", lambda: fs.find(src))
        rels = [PurePosixPath(p).relative_to(PurePosixPath(src).as_posix()) for p in files]
        rels = sorted((r for r in rels if carried(r, journal=False)), key=lambda r: (r.parts[0] == "_state",
                                                                         r.parts[0] == "_manifest"))
        for rel in rels:
            try:
                self.remote._retry(lambda r=rel: fs.copy(f"{src}/{r.as_posix()}", self._path(r.as_posix())),
                                   f"publishing {rel}")
            except FileNotFoundError:  # another worker published this unit just now (roll forward)
                continue
        prefix = self._path(f"{UNITS_DIR}/{tag}")
        self.remote._retry(lambda: fs.rm(prefix, recursive=True) if fs.exists(prefix) else None,
                           f"removing {UNITS_DIR}/{tag}")
        shutil.rmtree(self.dir / UNITS_DIR / tag, ignore_errors=True)
        return len(rels)

    def roll_forward(self, tag: str, rec: dict) -> None:
        gen = rec.get("by_gen")
        fs = self.remote.fs
        if time.time() - float(rec.get("committed_at") or 0) < self.o.lease_timeout_seconds:
            return  # the committer's to publish (it does within seconds)
        if isinstance(gen, int) and self._list(f"checking unit {tag}", lambda: fs.exists(
                self._path(f"{UNITS_DIR}/{tag}/g{gen:06d}/{ADOPTED}"))):
            n = self.publish(tag, gen)
            log.info("unit %s: committed by %s; its %d file(s) published now", tag, describe(rec), n)

    def published(self, tag: str, rec: dict) -> bool:
        gen = rec.get("by_gen")
        return not isinstance(gen, int) or not self._list(f"checking unit {tag}", lambda: self.remote.fs.exists(
            self._path(f"{UNITS_DIR}/{tag}/g{gen:06d}/{ADOPTED}")))

    def clear_units(self) -> None:
        self.remote.clear(["_lease", UNITS_DIR])

    def fetch_states(self) -> None:
        """The committed units' state files, for the summary and the card."""
        fs = self.remote.fs
        for path in self._list("listing the states", lambda: fs.glob(self._path("_state/u*.json"))):
            rel = f"_state/{PurePosixPath(path).name}"
            if not (self.dir / rel).exists():
                self.remote._get(rel)

    def finish(self, files: list[str]) -> None:
        """Upload the run's own files (fingerprint, summary, card) from staging."""
        for rel in files:
            if (self.dir / rel).exists():
                self.remote._retry(lambda r=rel: self.remote._put(r), f"uploading {rel}")


def open_units(o: OutputConfig, on_lost):
    from engine.stores import is_remote

    return StoreUnits(o, on_lost) if is_remote(o.dir) else LocalUnits(o, on_lost)
