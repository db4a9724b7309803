"""An output directory in a store (`output.dir` = s3://, gs://, hf://...), mirrored from a local staging directory.

The run writes to the staging directory exactly as to a local output (journal, atomic parts, state
files: output/parts.py), and `RemoteOutput` uploads:
- every committed part, whole, under its final name (an S3/GCS object or a Hub commit appears
  complete or not at all), before the manifest and state files that count it;
- the run's fingerprint, manifests, state files, summary, report and dataset card (README.md);
- never the journal (the uncommitted window: a requeued task on another machine loses at most that).
On start `pull` brings this shard's committed parts (and the fingerprint) from the store into the
staging directory, so the local recovery sees what is committed remotely; where a local part and a
remote one of the same name differ, the remote one wins (another machine resumed this shard).
Store errors are retried as engine/stores.py decides (`retrying`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from pathlib import Path, PurePosixPath

import orjson

from engine.atomic import replace_synced, write_atomic
from engine.output.manifest import record_fetched
from engine.stores import filesystem, retrying

log = logging.getLogger(__name__)


def default_staging(url: str) -> Path:
    root = Path(os.environ.get("SYNTH_ENGINE_STAGING", Path.home() / ".cache" / "synth-engine" / "staging"))
    tag = hashlib.sha256(url.encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[-60:]
    return root / f"{name}-{tag}"


SKIP_DIRS = ("_journal",)


class RemoteOutput:
    """An output directory in a store, mirrored from a local staging directory (see the module doc)."""

    def __init__(self, url: str, staging: Path, give_up_after: float = 300.0, skip_dirs: tuple[str, ...] = SKIP_DIRS):
        """`skip_dirs`: top folders never uploaded (a worker's unit uploads its journal too: output/unit_place.py)."""
        self.skip_dirs = skip_dirs
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
        self._pull_state(f"_state/{shard_tag}.json")
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
                record_fetched(self.staging / "_manifest" / stream / f"{shard_tag}.jsonl", local)
                self._mark(rel)
                fetched += 1
        return fetched

    def _pull_state(self, rel: str) -> None:
        """The shard's state file (the sums of its earlier attempts: output/totals.py), the newer copy."""
        if not self._retry(lambda: self.fs.exists(self.remote(rel)), "checking the state file"):
            return
        theirs = self._retry(lambda: self.fs.cat_file(self.remote(rel)), "reading the state file")
        local = self.staging / rel
        try:
            newer = orjson.loads(theirs).get("updated_at", 0) > orjson.loads(local.read_bytes()).get("updated_at", 0)
        except (OSError, orjson.JSONDecodeError):
            newer = True
        if newer:
            write_atomic(local, theirs)

    def _get(self, rel: str) -> None:
        local = self.staging / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".download")
        self._retry(lambda: self.fs.get_file(self.remote(rel), str(tmp)), f"downloading {rel}")
        replace_synced(tmp, local)

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
            if rel.split("/", 1)[0] in self.skip_dirs or rel.endswith((".tmp", ".download")) or ".tmp" in p.name:
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
    for folder in ("_state", "_lease"):  # the leases tell running from stopped (output/status.py)
        found = retrying(lambda f=folder: fs.glob(f"{root}/{f}/*.json"), f"{url}: listing {folder}", 60)
        (dest / folder).mkdir(parents=True, exist_ok=True)
        for path in found:
            name = PurePosixPath(path).name
            retrying(lambda p=path, n=name, f=folder: fs.get_file(p, str(dest / f / n)), f"{url}: reading {name}", 60)
    return dest
