"""One shard of one run, top to bottom:

    reader -> (producer thread: validate, skip done, tokenise once, render per prompt, length-bucket)
           -> backend (pulls requests as it has room, yields completions)
           -> collector (main thread: joins completions to their documents)
           -> writer thread (decode, journal, zstd Parquet parts, state file)
"""
from __future__ import annotations

import gc
import itertools
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import orjson
import pyarrow as pa

from . import output
from .backends import context_reserve, make_backend
from .backends.base import Completion, Request, SamplingParams
from .config import RunConfig
from .card import StoreCard, write_card
from .journal import DoneSet, PartSink, SeenIds
from .metrics import Metrics
from .model_store import resolve_model
from .prompts import load_prompts
from .reader import Doc, InputError, Reader, Rejection, id_hash
from .renderer import Renderer
from .retry import RetryFeed
from .scheduler import length_buckets
from .signals import SIGNALS, Interrupted
from .writer import AsyncWriter, WriterError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_BACKEND_DEAD, EXIT_TOO_MANY_ERRORS = 0, 1, 2, 3, 4, 5
CARD_SECONDS = 30.0  # a local output's README.md is refreshed this often while the run goes
MIN_ERRORS_TO_STOP = 20  # error rows before a run may stop early for its error share (the end check has no minimum)
_END = object()


@dataclass(slots=True)
class Pending:
    """A request handed to the backend, with the document it came from (kept for the output row)."""
    doc: Doc
    truncated: bool
    request: Request


def generation_config(model_dir: Path | str) -> dict:
    """The keys the model's generation_config.json sets (none when it has none)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir).to_diff_dict()
    except OSError:
        return {}


def sampling_defaults(gen: dict, temperature: float | None, top_p: float | None) -> tuple[float, float]:
    """Run config first, then the model's generation config, then 0.7 / 0.95."""
    if temperature is None:
        temperature = float(gen["temperature"]) if gen.get("do_sample", True) and "temperature" in gen else 0.7
    if top_p is None:
        top_p = float(gen.get("top_p", 0.95))
    return temperature, top_p


def resolve_sampling(gen: dict, s) -> SamplingParams:
    """Every sampling knob from the run config's `[sampling]` first, then the model's generation
    config (as vLLM applies it by default: temperature, top_p, top_k, min_p, repetition_penalty),
    then off. One resolution for every backend, so SGLang, vLLM, HTTP and torch sample alike."""
    temperature, top_p = sampling_defaults(gen, s.temperature, s.top_p)

    def pick(name, value, cast, off):
        if value is not None:
            return cast(value)
        return cast(gen[name]) if gen.get(name) is not None else off
    return SamplingParams(temperature, top_p, s.seed, s.ignore_eos,
                          top_k=max(0, pick("top_k", s.top_k, int, 0)),
                          min_p=pick("min_p", s.min_p, float, 0.0),
                          repetition_penalty=pick("repetition_penalty", s.repetition_penalty, float, 1.0))


@dataclass
class ModelSetup:
    """What a run needs to know about its model before any backend starts."""
    model_dir: Path | str
    model_name: str
    tokenizer: object
    context: int
    sampling: SamplingParams

    @classmethod
    def load(cls, cfg: RunConfig) -> "ModelSetup":
        from transformers import AutoConfig, AutoTokenizer

        model_dir, model_name = resolve_model(cfg.model.name, allow_hub=cfg.backend in ("sglang", "sglang-http", "vllm"))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # get_text_config: multimodal checkpoints (Gemma-3 4B+) keep it in their text config
        context = cfg.model.context or AutoConfig.from_pretrained(model_dir).get_text_config().max_position_embeddings
        return cls(model_dir, model_name, tokenizer, context, resolve_sampling(generation_config(model_dir), cfg.sampling))

    def backend(self, cfg: RunConfig):
        return make_backend(cfg, self.model_dir, self.tokenizer, self.sampling, self.context)


