"""Units: the input claimed in small pieces by any number of workers (input.unit_rows > 0; README, "Elastic
scale-out"). A unit is `unit_rows` contiguous rows of the whole input (input/reader.py `Reader.unit`); unit i
of U has the tag `u0000i-of-0000U`, and its rows become parts named like a shard's (`part-<tag>-NNNNN.parquet`).

    OUTPUT_DIR/_lease/<unit>.<gen>.json    the unit's lease record: a worker claims a unit by creating the
                                           next generation with link(2) (lease.py's protocol, without the
                                           kernel lock: a frozen holder on this host must be taken over too)
    OUTPUT_DIR/_units/<unit>/g<gen>/       what the holder of generation <gen> writes: a private output
                                           directory (parts, journal, manifest, state) that nobody reads as
                                           results; `_adopted` marks it ready for a successor to copy
    OUTPUT_DIR/<prompt>/part-<unit>-*.parquet, _manifest/, _state/<unit>.json
                                           the unit's results once committed and published

Commit and fencing: a unit is committed by creating the lease generation after the holder's own, with
`committed: true` in it (the same exclusive create a takeover makes). A holder whose lease was taken over
(frozen past lease_timeout_seconds, then woken) finds that generation taken: its commit fails and it has
written nothing anyone reads. After the commit the holder moves its files into the output (publish); a
worker or `engine run` that finds a committed unit whose files still sit in `_units/` moves them (roll
forward: the moves are idempotent). A successor of a dead holder copies the holder's directory (committed
parts, journal, manifest, state; never the holder's files in place: it may wake) and resumes from it.

A unit whose holder died (its lease went stale without a release) MAX_FAILURES times is failed: no worker
claims it again; `engine status` names it with its rows.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import orjson

from engine.atomic import fsync_dir, temp_name, write_atomic
from engine.output.layout import unit_tag  # noqa: F401 - re-exported (units.unit_tag)
from engine.output.lease import FileLease, describe, stale_reason

log = logging.getLogger(__name__)

MAX_FAILURES = 3  # holders that died in a unit before it is reported failed instead of claimed again
UNITS_DIR = "_units"
ADOPTED = "_adopted"


def unit_stale(rec: dict, timeout: float, now: float | None = None) -> str | None:
    """Why a unit's lease no longer holds (None: live). Unlike a shard's, a holder alive on this host whose
    heartbeat stalled is stale too: a frozen worker (SIGSTOP, a hung mount) must not keep its unit."""
    return stale_reason(rec, timeout, now, frozen_is_stale=True)


def deaths(rec: dict, timeout: float) -> int:
    """Holders that died in this unit, counting the current one when its lease is stale without a release."""
    why = unit_stale(rec, timeout)
    return int(rec.get("failures", 0)) + (why is not None and why != "released")


def judge(tag: str, rec: dict, timeout: float) -> Claim | int:
    """What the current lease record of a unit says to a worker that wants it: a Claim (committed, held by a live
    worker, or failed), or the failure count to take it over with (logged when its holder died)."""
    if rec.get("committed"):
        return Claim("committed", rec)
    why = unit_stale(rec, timeout)
    if why is None:
        return Claim("held", rec)
    failures = deaths(rec, timeout)
    if failures >= MAX_FAILURES:
        return Claim("failed", rec)
    if why != "released":
        log.warning("unit %s: taking over from %s (%s)", tag, describe(rec), why)
    return failures


def commit_record(lease, files: list[str]) -> dict:
    """The record that commits a unit: the lease generation after its holder's (the fencing write)."""
    return {"committed": True, "gen": lease.gen + 1, "by_gen": lease.gen, "host": socket.gethostname(),
            "pid": os.getpid(), "committed_at": time.time(), "rows": list(lease.rows), "files": files,
            "failures": lease.failures, "since": lease.since}


@dataclass
class Claim:
    """What claiming a unit found: `taken` (this process holds it now), `held` (live, by `record`), `committed`
    or `failed` (its holders died MAX_FAILURES times)."""
    outcome: str
    record: dict | None = None


