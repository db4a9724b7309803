"""Where one shard's run writes, and what keeps it that shard's alone.

    OutputPlace.claim()   the shard's lease first (before anything in the output is read or written), then
                          the directory: a local output.dir, or for a store URL (s3://, gs://, hf://) a local
                          staging directory with this shard's committed parts pulled from the store
    first_upload()        a store's first upload before generation (a missing bucket stops the run here)
    start_sync()          a store: upload committed parts and progress every output.sync_seconds
    refresh_card()        a local output: the dataset card, at most every CARD_SECONDS while the run goes
    publish()             the card, and for a store the last upload; a StoreError when that failed
    release()             the lease, whatever the status (the next run need not wait for it to go stale)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from engine.config.run_config import OutputConfig
from engine.errors import StoreError
from engine.output import layout
from engine.output.card import StoreCard, write_card
from engine.output.lease_store import take_lease
from engine.stores import is_remote

log = logging.getLogger(__name__)

CARD_SECONDS = 30.0  # a local output's README.md is refreshed this often while the run goes


class OutputPlace:
    def __init__(self, o: OutputConfig, out: Path, remote=None, lease=None, cards: bool = True):
        self.o, self.dir, self.remote, self.lease = o, out, remote, lease
        self.cards = cards  # False: a unit's private directory (output/units.py) gets no dataset card
        self.syncer = None
        self.card: StoreCard | None = None
        self.card_at = 0.0

    @classmethod
    def claim(cls, o: OutputConfig, streams: list[str], tag: str, overwrite: bool) -> OutputPlace:
        """Take shard `tag`'s lease and set up the directory the run writes (`streams`: prompts + rejected)."""
        if not is_remote(o.dir):  # the lease first: before anything in the output is read (recovery) or written
            out = layout.writable_dir(Path(o.dir))
            return cls(o, out, lease=take_lease(o, tag, out=out))  # a lost lease ends the process (status 6)
        from engine.output.remote import RemoteOutput, default_staging  # lazy: fsspec clients (s3fs ...)

        staging = Path(o.staging_dir or default_staging(o.dir))
        remote = RemoteOutput(o.dir, staging, o.store_give_up_seconds)
        place = cls(o, staging, remote, take_lease(o, tag, remote=remote))  # before the store's copy is touched
        if overwrite:
            log.info("--overwrite: deleting this run's results in %s", o.dir)
            remote.clear([*layout.ENGINE_DIRS, *streams, "summary.json", "README.md"])
            layout.clear(staging)
        fetched = remote.pull(streams, tag)
        log.info("output %s: staging in %s (%d committed part(s) of this shard fetched from the store)",
                 o.dir, staging, fetched)
        return place

    def first_upload(self) -> None:
        if self.remote is not None:
            self.remote.sync()

    def start_sync(self) -> None:
        if self.remote is None:
            return
        from engine.output.remote import Syncer

        every = self.o.sync_seconds or (60.0 if self.remote.hub else 10.0)
        self.card = StoreCard(self.dir, self.o.dir)
        self.syncer = Syncer(self.remote, every, before_sync=self.card)
        self.syncer.start()

    def refresh_card(self) -> None:
        """A local output's card while the run goes (a store's is made at each upload)."""
        if self.cards and self.remote is None and time.monotonic() - self.card_at > CARD_SECONDS:
            self.card_at = time.monotonic()
            write_card(self.dir)

    def publish(self) -> StoreError | None:
        """The dataset card; for a store output, the last upload (parts, state, summary, report, card)."""
        if self.syncer is None:
            if self.cards:
                write_card(self.dir)
            return None
        self.card(final=True)
        try:
            self.syncer.close()
        except StoreError as exc:  # everything is safe in the staging directory: the next run uploads it
            log.error("uploading to %s failed: %s; the results are safe in %s and the next `engine run` of this "
                      "config uploads them (status 4, resumable)", self.o.dir, exc, self.dir)
            return exc
        log.info("uploaded to %s", self.o.dir)
        return None

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
