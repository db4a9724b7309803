"""The writer thread: builds output rows, journals them and writes Parquet; reports what it stored.

    put(stream, items) -> bounded queue -> (thread) build rows (decode token ids) -> PartSink.add
                                                    -> reports: Written (the batch's tally, after the gate)
                       every flush_seconds: journals flushed -> reports: Flushed (a snapshot of the streams)
    close(): everything queued written, every part committed -> reports: Flushed(final=True)

The main thread only hands over (stream, items), so generation never waits on compression or disk unless
the writer falls a whole queue behind (back-pressure keeps memory bounded); it reads the reports with
`drain()` when it likes (Run: after each batch of completions) — the writer never calls back into the run.
It is a thread, not a process: SGLang's Engine.shutdown() kills child processes. Any error in the thread
(disk full, permission) is raised again in the main thread on its next call.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from engine.errors import WriterError
from engine.metrics import Tally
from engine.output.sinks import ShardSinks, Stored

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(frozen=True)
class Written:
    """Rows of one stream written (journaled) by this process: their tally per finish reason."""
    stream: str
    tally: dict[str, Tally]


@dataclass(frozen=True)
class Flushed:
    """The journals are flushed (rows up to here survive a crash); what the streams hold now."""
    stored: Stored
    final: bool = False  # every part committed: the writer is done


class AsyncWriter:
    def __init__(self, sinks: ShardSinks, build_rows: dict[str, Callable[[list], pa.RecordBatch]],
                 queue_size: int, flush_seconds: float):
        self.sinks, self.build_rows = sinks, build_rows
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.reports: queue.SimpleQueue = queue.SimpleQueue()
        self.flush_seconds = flush_seconds
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="engine-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, stream: str, items: list) -> None:
        while True:
            if self.error is not None:
                raise self._failure()
            try:
                self.queue.put((stream, items), timeout=0.5)
                return
            except queue.Full:
                continue

    def drain(self) -> list[Written | Flushed]:
        """The reports since the last drain, oldest first (never blocks)."""
        out = []
        while True:
            try:
                out.append(self.reports.get_nowait())
            except queue.Empty:
                return out

    def _loop(self) -> None:
        streams = self.sinks.streams
        last_flush = time.monotonic()
        try:
            while True:
                try:
                    item = self.queue.get(timeout=self.flush_seconds / 2)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    break
                if item is not None:
                    stream, items = item
                    tally = streams[stream].add(self.build_rows[stream](items))
                    self.reports.put(Written(stream, tally))
                if time.monotonic() - last_flush >= self.flush_seconds:
                    for sink in streams.values():
                        sink.flush()
                    self.reports.put(Flushed(self.sinks.snapshot()))
                    last_flush = time.monotonic()
            for sink in streams.values():
                sink.close()
            self.reports.put(Flushed(self.sinks.snapshot(), final=True))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            if not isinstance(exc, WriterError):  # a WriterError names its file: the main thread reports it
                log.exception("writer thread failed")
            for sink in streams.values():  # no half-written part is closed again at exit (a second failure)
                sink.abort()
            self.error = exc

    def close(self) -> None:
        """Write everything queued, commit all parts, and wait; raise if the writer failed."""
        if self.thread.is_alive():
            while True:
                try:
                    self.queue.put(_STOP, timeout=0.5)
                    break
                except queue.Full:
                    if self.error is not None or not self.thread.is_alive():
                        break
            self.thread.join()
        if self.error is not None:
            raise self._failure()

    def _failure(self) -> WriterError:
        if isinstance(self.error, WriterError):
            return self.error
        err = WriterError(f"the writer failed: {self.error}")
        err.__cause__ = self.error
        return err