class UnitLease(FileLease):
    """The lease of one unit (module doc): FileLease's generations without the kernel lock, stale by heartbeat
    even on this host, with a commit that fences a holder that lost it."""
    noun = "unit"

    def __init__(self, out: Path, tag: str, heartbeat: float, timeout: float, rows: tuple[int, int], on_lost=None):
        super().__init__(out, tag, heartbeat, timeout, 0.0, on_lost)
        self.rows = rows
        self.gen = -1
        self.failures = 0
        self.previous: int | None = None  # the generation this claim took over (its directory is adopted)

    def _lock(self) -> bool:
        return True  # the lease record alone decides (a frozen process would keep a kernel lock for ever)

    def _read(self, path: Path) -> dict | None:
        try:
            return orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError):  # not ours (ours are atomic): judged by its age
            try:
                return {"host": "?", "pid": "?", "heartbeat": path.stat().st_mtime, "corrupt": str(path)}
            except FileNotFoundError:
                return None

    def claim(self) -> Claim:
        """Take the unit if it is free (never claimed, released, or its holder stale); never waits."""
        while True:
            gens = self._gens()
            top = max(gens, default=-1)
            failures = 0
            if top >= 0:
                rec = self._read(gens[top])
                if rec is None:
                    continue  # replaced just now: look again
                failures = judge(self.tag, rec, self.timeout)
                if isinstance(failures, Claim):
                    return failures
            gen = top + 1
            if not self._create(gen, self.record(gen=gen, failures=failures, rows=list(self.rows),
                                                 every=self.heartbeat)):
                continue  # another worker created this generation first: look again
            self.path, self.gen, self.failures = self.dir / f"{self.tag}.{gen:06d}.json", gen, failures
            self.previous = top if top >= 0 else None
            if not self._ours():
                continue
            for g, p in gens.items():
                if g < gen:
                    p.unlink(missing_ok=True)
            self._start_beat()
            return Claim("taken")

    def _create(self, gen: int, rec: dict) -> bool:
        """Create generation `gen` exclusively (link(2), atomic on NFS too); False when it exists."""
        path = self.dir / f"{self.tag}.{gen:06d}.json"
        tmp = temp_name(path)
        tmp.write_bytes(orjson.dumps(rec))
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here: O_EXCL
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            os.write(fd, tmp.read_bytes())
            os.close(fd)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.dir)
        return True

    def commit(self, files: list[str]) -> bool:
        """Commit the unit: stop renewing, then create the next generation as the commit record. False (and
        nothing committed) when another worker took the unit over: this holder is fenced."""
        self._stop_beat()
        if self.lost or not self._ours():
            self.lost = True
            return False
        if not self._create(self.gen + 1, commit_record(self, files)):
            self.lost = True
            return False
        self.path.unlink(missing_ok=True)
        return True

    def _drop(self) -> None:
        """Give the unit back unfinished (release(): an interrupted or failed worker): a released record, not
        deleted, so that it keeps the unit's failure count; the next claim resumes the unit."""
        if self._ours():
            rec = orjson.loads(self.path.read_bytes())
            write_atomic(self.path, orjson.dumps({**rec, "released": True, "heartbeat": time.time()}))


# ---- the unit's directories ------------------------------------------------------------------------------
def gen_dir(out: Path, tag: str, gen: int) -> Path:
    return Path(out) / UNITS_DIR / tag / f"g{gen:06d}"


