"""One shard of one run: assemble the pipeline, run the loop, finish.

    Run.assemble()   prompts, model -> renderer -> reader (preflight) -> backend (made, not started)
                     -> output directory (the shard's lease, fingerprint, recovery) -> writer -> producer
    Run.loop()       start the backend; then, on the main thread,
                     producer -> RetryFeed -> backend.generate() -> Collector -> writer queue
    Run.finish()     state file, summary, diversity report, dataset card, last upload

Signals: until generation starts a SIGTERM/SIGINT raises `Interrupted` (nothing is in flight); while
it runs `_on_signal` stops admitting work, what finished is committed, and the run exits 3; once the
work is complete a signal only skips the diversity report.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from engine.atomic import write_atomic
from engine.backends import context_reserve, make_backend
from engine.backends.base import Backend
from engine.collect import Collector, RejectedRows, RowBuilder
from engine.config.run_config import RunConfig
from engine.errors import (
    BackendDead,
    EngineError,
    ExitCode,
    RunFailed,
    StoreError,
    TooManyErrors,
    WriterError,
)
from engine.input.identity import input_record
from engine.input.reader import Reader
from engine.metrics import Metrics, process_started
from engine.model.setup import ModelSetup
from engine.output import layout
from engine.output.card import StoreCard, write_card
from engine.output.lease_store import take_lease
from engine.output.sinks import ShardSinks
from engine.output.totals import earlier, read_state, shard_totals, this_process
from engine.output.writer import AsyncWriter
from engine.render.prompts import Prompt, load_prompts
from engine.render.renderer import Renderer
from engine.schedule.producer import Producer
from engine.schedule.retry import RetryFeed
from engine.signals import SIGNALS, Interrupted, first_signal, stop_requested

log = logging.getLogger(__name__)

CARD_SECONDS = 30.0  # a local output's README.md is refreshed this often while the run goes
MIN_ERRORS_TO_STOP = 20  # error rows before a run may stop early for its error share (the end check has no minimum)


@dataclass
class Pipeline:
    """The assembled parts of one shard's run, in data-path order."""
    prompts: list[Prompt]
    setup: ModelSetup
    renderer: Renderer
    reader: Reader
    backend: Backend
    out: Path  # the directory written (a store's local staging directory when output.dir is a URL)
    tag: str  # the shard tag, s00003-of-00016
    resumed: bool
    sinks: ShardSinks
    metrics: Metrics
    writer: AsyncWriter
    producer: Producer