class Producer:
    """Everything before the backend, on a background thread (the Rust tokenizer releases the GIL)."""

    def __init__(self, reader: Reader, renderer: Renderer, prompts: list[str], done: dict[str, DoneSet],
                 writer, metrics: Metrics, stop: threading.Event, lookahead: int, buckets: bool, depth: int):
        self.reader, self.renderer, self.prompts, self.done = reader, renderer, prompts, done
        self.writer, self.metrics, self.stop = writer, metrics, stop
        self.lookahead, self.buckets = lookahead, buckets
        self.pending: dict[int, Pending] = {}
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.keys = itertools.count()
        self.thread = threading.Thread(target=self._run, name="engine-producer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            seen = SeenIds()
            window: list[Request] = []
            for batch in self.reader.batches():
                if self.stop.is_set():
                    return
                window.extend(self._requests(batch, seen))
                if len(window) >= self.lookahead:
                    if not self._put(length_buckets(window, self.buckets)):
                        return
                    window = []
            if window:
                self._put(length_buckets(window, self.buckets))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._put(exc)
        finally:
            self._put(_END)

    def _requests(self, batch, seen: SeenIds) -> list[Request]:
        rejected = list(batch.rejected)
        docs: list[Doc] = []
        hashes = []
        batch_hashes = [id_hash(d.id) for d in batch.docs]
        for d, h, first in zip(batch.docs, batch_hashes, seen.first_time(batch_hashes)):
            if first:
                docs.append(d)
                hashes.append(h)
            else:
                rejected.append(Rejection(d.source, d.id, "duplicate id: an earlier row has the same id"))
        n_prompts = len(self.prompts)
        if rejected:
            self.metrics.rejected += len(rejected)
            new = [r for r in rejected if not self.done[output.REJECTED].has(id_hash(r.source))]
            if new:
                self.writer.put(output.REJECTED, new)
            self.metrics.skipped(len(rejected) * n_prompts)
        if not docs:
            return []
        hashes = np.array(hashes, dtype=np.uint64)
        todo = {p: ~self.done[p].contains(hashes) for p in self.prompts}
        need = np.zeros(len(docs), dtype=bool)
        for mask in todo.values():
            need |= mask
        skipped = int(sum((~m).sum() for m in todo.values()))
        if skipped:
            self.metrics.skipped(skipped)
        idx = np.flatnonzero(need)
        if not len(idx):
            return []
        encoded = self.renderer.encode_documents([docs[i].text for i in idx])
        out = []
        for i, doc_ids in zip(idx, encoded):
            doc = docs[i]
            for p in self.prompts:
                if not todo[p][i]:
                    continue
                ids, truncated = self.renderer.request_ids(p, doc.text, doc_ids)
                key = next(self.keys)
                r = self.renderer.rendered[p]
                req = Request(key, p, ids, len(r.prefix_ids), r.max_new_tokens)
                self.pending[key] = Pending(doc, truncated, req)
                out.append(req)
        return out

    def __iter__(self) -> Iterator[Request]:
        while True:
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item


class RowBuilder:
    """Completions + their documents -> one Arrow record batch of output rows (on the writer thread)."""

    def __init__(self, prompt: str, model: str, tokenizer, schema: pa.Schema, renames: dict[str, str]):
        self.prompt, self.model, self.schema, self.renames = prompt, model, schema, renames
        self.fast = tokenizer.backend_tokenizer

    def __call__(self, items: list[tuple[Pending, Completion]]) -> pa.RecordBatch:
        to_decode = [c.output_ids for _, c in items if c.text is None and c.output_ids is not None]
        decoded = iter(self.fast.decode_batch(to_decode, skip_special_tokens=True)) if to_decode else iter(())
        gens = [c.text if c.text is not None else (next(decoded) if c.output_ids is not None else None)
                for _, c in items]
        n = len(items)
        cols = {
            "id": [p.doc.id for p, _ in items], "prompt": [self.prompt] * n, "model": [self.model] * n,
            "generation": gens, "finish_reason": [c.finish_reason for _, c in items],
            "prompt_tokens": [c.prompt_tokens for _, c in items],
            "completion_tokens": [c.completion_tokens for _, c in items],
            "cached_tokens": [c.cached_tokens for _, c in items], "truncated": [p.truncated for p, _ in items],
            "error": [c.error for _, c in items], "doc_ref": [p.doc.source for p, _ in items],
            "text": [p.doc.text for p, _ in items],
        }
        for src, dst in self.renames.items():
            cols[dst] = [p.doc.columns.get(src) for p, _ in items]
        return pa.RecordBatch.from_arrays([pa.array(cols[f.name], type=f.type) for f in self.schema],
                                          schema=self.schema)


def _rejected_batch(items: list[Rejection]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"doc_ref": [r.source for r in items], "id": [r.id for r in items],
                                       "reason": [r.reason for r in items]}, schema=output.REJECTED_SCHEMA)