def _copy(src: Path, dst: Path) -> None:
    """One file, whole or not at all (a temporary name, then rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dst)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def unit_files(root: Path) -> list[Path]:
    """Every file below `root`, read with os.walk: a directory removed meanwhile (another worker publishing the same
    committed unit, a woken holder's temporary files) is passed over, not an error."""
    return [Path(d) / n for d, _, names in os.walk(root) for n in names]


def carried(rel: PurePosixPath, journal: bool) -> bool:
    """Whether a file of a unit's directory is copied to a successor (`journal`: with the journal) or published."""
    top, name = rel.parts[0], rel.name
    if top in ("_run", "_lease") or (top == "_journal" and not journal):
        return False
    return name not in (ADOPTED, "README.md") and not name.startswith("summary") and \
        not name.endswith((".tmp", ".download")) and ".tmp." not in name


def adopt(out: Path, tag: str, lease: UnitLease) -> Path:
    """The directory this claim writes, with the work of the unit's last holder copied in (its committed
    parts, journals, manifests and state, read as a crash recovery reads them), then marked `_adopted`."""
    mine = gen_dir(out, tag, lease.gen)
    if mine.exists():
        shutil.rmtree(mine)
    mine.mkdir(parents=True)
    root = Path(out) / UNITS_DIR / tag
    earlier = sorted((d for d in root.iterdir() if d.name.startswith("g") and d.name[1:].isdigit()
                      and int(d.name[1:]) < lease.gen and (d / ADOPTED).exists()), key=lambda d: d.name)
    if earlier:
        src = earlier[-1]
        copied = 0
        for f in unit_files(src):
            rel = PurePosixPath(f.relative_to(src).as_posix())
            if not carried(rel, journal=True):
                continue
            try:
                _copy(f, mine / rel)
                copied += 1
            except FileNotFoundError:  # its holder woke and replaced it just now: what is left is generated again
                continue
        log.info("unit %s: resuming from generation %s's work (%d file(s) copied)", tag, src.name, copied)
    (mine / ADOPTED).write_bytes(b"")
    return mine


def publish(out: Path, tag: str, gen: int) -> int:
    """Move committed generation `gen`'s files into the output (parts, manifests, then the state), then
    remove the unit's directories. Idempotent, and safe beside another process publishing the same unit (a roll
    forward): what was moved already is skipped. Returns files moved."""
    src = gen_dir(out, tag, gen)
    moved = 0
    files = unit_files(src)
    rels = sorted((PurePosixPath(f.relative_to(src).as_posix()) for f in files),
                  key=lambda r: (r.parts[0] == "_state", r.parts[0] == "_manifest"))
    for rel in rels:
        if not carried(rel, journal=False):
            continue
        dst = Path(out) / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(src / rel, dst)
            moved += 1
        except FileNotFoundError:  # another process published it just now
            continue
    for d in {(Path(out) / r).parent for r in rels}:
        if d.is_dir():
            fsync_dir(d)
    shutil.rmtree(Path(out) / UNITS_DIR / tag, ignore_errors=True)
    return moved


def roll_forward(out: Path, tag: str, rec: dict, timeout: float) -> None:
    """A committed unit whose files were not all moved: its committer died or froze right after committing. Left
    to the committer for `timeout` seconds after its commit (it moves them within milliseconds)."""
    gen = rec.get("by_gen")
    if not isinstance(gen, int) or time.time() - float(rec.get("committed_at") or 0) < timeout:
        return
    if (Path(out) / UNITS_DIR / tag).exists():
        n = publish(out, tag, gen)
        if n:
            log.info("unit %s: committed by %s; its %d file(s) moved into the output now", tag, describe(rec), n)


# ---- reading the units of an output (status, readiness) -----------------------------------------------
@dataclass
class UnitView:
    tag: str
    state: str  # free | running | quiet | stopped | committed | failed
    record: dict | None


def unit_records(out: Path, count: int) -> dict[str, dict]:
    """The current lease record of every unit that has one."""
    folder = Path(out) / "_lease"
    recs: dict[str, tuple[int, dict]] = {}
    if not folder.is_dir():
        return {}
    for p in folder.glob("u*-of-*.json"):
        tag, _, gen = p.name[:-len(".json")].rpartition(".")
        if not tag:  # a store's lease object, `<unit>.json` (fetched by `engine status URL`)
            tag, gen = p.name[:-len(".json")], "-1"
        elif not gen.isdigit():
            continue
        try:
            rec = orjson.loads(p.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if tag not in recs or int(gen) > recs[tag][0]:
            recs[tag] = (int(gen), rec)
    return {t: r for t, (_, r) in recs.items()}


def view(tag: str, rec: dict | None) -> UnitView:
    if rec is None:
        return UnitView(tag, "free", None)
    if rec.get("committed"):
        return UnitView(tag, "committed", rec)
    timeout = float(rec.get("timeout", 60.0))
    why = unit_stale(rec, timeout)
    if why is None:
        beat = rec.get("heartbeat") or 0
        every = float(rec.get("every", 10.0))  # the holder's heartbeat interval
        return UnitView(tag, "quiet" if time.time() - beat > 2 * every + 1 else "running", rec)
    if deaths(rec, timeout) >= MAX_FAILURES:
        return UnitView(tag, "failed", rec)
    return UnitView(tag, "stopped", rec)


@dataclass
class UnitWork:
    """A claimed unit as `run.Run` runs it: its tag, its reader (input/reader.py `Reader.unit`), the private
    directory it writes (adopt()) and the run's fingerprint (taken once by the worker)."""
    tag: str
    reader: object  # engine.input.reader.Reader
    dir: Path
    fingerprint: dict