class Run:
    """One shard of one run. `setup` and a started `backend` may be passed in to reuse them across
    runs (tools/bench warms a backend up, then measures with it); a passed backend is not closed."""

    def __init__(self, cfg: RunConfig, overwrite: bool = False, setup: ModelSetup | None = None, backend=None,
                 retry_errors: bool = False, extend_input: bool = False):
        self.cfg, self.overwrite, self.retry_errors = cfg, overwrite, retry_errors
        self.extend_input = extend_input  # --extend-input: files that joined the input are accepted (layout.py)
        self.setup, self.shared_backend = setup, backend
        self.stop = threading.Event()
        self.interrupted_by: str | None = None
        self.finishing = False  # generation is over: a signal no longer changes the outcome
        self.remote = None  # output.dir in a store (output.remote.RemoteOutput): its staging directory is `out`
        self.syncer = None
        self.card = None
        self.card_at = 0.0
        self.p: Pipeline | None = None
        self.before: dict = {"attempts": 0}  # sums of this shard's earlier attempts (output/totals.py)
        self.lease = None  # this shard's lease (output/lease.py), taken before the output is read or written

    def execute(self) -> tuple[int, dict]:
        try:
            p = self.p = self.assemble()
            code, error = self.loop(p)
            return self.finish(p, code, error)
        finally:
            if self.lease is not None:  # whatever the status: the next run need not wait for it to go stale
                self.lease.release()

    # ---- assembly, in data-path order ----------------------------------------------------------
    def assemble(self) -> Pipeline:
        cfg = self.cfg
        prompts = load_prompts(cfg.prompts)
        reader = self._reader()  # before the model loads: an input mistake is reported at once
        setup = self.setup or ModelSetup.load(cfg)
        log.info("model %s: tokenizer and config loaded (context %d)", setup.model_name, setup.context)
        renderer = Renderer(setup.tokenizer, prompts, setup.context, cfg.sampling.max_new_tokens,
                            cfg.model.system_prompt, reserve=context_reserve(cfg.backend))
        # Made (not started) before the output directory is touched: a backend that refuses this
        # configuration (e.g. sampling.seed on vLLM's CPU engine) leaves no fingerprint behind.
        backend = self.shared_backend or make_backend(cfg, setup)
        tag = layout.shard_tag(cfg.shard.index, cfg.shard.count)
        out, self.remote = self._output_location(prompts, tag)
        resumed = layout.check_fingerprint(out, self._fingerprint(prompts, setup, renderer, reader), self.overwrite,
                                           self.extend_input)
        if self.remote is not None:  # the first upload now: a missing bucket or bad credentials stop the run here
            self.remote.sync()
        self.before = earlier(read_state(out, tag))  # sums of the earlier attempts (output/totals.py)
        sinks = ShardSinks.open(out, tag, [p.name for p in prompts], reader.schema, cfg.output,
                                drop_errors=self.retry_errors)
        if resumed:
            log.info("resuming in %s: %d results already stored for this shard", out, sinks.already_done())
        if sinks.dropped:
            log.info("--retry-errors: %d stored error rows removed; their documents are generated again", sinks.dropped)
        total = reader.total_rows
        metrics = Metrics(total_requests=total * len(prompts) if total is not None else None,
                          log_every=cfg.output.progress_seconds,
                          # a run that set itself up counts its process's start too (imports, model, input)
                          process_started=process_started() if self.setup is None and self.shared_backend is None
                          else None)
        row_model = f"instant:{setup.model_name}" if cfg.backend == "instant" else setup.model_name  # no model ran
        builders = {p.name: RowBuilder(p.name, row_model, setup.tokenizer, sinks.schema, sinks.renames)
                    for p in prompts}
        builders[layout.REJECTED] = RejectedRows(layout.REJECTED_SCHEMA)
        writer = AsyncWriter(sinks.streams, builders, cfg.output.writer_queue, cfg.output.flush_seconds,
                             on_flush=self._on_flush)
        producer = Producer(reader, renderer, [p.name for p in prompts], sinks.done,
                            lambda rows: writer.put(layout.REJECTED, rows), metrics, self.stop,
                            cfg.scheduler.lookahead, cfg.scheduler.length_buckets, cfg.scheduler.prefetch_batches)
        return Pipeline(prompts, setup, renderer, reader, backend, out, tag, resumed, sinks, metrics, writer, producer)

    def _reader(self) -> Reader:
        i, s = self.cfg.input, self.cfg.shard
        reader = Reader(i.paths, i.text_column, i.id_column, i.batch_rows, i.max_doc_chars, s.index, s.count)
        reader.preflight()
        log.info("input checked: %d file(s), %s rows for this shard", len(reader.files),
                 f"{reader.total_rows:,}" if reader.total_rows is not None else "?")
        return reader

    def _fingerprint(self, prompts: list[Prompt], setup: ModelSetup, renderer: Renderer, reader: Reader) -> dict:
        """What the stored results depend on: resuming into an output made otherwise is refused."""
        cfg, s = self.cfg, setup.sampling
        return {
            "model": setup.model_name, "backend_family": "instant" if cfg.backend == "instant" else "model",
            "prompts": {p.name: p.fingerprint for p in prompts},
            "sampling": {"temperature": s.temperature, "top_p": s.top_p, "seed": cfg.sampling.seed, **s.extra(),
                         **({"ignore_eos": True} if cfg.sampling.ignore_eos else {}),
                         "max_new_tokens": {n: r.max_new_tokens for n, r in renderer.rendered.items()}},
            "context": setup.context, "shard_count": cfg.shard.count, "system_prompt": cfg.model.system_prompt,
            "input": {"text_column": cfg.input.text_column, "id_column": cfg.input.id_column,
                      "files": input_record(reader.files)},
        }

    def _output_location(self, prompts: list[Prompt], tag: str) -> tuple[Path, object]:
        """The directory the run writes to, and the store it is mirrored to (None: a local output.dir)."""
        from engine.output.remote import RemoteOutput, default_staging  # lazy: fsspec clients (s3fs ...)
        from engine.stores import is_remote

        o = self.cfg.output
        url = o.dir
        if not is_remote(url):  # the lease first: before anything in the output is read (recovery) or written
            out = layout.writable_dir(Path(url))
            self.lease = take_lease(o, tag, out=out)  # a lost lease ends the process (status 6, lease.py)
            return out, None
        staging = Path(o.staging_dir or default_staging(url))
        remote = RemoteOutput(url, staging, o.store_give_up_seconds)
        self.lease = take_lease(o, tag, remote=remote)  # before the store's copy is cleared or pulled
        streams = [p.name for p in prompts] + [layout.REJECTED]
        if self.overwrite:
            log.info("--overwrite: deleting this run's results in %s", url)
            remote.clear([*layout.ENGINE_DIRS, *streams, "summary.json", "README.md"])
            layout.clear(staging)
        fetched = remote.pull(streams, tag)
        log.info("output %s: staging in %s (%d committed part(s) of this shard fetched from the store)",
                 url, staging, fetched)
        return staging, remote

    # ---- the loop ------------------------------------------------------------------------------
    def loop(self, p: Pipeline) -> tuple[int, BaseException | None]:
        """Generate until the input is done, a signal stops it, or something fails; every part is
        committed before this returns. Returns the exit status and the error (None when there is none)."""
        on_main = threading.current_thread() is threading.main_thread()
        old_handlers = {s: signal.getsignal(s) for s in SIGNALS} if on_main else {}
        self._restore_handlers = old_handlers
        code, error = ExitCode.OK, None
        # The hot path allocates millions of short-lived lists (token ids) and no reference cycles:
        # frequent generational collections cost ~10% of host throughput (python -m engine.bench.host).
        gc_threshold = gc.get_threshold()
        gc.set_threshold(50_000, 20, 100)
        try:
            p.writer.start()
            if self.remote is not None:
                self._start_syncer(p.out)
            p.metrics.start_timer()  # the progress line every output.progress_seconds, off a terminal
            self._start_backend(p.backend)
            p.metrics.ready()  # start-up ends: rates are over generation time from here
            if on_main:  # from here on a signal lets the run finish its writes (see _on_signal)
                for s in SIGNALS:
                    signal.signal(s, self._on_signal)
                if (seen := first_signal()) is not None:  # one came during start-up and its exception was lost
                    raise Interrupted(seen)
            p.producer.start()
            self._generate(p)
            if self.stop.is_set():
                code = ExitCode.INTERRUPTED
        except Interrupted as exc:  # while the backend started: nothing was in flight
            if exc.abort:  # a second Ctrl-C: no clean shutdown (the finally blocks below still close)
                raise
            self.interrupted_by = exc.signame
            log.warning("%s received while the backend started: stopping (the run is resumable)", exc.signame)
            code = ExitCode.INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - the backend or the input failed mid-run: save what is done, then report
            code, error = _exit_code(exc, interrupted=self.interrupted_by is not None), exc
            if code == ExitCode.INTERRUPTED:  # e.g. the engine died of the same Ctrl-C: an interruption, resumable
                log.info("after %s: %s", self.interrupted_by, exc)
                error = None
        finally:
            self.stop.set()  # ends the producer thread if it is still reading
            p.metrics.generation_done()  # finishing (commits, summary, report, card) starts here
            p.metrics.close()
            try:
                if self.shared_backend is None:
                    p.backend.close()
            finally:
                try:
                    p.writer.close()  # commits every part; raises if writing failed
                except WriterError as exc:  # lost data outranks any other error: report it
                    if not isinstance(error, WriterError):
                        code, error = ExitCode.ERROR, exc
                finally:
                    gc.set_threshold(*gc_threshold)
        return code, error

    def _start_backend(self, backend: Backend) -> None:
        if self.shared_backend is not None:
            return
        log.info("starting the %s backend", self.cfg.backend)
        t0 = time.perf_counter()
        backend.start()  # a signal here raises Interrupted (nothing is in flight yet)
        log.info("%s backend ready in %.1f s; generating", self.cfg.backend, time.perf_counter() - t0)

    def _start_syncer(self, out: Path) -> None:
        from engine.output.remote import Syncer

        every = self.cfg.output.sync_seconds or (60.0 if self.remote.hub else 10.0)
        self.card = StoreCard(out, self.cfg.output.dir)
        self.syncer = Syncer(self.remote, every, before_sync=self.card)
        self.syncer.start()

    def _generate(self, p: Pipeline) -> None:
        cfg, metrics = self.cfg, p.metrics
        feed = RetryFeed(iter(p.producer), cfg.retry.max_attempts, cfg.retry.backoff_seconds, self.stop)
        collect = Collector(p.producer.pending, p.writer.put, metrics, feed)
        while True:  # another pass serves retries of failures that came back after the input ended
            for completions in p.backend.generate(iter(feed), self.stop):
                collect(completions)
                if metrics.failed >= MIN_ERRORS_TO_STOP and \
                        metrics.failed > cfg.retry.max_error_fraction * metrics.requests_done:
                    raise TooManyErrors(f"{metrics.failed:,} of {metrics.requests_done:,} requests failed "
                                        f"(more than retry.max_error_fraction = {cfg.retry.max_error_fraction:g})"
                                        f"; last error: {metrics.last_error}")
            if self.stop.is_set() or not feed.pending:
                break

    def _on_signal(self, signum, _frame) -> None:
        # A repeated SIGTERM is the same request (Slurm signals the whole job, and its script forwards
        # one too); a second SIGINT raises Interrupted(abort=True): abort now (a crash, and crashes are
        # recovered), reported without a traceback by the CLI.
        if not stop_requested(signum) and self.interrupted_by is not None:
            return
        self.interrupted_by = signal.Signals(signum).name
        if self.finishing:
            log.warning("%s received: the work is complete and saved; ending the diversity report first (seconds)",
                        self.interrupted_by)
            return
        log.warning("%s received: finishing writes, then exiting (the run is resumable)", self.interrupted_by)
        self.stop.set()

    # ---- progress and the end --------------------------------------------------------------------
    def state(self, complete: bool = False, exit_status: int | None = None) -> dict:
        """The shard's state file (`engine status` reads it): `output_tokens` and `totals` are the shard's over
        every attempt, `this_process` this process's (output/totals.py); `exit_status` once it ended."""
        p = self.p
        m, sinks, total = p.metrics, p.sinks, p.reader.total_rows
        shard = shard_totals(self.before, this := this_process(m), sinks)
        ended = {"exit_status": int(exit_status), "ended_at": time.time()} if exit_status is not None else {}
        return {"shard": p.tag, "input_rows": total, "prompts": sinks.per_prompt(),
                "rejected": sinks.rejected_rows(), "complete": complete,
                "output_tokens": shard["output_tokens"], "elapsed_s": round(m.elapsed, 1),
                **m.rates(),  # this process's start-up, generation, finishing seconds; rates over generation
                "flush_seconds": self.cfg.output.flush_seconds,
                "model": p.setup.model_name, "backend": self.cfg.backend, "pid_host": host_pid(),
                "totals": shard, "this_process": this, **layout.slurm_attempt(), **ended}

    def _on_flush(self) -> None:
        """On the writer thread after every journal flush: the state file, and now and then the card."""
        layout.write_state(self.p.out, self.p.tag, self.state())
        if self.remote is None and time.monotonic() - self.card_at > CARD_SECONDS:  # a store's is made at upload
            self.card_at = time.monotonic()
            write_card(self.p.out)

    def finish(self, p: Pipeline, code: int, error: BaseException | None) -> tuple[int, dict]:
        """State file, summary and report (a signal now only skips the report: the work is saved)."""
        try:
            self.finishing = True
            code, error = self._error_share(p, code, error)
            complete = code == ExitCode.OK
            layout.write_state(p.out, p.tag, self.state(complete, exit_status=code))
            summary = self._summary(p, complete)
            name = "summary.json" if self.cfg.shard.count == 1 else f"summary-{p.tag}.json"
            write_atomic(p.out / name, orjson.dumps(summary, option=orjson.OPT_INDENT_2))
            if complete and self.cfg.report.enabled:
                self._report(p, summary)
            code, error = self._publish(p, summary, code, error)
            if error is not None:
                raise RunFailed(code, summary, error) from error
            return code, summary
        finally:
            for s, h in getattr(self, "_restore_handlers", {}).items():
                signal.signal(s, h)

    def _error_share(self, p: Pipeline, code: int, error: BaseException | None) -> tuple[int, BaseException | None]:
        stored, failed = p.sinks.stored(), p.sinks.failed()
        limit = self.cfg.retry.max_error_fraction
        if code == ExitCode.OK and failed > limit * stored:
            return ExitCode.TOO_MANY_ERRORS, TooManyErrors(
                f"{failed:,} of {stored:,} stored rows are errors (more than retry.max_error_fraction = {limit:g}); "
                f"see their `error` column, fix the cause, then regenerate them with: engine run CONFIG --retry-errors")
        return code, error

    def _summary(self, p: Pipeline, complete: bool) -> dict:
        cfg = self.cfg
        return {"output_dir": str(p.out), "shard": p.tag, "model": p.setup.model_name, "backend": cfg.backend,
                "prompts": [q.name for q in p.prompts], "resumed": p.resumed, "complete": complete,
                "input_rows": p.reader.total_rows, "documents_stored": p.sinks.stored_per_prompt(),
                **p.metrics.summary(), "input_warnings": p.reader.warnings,
                # counts of the whole run (every process that worked on this shard), as `engine status` shows
                "failed": p.sinks.failed(), "failed_this_process": p.metrics.failed,
                "error_rows_removed": p.sinks.dropped,  # the shard over every attempt vs this process alone:
                "shard_totals": shard_totals(self.before, this := this_process(p.metrics), p.sinks),
                "this_process": this}

    def _report(self, p: Pipeline, summary: dict) -> None:
        if self.interrupted_by is not None:
            log.warning("%s received: the run is complete; the diversity report is skipped (make it with: "
                        "engine report %s)", self.interrupted_by, p.out)
            return
        from engine.output.report import write_report  # lazy: matplotlib

        log.info("run complete; writing the diversity report")
        try:
            report = write_report(p.out, self.cfg.report.sample, self.cfg.sampling.seed or 0)
        except Exception:  # noqa: BLE001 - the results are complete; a failed analysis must not hide that
            log.exception("the diversity report failed; make it again with: engine report %s", p.out)
            return
        summary["report"] = str(p.out / "report" / "report.md")
        summary["report_warnings"] = [f"{g['prompt']}/{g['model']}: {w}" for g in report["groups"]
                                      for w in g["warnings"]]

    def _publish(self, p: Pipeline, summary: dict, code: int, error: BaseException | None):
        """The dataset card; for a store output, the last upload (parts, state, summary, report, card)."""
        if self.syncer is None:
            write_card(p.out)
            return code, error
        self.card(final=True)
        try:
            self.syncer.close()
            log.info("uploaded to %s", self.cfg.output.dir)
        except StoreError as exc:  # everything is safe in the staging directory: the next run uploads it
            summary["complete"] = False
            if error is None:
                code, error = ExitCode.BACKEND_DEAD, exc
            log.error("uploading to %s failed: %s; the results are safe in %s and the next `engine run` of this "
                      "config uploads them (status 4, resumable)", self.cfg.output.dir, exc, p.out)
        return code, error


def _exit_code(exc: BaseException, interrupted: bool) -> int:
    """The status of a run that failed mid-run: the error's own, but a backend that died of the same
    signal that stopped the run is an interruption, and an unexpected exception a dead backend."""
    if interrupted and isinstance(exc, BackendDead):
        return ExitCode.INTERRUPTED
    if isinstance(exc, EngineError):
        return exc.exit_code
    return ExitCode.BACKEND_DEAD


def host_pid() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run(cfg: RunConfig, overwrite: bool = False) -> tuple[int, dict]:
    return Run(cfg, overwrite).execute()