class Run:
    """One shard of one run. `setup` and a started `backend` may be passed in to reuse them across
    runs (tools/bench warms a backend up, then measures with it); a passed backend is not closed."""

    def __init__(self, cfg: RunConfig, overwrite: bool = False, quiet: bool = False,
                 setup: ModelSetup | None = None, backend=None, retry_errors: bool = False):
        self.cfg, self.overwrite, self.quiet, self.retry_errors = cfg, overwrite, quiet, retry_errors
        self.setup, self.shared_backend = setup, backend
        self.stop = threading.Event()
        self.interrupted_by: str | None = None
        self.finishing = False  # generation is over: a signal no longer changes the outcome
        self.remote = None  # output.dir in a store (storage.RemoteOutput): its local staging directory is `out`
        self.syncer = None
        self.card = None

    def _output_location(self, prompts, tag: str) -> tuple[Path, object]:
        """The directory the run writes to, and the store it is mirrored to (None: a local output.dir)."""
        from .storage import RemoteOutput, default_staging, is_remote

        url = self.cfg.output.dir
        if not is_remote(url):
            return Path(url), None
        staging = Path(self.cfg.output.staging_dir or default_staging(url))
        remote = RemoteOutput(url, staging, self.cfg.output.store_give_up_seconds)
        streams = [p.name for p in prompts] + [output.REJECTED]
        if self.overwrite:
            log.info("--overwrite: deleting this run's results in %s", url)
            remote.clear([*output.ENGINE_DIRS, *streams, "summary.json", "README.md"])
            output.clear(staging)
        fetched = remote.pull(streams, tag)
        log.info("output %s: staging in %s (%d committed part(s) of this shard fetched from the store)",
                 url, staging, fetched)
        return staging, remote

    def _on_signal(self, signum, _frame) -> None:
        if self.interrupted_by is not None:  # a second signal: abort now (a crash, and crashes are recovered)
            raise KeyboardInterrupt
        self.interrupted_by = signal.Signals(signum).name
        if self.finishing:
            log.warning("%s received: the work is complete and saved; ending the diversity report first (seconds)",
                        self.interrupted_by)
            return
        log.warning("%s received: finishing writes, then exiting (the run is resumable)", self.interrupted_by)
        self.stop.set()

    def execute(self) -> tuple[int, dict]:
        cfg = self.cfg
        prompts = load_prompts(cfg.prompts)
        setup = self.setup or ModelSetup.load(cfg)
        model_name, tokenizer, context = setup.model_name, setup.tokenizer, setup.context
        log.info("model %s: tokenizer and config loaded (context %d)", model_name, context)
        renderer = Renderer(tokenizer, prompts, context, cfg.sampling.max_new_tokens, cfg.model.system_prompt,
                            reserve=context_reserve(cfg.backend))
        temperature, top_p = setup.sampling.temperature, setup.sampling.top_p

        reader = Reader(cfg.input.paths, cfg.input.text_column, cfg.input.id_column, cfg.input.batch_rows,
                        cfg.input.max_doc_chars, cfg.shard.index, cfg.shard.count)
        reader.preflight()
        log.info("input checked: %d file(s), %s rows for this shard", len(reader.files),
                 f"{reader.total_rows:,}" if reader.total_rows is not None else "?")
        # Made (not started) before the output directory is touched: a backend that refuses this
        # configuration (e.g. sampling.seed on vLLM's CPU engine) leaves no fingerprint behind.
        backend = self.shared_backend or setup.backend(cfg)

        tag = output.shard_tag(cfg.shard.index, cfg.shard.count)
        out, self.remote = self._output_location(prompts, tag)
        fingerprint = {
            "model": model_name, "backend_family": "instant" if cfg.backend == "instant" else "model",
            "prompts": {p.name: p.fingerprint for p in prompts},
            "sampling": {"temperature": temperature, "top_p": top_p, "seed": cfg.sampling.seed, **setup.sampling.extra(),
                         **({"ignore_eos": True} if cfg.sampling.ignore_eos else {}),
                         "max_new_tokens": {n: r.max_new_tokens for n, r in renderer.rendered.items()}},
            "context": context, "shard_count": cfg.shard.count, "system_prompt": cfg.model.system_prompt,
            "input": {"text_column": cfg.input.text_column, "id_column": cfg.input.id_column},
        }
        resumed = output.check_fingerprint(out, fingerprint, self.overwrite)
        if self.remote is not None:  # the first upload now: a missing bucket or bad credentials stop the run here
            self.remote.sync()
        schema = output.result_schema(reader.schema)
        renames = output.source_column_names(reader.schema)
        size = cfg.output.file_max_mb * 1024 * 1024
        sinks = {p.name: PartSink(out, p.name, out / p.name, tag, schema, "id", cfg.output.row_group_rows, size,
                                  cfg.output.compression_level, count_column="finish_reason") for p in prompts}
        sinks[output.REJECTED] = PartSink(out, output.REJECTED, out / output.REJECTED, tag, output.REJECTED_SCHEMA,
                                          "doc_ref", cfg.output.row_group_rows, size, cfg.output.compression_level)
        done: dict[str, DoneSet] = {}
        dropped = 0
        for name, sink in sinks.items():
            done[name], replay = sink.recover(drop_errors=self.retry_errors and name != output.REJECTED)
            dropped += sink.dropped
            sink.replay(replay)
        already = sum(len(done[p.name]) for p in prompts)
        if resumed:
            log.info("resuming in %s: %d results already stored for this shard", out, already)
        if dropped:
            log.info("--retry-errors: %d stored error rows removed; their documents are generated again", dropped)

        total_rows = reader.total_rows
        metrics = Metrics(total_requests=total_rows * len(prompts) if total_rows is not None else None)
        builders = {p.name: RowBuilder(p.name, model_name, tokenizer, schema, renames) for p in prompts}
        builders[output.REJECTED] = _rejected_batch

        def state(complete: bool = False) -> dict:
            per_prompt = {p.name: {"done": sinks[p.name].rows_total, "failed": sinks[p.name].counts.get("error", 0)}
                          for p in prompts}
            return {"shard": tag, "input_rows": total_rows, "prompts": per_prompt,
                    "rejected": sinks[output.REJECTED].rows_total, "complete": complete,
                    "output_tokens": metrics.completion_tokens, "elapsed_s": round(metrics.elapsed, 1),
                    "requests_per_s": round(metrics.requests_done / max(metrics.elapsed, 1e-9), 3),
                    "flush_seconds": cfg.output.flush_seconds,
                    "output_tokens_per_s": round(metrics.completion_tokens / max(metrics.elapsed, 1e-9), 1),
                    "model": model_name, "backend": cfg.backend, "pid_host": _host_pid()}

        card_at = [0.0]

        def on_flush() -> None:
            output.write_state(out, tag, state())
            if self.remote is None and time.monotonic() - card_at[0] > CARD_SECONDS:  # a store's is made at upload
                card_at[0] = time.monotonic()
                write_card(out)

        writer = AsyncWriter(sinks, builders, cfg.output.writer_queue, cfg.output.flush_seconds, on_flush=on_flush)
        if self.remote is not None:
            from .storage import Syncer
            every = cfg.output.sync_seconds or (60.0 if self.remote.hub else 10.0)
            self.card = StoreCard(out, cfg.output.dir)
            self.syncer = Syncer(self.remote, every, before_sync=self.card)
            self.syncer.start()
        producer = Producer(reader, renderer, [p.name for p in prompts], done, writer, metrics, self.stop,
                            cfg.scheduler.lookahead, cfg.scheduler.length_buckets, cfg.scheduler.prefetch_batches)

        on_main = threading.current_thread() is threading.main_thread()
        old_handlers = {s: signal.getsignal(s) for s in SIGNALS} if on_main else {}
        code, error = EXIT_OK, None
        # The hot path allocates millions of short-lived lists (token ids) and no reference cycles:
        # frequent generational collections cost ~10% of host throughput (tools/bench_host.py).
        gc_threshold = gc.get_threshold()
        gc.set_threshold(50_000, 20, 100)
        try:
            writer.start()
            if self.shared_backend is None:
                log.info("starting the %s backend", cfg.backend)
                t0 = time.perf_counter()
                backend.start()  # a signal here raises Interrupted (nothing is in flight yet)
                log.info("%s backend ready in %.1f s; generating", cfg.backend, time.perf_counter() - t0)
            if on_main:  # from here on a signal lets the run finish its writes (see _on_signal)
                for s in SIGNALS:
                    signal.signal(s, self._on_signal)
            producer.start()
            feed = RetryFeed(iter(producer), cfg.retry.max_attempts, cfg.retry.backoff_seconds, self.stop)
            while True:  # another pass serves retries of failures that came back after the input ended
                for completions in backend.generate(iter(feed), self.stop):
                    self._collect(completions, producer.pending, writer, metrics, feed)
                    if metrics.failed >= MIN_ERRORS_TO_STOP and \
                            metrics.failed > cfg.retry.max_error_fraction * metrics.requests_done:
                        raise TooManyErrors(f"{metrics.failed:,} of {metrics.requests_done:,} requests failed "
                                            f"(more than retry.max_error_fraction = {cfg.retry.max_error_fraction:g})"
                                            f"; last error: {metrics.last_error}")
                if self.stop.is_set() or not feed.pending:
                    break
            if self.stop.is_set():
                code = EXIT_INTERRUPTED
        except Interrupted as exc:  # while the backend started: nothing was in flight
            self.interrupted_by = exc.signame
            log.warning("%s received while the backend started: stopping (the run is resumable)", exc.signame)
            code = EXIT_INTERRUPTED
        except Exception as exc:  # the backend or the input failed mid-run: save what is done, then report
            code, error = _exit_code(exc, interrupted=self.interrupted_by is not None), exc
            if code == EXIT_INTERRUPTED:  # e.g. the engine died of the same Ctrl-C: an interruption, resumable
                log.info("after %s: %s", self.interrupted_by, exc)
                error = None
        finally:
            self.stop.set()  # ends the producer thread if it is still reading
            metrics.close()
            try:
                if self.shared_backend is None:
                    backend.close()
            finally:
                try:
                    writer.close()  # commits every part; raises if writing failed
                except WriterError as exc:  # lost data outranks any other error: report it
                    if not isinstance(error, WriterError):
                        code, error = EXIT_ERROR, exc
                finally:
                    gc.set_threshold(*gc_threshold)
        try:
            return self._finish(code, error, out, tag, state, prompts, sinks, metrics, reader, resumed, dropped,
                                model_name, total_rows)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)

    def _finish(self, code, error, out, tag, state, prompts, sinks, metrics, reader, resumed, dropped, model_name,
                total_rows) -> tuple[int, dict]:
        """State file, summary and report (a signal now only skips the report: the work is saved)."""
        cfg = self.cfg
        self.finishing = True
        stored = sum(sinks[p.name].rows_total for p in prompts)
        failed_rows = sum(sinks[p.name].counts.get("error", 0) for p in prompts)
        if code == EXIT_OK and failed_rows > cfg.retry.max_error_fraction * stored:
            code = EXIT_TOO_MANY_ERRORS
            error = TooManyErrors(f"{failed_rows:,} of {stored:,} stored rows are errors (more than "
                                  f"retry.max_error_fraction = {cfg.retry.max_error_fraction:g}); see their `error` "
                                  f"column, fix the cause, then regenerate them with: engine run CONFIG --retry-errors")
        complete = code == EXIT_OK
        output.write_state(out, tag, state(complete))
        summary = {"output_dir": str(out), "shard": tag, "model": model_name, "backend": cfg.backend,
                   "prompts": [p.name for p in prompts], "resumed": resumed, "complete": complete,
                   "input_rows": total_rows, "documents_stored": {p.name: sinks[p.name].rows_total for p in prompts},
                   **metrics.summary(), "input_warnings": reader.warnings,
                   # counts of the whole run (every process that worked on this shard), as `engine status` shows
                   "failed": failed_rows, "failed_this_process": metrics.failed, "error_rows_removed": dropped}
        name = "summary.json" if cfg.shard.count == 1 else f"summary-{tag}.json"
        (out / name).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        if complete and cfg.report.enabled and self.interrupted_by is not None:
            log.warning("%s received: the run is complete; the diversity report is skipped (make it with: "
                        "engine report %s)", self.interrupted_by, out)
        elif complete and cfg.report.enabled:
            from .report import write_report
            log.info("run complete; writing the diversity report")
            try:
                report = write_report(out, cfg.report.sample, cfg.sampling.seed or 0)
            except Exception:  # noqa: BLE001 - the results are complete; a failed analysis must not hide that
                log.exception("the diversity report failed; make it again with: engine report %s", out)
            else:
                summary["report"] = str(out / "report" / "report.md")
                summary["report_warnings"] = [f"{g['prompt']}/{g['model']}: {w}" for g in report["groups"]
                                              for w in g["warnings"]]
        if self.syncer is None:
            write_card(out)
        else:
            self.card(final=True)
            from .storage import StoreError
            try:
                self.syncer.close()  # the last upload: parts, state, summary, report, card
                log.info("uploaded to %s", cfg.output.dir)
            except StoreError as exc:  # everything is safe in the staging directory: the next run uploads it
                summary["complete"] = False
                if error is None:
                    code, error = EXIT_BACKEND_DEAD, exc
                log.error("uploading to %s failed: %s; the results are safe in %s and the next `engine run` of this "
                          "config uploads them (status 4, resumable)", cfg.output.dir, exc, out)
        if error is not None:
            raise RunFailed(code, summary, error) from error
        return code, summary

    @staticmethod
    def _collect(completions: list[Completion], pending: dict[int, Pending], writer, metrics: Metrics,
                 feed: RetryFeed) -> None:
        by_prompt: dict[str, list] = {}
        ptoks = ctoks = cached = failed = 0
        done = 0
        for c in completions:
            if c.finish_reason == "error" and feed.retry(pending[c.key].request):
                metrics.retries += 1
                continue
            feed.succeeded(c.key)
            done += 1
            p = pending.pop(c.key)
            by_prompt.setdefault(p.request.prompt, []).append((p, c))
            ptoks += c.prompt_tokens
            ctoks += c.completion_tokens
            cached += c.cached_tokens
            if c.finish_reason == "error":
                failed += 1
                metrics.last_error = c.error
            metrics.truncated += p.truncated
        for prompt, items in by_prompt.items():
            writer.put(prompt, items)
        metrics.completed(done, ptoks, ctoks, cached, failed)


class TooManyErrors(RuntimeError):
    """More requests failed than `retry.max_error_fraction` allows: the cause is rarely the documents."""


def _exit_code(exc: BaseException, interrupted: bool) -> int:
    from .backends.base import BackendDead
    from .config import ConfigError

    if isinstance(exc, (InputError, WriterError)):
        return EXIT_ERROR
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, TooManyErrors):
        return EXIT_TOO_MANY_ERRORS
    if interrupted and isinstance(exc, BackendDead):
        return EXIT_INTERRUPTED
    return EXIT_BACKEND_DEAD


class RunFailed(RuntimeError):
    def __init__(self, code: int, summary: dict, cause: BaseException):
        super().__init__(str(cause))
        self.code, self.summary, self.cause = code, summary, cause


def _host_pid() -> str:
    import os
    import socket
    return f"{socket.gethostname()}:{os.getpid()}"


def run(cfg: RunConfig, overwrite: bool = False) -> tuple[int, dict]:
    return Run(cfg, overwrite).execute()

