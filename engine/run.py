"""One shard of one run: assemble the pipeline, run the loop, finish.

    Run.assemble()   prompts, model -> renderer -> reader (preflight) -> backend (made, not started)
                     -> output directory (the shard's lease, fingerprint, recovery) -> writer -> producer
    Run.loop()       start the backend; then, on the main thread,
                     producer -> Collector (in flight, retries) -> backend.generate() -> Collector -> writer
                     queue; the writer's reports (rows stored, journals flushed) -> counters, state file
    Run.finish()     state file, summary, diversity report, dataset card, last upload

Every figure goes through one typed record (engine/output/record.py): the state file, summary.json and
what `engine run` prints are views of it.

Signals: until generation starts a SIGTERM/SIGINT raises `Interrupted` (nothing is in flight); while
it runs `_on_signal` stops admitting work, what finished is committed, and the run exits 3; once the
work is complete a signal only skips the diversity report, and once the state and summary are written
(`engine run`: settle_signals) signals are ignored, so the process ends with the run's own status.
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

from engine.backends import context_reserve, make_backend
from engine.backends.base import Backend
from engine.collect import Collector, RejectedRows, RowBuilder
from engine.config.backends import traits
from engine.config.run_config import RunConfig
from engine.errors import (
    BackendDead,
    EngineError,
    ExitCode,
    RunFailed,
    TooManyErrors,
    WriterError,
)
from engine.fingerprint import run_fingerprint
from engine.gate import useful_notes
from engine.input.identity import check_read
from engine.input.reader import Reader
from engine.metrics import Clock, Counters, process_started
from engine.model.setup import ModelSetup
from engine.output import layout
from engine.output.place import OutputPlace
from engine.output.record import (
    ProcessFigures,
    ProcessReport,
    Rates,
    RunSummary,
    ShardState,
    ShardTotals,
    read_state,
    write_state,
    write_summary,
)
from engine.output.sinks import ShardSinks, Stored
from engine.output.units import UnitWork
from engine.output.writer import AsyncWriter, Flushed, Written
from engine.preflight import preflight
from engine.progress import Progress
from engine.render.prompts import Prompt, load_prompts
from engine.render.renderer import Renderer
from engine.schedule.producer import Producer
from engine.signals import SIGNALS, Interrupted, first_signal, settle, stop_requested

log = logging.getLogger(__name__)

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
    counters: Counters
    clock: Clock
    progress: Progress
    writer: AsyncWriter
    producer: Producer


class Run:
    """One shard of one run. `setup` and a started `backend` may be passed in to reuse them across
    runs (tools/bench warms a backend up, then measures with it); a passed backend is not closed.
    `settle_signals` (`engine run`): once finished, SIGTERM/SIGINT are ignored (signals.settle), not restored."""

    def __init__(self, cfg: RunConfig, overwrite: bool = False, setup: ModelSetup | None = None, backend=None,
                 retry_errors: bool = False, extend_input: bool = False, settle_signals: bool = False,
                 unit: UnitWork | None = None):
        self.cfg, self.overwrite, self.retry_errors = cfg, overwrite, retry_errors
        self.unit = unit  # a unit claimed by a worker (engine/worker.py): its reader, directory and fingerprint
        self.settle_signals = settle_signals
        self.extend_input = extend_input  # --extend-input: files that joined the input are accepted (layout.py)
        self.setup, self.shared_backend = setup, backend
        self.stop = threading.Event()
        self.interrupted_by: str | None = None
        self.finishing = False  # generation is over: a signal no longer changes the outcome
        self.place: OutputPlace | None = None  # the output directory, its lease (and its store, for a URL)
        self.p: Pipeline | None = None
        self.before = ShardTotals()  # sums of this shard's earlier attempts (output/record.py)
        self.stored: Stored | None = None  # what the shard's streams hold: the writer's last report
        self.input_files: list[dict] = []  # the input record taken at the start (the fingerprint's)

    def execute(self) -> tuple[int, RunSummary]:
        try:
            p = self.p = self.assemble()
            try:
                code, error = self.loop(p)
            except Interrupted as exc:
                if exc.abort:  # a second Ctrl-C: status then says "interrupted", not "killed or crashed"
                    write_state(p.out, self.state(exit_status=ExitCode.INTERRUPTED))
                raise
            return self.finish(p, code, error)
        finally:
            if self.place is not None:  # whatever the status: the next run need not wait for it to go stale
                self.place.release()

    # ---- assembly, in data-path order ----------------------------------------------------------
    def assemble(self) -> Pipeline:
        cfg = self.cfg
        prompts = load_prompts(cfg.prompts, cfg.render.layout)
        unit = self.unit
        if unit is None:
            reader = self._reader()  # before the model loads: an input mistake is reported at once
            preflight(cfg)  # backend installed, device, model, prompts, output.dir: 2 (or 1) before the model loads
        else:  # the worker checked both before its first unit
            reader = unit.reader
        setup = self.setup or ModelSetup.load(cfg)
        if unit is None:
            log.info("model %s: tokenizer and config loaded (context %d)", setup.model_name, setup.context)
        renderer = Renderer(setup.tokenizer, prompts, setup.context, cfg.sampling.max_new_tokens,
                            cfg.model.system_prompt, reserve=context_reserve(cfg.backend))
        # Made (not started) before the output directory is touched: a backend that refuses this
        # configuration (e.g. sampling.seed on vLLM's CPU engine) leaves no fingerprint behind.
        backend = self.shared_backend or make_backend(cfg, setup)
        tag = layout.shard_tag(cfg.shard.index, cfg.shard.count) if unit is None else unit.tag
        streams = [p.name for p in prompts] + [layout.REJECTED]
        if unit is None:
            self.place = OutputPlace.claim(cfg.output, streams, tag, self.overwrite)  # the shard's lease, then the dir
            fingerprint = run_fingerprint(cfg, prompts, setup, renderer, reader)
        else:  # the worker holds the unit's lease; its directory is private until the unit is committed
            self.place = OutputPlace(cfg.output, unit.dir, cards=False)
            fingerprint = unit.fingerprint
        out = self.place.dir
        self.input_files = fingerprint["input"]["files"]  # signed again at the end (finish: _input_unchanged)
        resumed = layout.check_fingerprint(out, fingerprint, self.overwrite, self.extend_input)
        self.place.first_upload()  # a store's, now: a missing bucket or bad credentials stop the run here
        self.before = ShardTotals.before(read_state(out, tag))  # sums of the earlier attempts
        sinks = ShardSinks.open(out, tag, [p.name for p in prompts], reader.schema, cfg.output,
                                drop_errors=self.retry_errors)
        if resumed:
            log.info("resuming in %s: %d results already stored for this shard", out, sinks.already_done())
        if sinks.dropped:
            log.info("--retry-errors: %d stored error rows removed; their documents are generated again", sinks.dropped)
        self.stored = sinks.snapshot()
        total = reader.total_rows
        counters = Counters(total_requests=total * len(prompts) if total is not None else None)
        # a run that set itself up counts its process's start too (imports, model, input)
        clock = Clock(process_started=process_started() if self.setup is None and self.shared_backend is None
                      else None)
        progress = Progress(counters, clock, cfg.output.progress_seconds, quiet=unit is not None)
        row_model = f"instant:{setup.model_name}" if traits(cfg.backend).model_free else setup.model_name
        builders = {p.name: RowBuilder(p.name, row_model, setup.tokenizer, sinks.schema, sinks.renames)
                    for p in prompts}
        builders[layout.REJECTED] = RejectedRows(layout.REJECTED_SCHEMA)
        writer = AsyncWriter(sinks, builders, cfg.output.writer_queue, cfg.output.flush_seconds)
        producer = Producer(reader, renderer, sinks.done, lambda rows: writer.put(layout.REJECTED, rows), counters,
                            self.stop, cfg.scheduler)
        return Pipeline(prompts, setup, renderer, reader, backend, out, tag, resumed, sinks, counters, clock,
                        progress, writer, producer)

    def _reader(self) -> Reader:
        i, s = self.cfg.input, self.cfg.shard
        reader = Reader(i.paths, i.text_column, i.id_column, i.batch_rows, i.max_doc_chars, s.index, s.count)
        reader.preflight()
        log.info("input checked: %d file(s), %s rows for this shard", len(reader.files),
                 f"{reader.total_rows:,}" if reader.total_rows is not None else "?")
        return reader

    # ---- the loop ------------------------------------------------------------------------------
    def loop(self, p: Pipeline) -> tuple[int, BaseException | None]:
        """Generate until the input is done, a signal stops it, or something fails; every part is
        committed before this returns. Returns the exit status and the error (None when there is none)."""
        on_main = threading.current_thread() is threading.main_thread()
        old_handlers = {s: signal.getsignal(s) for s in SIGNALS} if on_main else {}
        self._restore_handlers = old_handlers
        code, error = ExitCode.OK, None
        # The hot path allocates millions of short-lived lists (token ids) and no reference cycles:
        # frequent generational collections cost ~10% of host throughput (python -m benchmarks.host).
        gc_threshold = gc.get_threshold()
        gc.set_threshold(50_000, 20, 100)
        try:
            p.writer.start()
            write_state(p.out, self.state())  # the shard is under way (engine status: rows stored so far)
            self.place.start_sync()
            p.progress.start()  # the progress line every output.progress_seconds, off a terminal
            self._start_backend(p.backend)
            p.clock.ready()  # start-up ends: rates are over generation time from here
            p.progress.generation_started()
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
            p.clock.generation_done()  # finishing (commits, summary, report, card) starts here
            p.progress.close()
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
                    self._take_reports(p, write=False)  # the last rows stored; finish() writes the state
                    gc.set_threshold(*gc_threshold)
        return code, error

    def _start_backend(self, backend: Backend) -> None:
        if self.shared_backend is not None:
            return
        log.info("starting the %s backend", self.cfg.backend)
        t0 = time.perf_counter()
        backend.start()  # a signal here raises Interrupted (nothing is in flight yet)
        log.info("%s backend ready in %.1f s; generating", self.cfg.backend, time.perf_counter() - t0)

    def _generate(self, p: Pipeline) -> None:
        cfg, counters = self.cfg, p.counters
        collect = Collector(iter(p.producer), p.writer.put, counters, cfg.retry, self.stop)
        while True:  # another pass serves retries of failures that came back after the input ended
            for completions in p.backend.generate(iter(collect.requests), self.stop):
                collect(completions)
                self._take_reports(p)
                p.progress.refresh()
                if counters.failed >= MIN_ERRORS_TO_STOP and \
                        counters.failed > cfg.retry.max_error_fraction * counters.requests_done:
                    raise TooManyErrors(f"{counters.failed:,} of {counters.requests_done:,} requests failed "
                                        f"(more than retry.max_error_fraction = {cfg.retry.max_error_fraction:g})"
                                        f"; last error: {counters.last_error}")
            if self.stop.is_set() or not collect.more:
                break

    def _take_reports(self, p: Pipeline, write: bool = True) -> None:
        """The writer's reports: rows this process stored (after the quality gate) into the counters; after a
        journal flush, the state file (and now and then the local dataset card)."""
        flushed = False
        for report in p.writer.drain():
            if isinstance(report, Written) and report.stream != layout.REJECTED:
                p.counters.add_stored(report.stream, report.tally)
            elif isinstance(report, Flushed):
                self.stored, flushed = report.stored, True
        if flushed and write:
            write_state(p.out, self.state())
            self.place.refresh_card()

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
    def state(self, complete: bool = False, exit_status: int | None = None) -> ShardState:
        """The shard's state file (`engine status` reads it): rows and tokens of every attempt from the stored
        parts, `totals` summed over attempts, `this_process` this process's; `exit_status` once it ended."""
        p, stored = self.p, self.stored
        this = ProcessFigures.of(p.counters, p.clock)
        return ShardState(
            shard=p.tag, input_rows=p.reader.total_rows, prompts=stored.per_prompt(), rejected=stored.rejected_rows(),
            complete=complete, totals=self.before.plus(this, stored.stored(), stored.output_tokens()),
            this_process=this, rates=Rates.of(p.counters, p.clock), model=p.setup.model_name,
            backend=self.cfg.backend, pid_host=f"{socket.gethostname()}:{os.getpid()}",
            flush_seconds=self.cfg.output.flush_seconds, elapsed_s=round(p.clock.elapsed, 1),
            slurm=layout.slurm_attempt(), exit_status=exit_status,
            ended_at=None if exit_status is None else time.time())

    def finish(self, p: Pipeline, code: int, error: BaseException | None) -> tuple[int, RunSummary]:
        """State file, summary and report (a signal now only skips the report: the work is saved)."""
        try:
            self.finishing = True
            code, error = self._input_unchanged(p, code, error)
            code, error = self._error_share(p, code, error)
            complete = code == ExitCode.OK
            summary = self._summary(p, complete)
            try:
                write_state(p.out, self.state(complete, exit_status=code))
                write_summary(p.out, summary, self.cfg.shard.count)
            except OSError:
                if isinstance(error, WriterError):  # e.g. the full disk that stopped the writer: its error names where
                    raise error from None
                raise
            if complete and self.cfg.report.enabled and self.unit is None and self._report(p, summary):
                # summary.json again, so that its time covers the report and it carries the report's warnings
                summary.process = ProcessReport.of(p.counters, p.clock)
                write_summary(p.out, summary, self.cfg.shard.count)
            code, error = self._publish(summary, code, error)
            if error is not None:
                raise RunFailed(code, summary, error) from error
            return code, summary
        finally:
            if self.settle_signals:  # the outcome is decided: a signal now must not change the exit status
                settle()
            else:
                for s, h in getattr(self, "_restore_handlers", {}).items():
                    signal.signal(s, h)

    def _input_unchanged(self, p: Pipeline, code: int, error: BaseException | None):
        """A run that read its whole input: was it the input recorded at its start (the same sizes and signatures,
        and as many rows as preflight counted)? A file cut, replaced or removed meanwhile is status 1, never
        "complete" (input/identity.py `check_read`)."""
        if code != ExitCode.OK:
            return code, error
        try:
            check_read(self.input_files, p.reader.my_files, p.reader.rows_read, p.reader.total_rows)
        except EngineError as exc:  # InputChanged; a StoreError when a store cannot say
            return exc.exit_code, exc
        return code, error

    def _error_share(self, p: Pipeline, code: int, error: BaseException | None) -> tuple[int, BaseException | None]:
        stored, failed = self.stored.stored(), self.stored.failed()
        limit = self.cfg.retry.max_error_fraction
        if code == ExitCode.OK and failed > limit * stored:
            return ExitCode.TOO_MANY_ERRORS, TooManyErrors(
                f"{failed:,} of {stored:,} stored rows are errors (more than retry.max_error_fraction = {limit:g}); "
                f"see their `error` column, fix the cause, then regenerate them with: engine run CONFIG --retry-errors")
        return code, error

    def _summary(self, p: Pipeline, complete: bool) -> RunSummary:
        this = ProcessFigures.of(p.counters, p.clock)
        stored = self.stored
        return RunSummary(
            output_dir=str(p.out), shard=p.tag, model=p.setup.model_name, backend=self.cfg.backend,
            prompts=[q.name for q in p.prompts], resumed=p.resumed, complete=complete, input_rows=p.reader.total_rows,
            documents_stored=stored.stored_per_prompt(), process=ProcessReport.of(p.counters, p.clock),
            # counts of the whole shard (every process that worked on it), as `engine status` shows them
            failed=stored.failed(), error_rows_removed=p.sinks.dropped,
            shard_totals=self.before.plus(this, stored.stored(), stored.output_tokens()), this_process=this,
            input_warnings=list(p.reader.warnings),
            useful_notes=useful_notes({n: f.finish_reasons for n, f in stored.per_prompt().items()},
                                      {n: r.max_new_tokens for n, r in p.renderer.rendered.items()},
                                      {q.name: q.max_new_tokens for q in p.prompts}))

    def _report(self, p: Pipeline, summary: RunSummary) -> bool:
        if self.interrupted_by is not None:
            log.warning("%s received: the run is complete; the diversity report is skipped (make it with: "
                        "engine report %s)", self.interrupted_by, p.out)
            return False
        from engine.output.report import write_report  # lazy: matplotlib

        log.info("run complete; writing the diversity report")
        try:
            report = write_report(p.out, self.cfg.report.sample, self.cfg.sampling.seed or 0)
        except Exception:  # noqa: BLE001 - the results are complete; a failed analysis must not hide that
            log.exception("the diversity report failed; make it again with: engine report %s", p.out)
            return False
        summary.report = str(p.out / "report" / "report.md")
        summary.report_warnings = [f"{g['prompt']}/{g['model']}: {w}" for g in report["groups"] for w in g["warnings"]]
        return True

    def _publish(self, summary: RunSummary, code: int, error: BaseException | None):
        """The dataset card and, for a store, the last upload; a failed upload is status 4 (resumable)."""
        failed = self.place.publish()
        if failed is not None:
            summary.complete = False
            if error is None:
                code, error = ExitCode.BACKEND_DEAD, failed
        return code, error


def _exit_code(exc: BaseException, interrupted: bool) -> int:
    """The status of a run that failed mid-run: the error's own, but a backend that died of the same
    signal that stopped the run is an interruption, and an unexpected exception a dead backend."""
    if interrupted and isinstance(exc, BackendDead):
        return ExitCode.INTERRUPTED
    if isinstance(exc, EngineError):
        return exc.exit_code
    return ExitCode.BACKEND_DEAD
