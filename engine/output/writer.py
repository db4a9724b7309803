"""The writer thread: decodes completions, builds output rows, journals and writes Parquet.

The main thread only hands over (stream, items) through a bounded queue, so generation never waits
on compression or disk unless the writer falls a whole queue behind (back-pressure keeps memory
bounded). It is a thread, not a process: SGLang's Engine.shutdown() kills child processes.
Any error in the thread (disk full, permission) is raised again in the main thread on its next call.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import pyarrow as pa

from engine.errors import WriterError
from engine.output.parts import PartSink

log = logging.getLogger(__name__)

_STOP = object()


class AsyncWriter:
    def __init__(self, sinks: dict[str, PartSink], build_rows: dict[str, Callable[[list], pa.RecordBatch]],
                 queue_size: int, flush_seconds: float, on_flush: Callable[[], None] | None = None):
        self.sinks, self.build_rows = sinks, build_rows
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.flush_seconds = flush_seconds
        self.on_flush = on_flush
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="engine-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, stream: str, items: list) -> None:
        while True:
            if self.error is not None:
                raise WriterError(f"the writer failed: {self.error}") from self.error
            try:
                self.queue.put((stream, items), timeout=0.5)
                return
            except queue.Full:
                continue

    def _loop(self) -> None:
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
                    self.sinks[stream].add(self.build_rows[stream](items))
                if time.monotonic() - last_flush >= self.flush_seconds:
                    for sink in self.sinks.values():
                        sink.flush()
                    if self.on_flush:
                        self.on_flush()
                    last_flush = time.monotonic()
            for sink in self.sinks.values():
                sink.close()
            if self.on_flush:
                self.on_flush()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            log.exception("writer thread failed")
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
            raise WriterError(f"the writer failed: {self.error}") from self.error
