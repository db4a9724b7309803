"""`sglang`: an in-process `sglang.Engine` (the production path on GPUs).

The renderer's token ids go in (`skip_tokenizer_init=True`: SGLang's tokenizer is never run, output
ids come back and the writer thread decodes them), one `async_generate` per request under the
in-flight window. `meta_info` gives prompt, completion and cached tokens (the prefix-cache hit rate
is cached / prompt tokens), the finish reason and the latency.

Written against sglang 0.5.23 (the `[sglang]` extra pins it); tests check every server argument and
sampling parameter name against that release's source, and run the backend against a double of
`sglang.Engine` (tests/doubles/sglang) that reproduces what the real one does to its caller
(../shared/reviews/sglang-0.5.23-first-contact.md):

- it re-configures the root logger at its `log_level` (`force=True`): we pass "warning" and put our
  logging back right after it starts;
- a child that fails makes SGLang SIGQUIT its caller, whose default handler SIGKILLs the whole
  process tree, us included (no state file, no resumable status): we install our own
  `custom_sigquit_handler` (module-level: ServerArgs is pickled to the children), which only notes
  the death; `generate` then raises BackendDead (status 4), or the run exits 3 when it was already
  stopping (Ctrl-C reaches SGLang's children too, and they die of it);
- an Engine request never times out, so a dead engine is noticed through that note, not by waiting;
- it caps `max_new_tokens` at `context - 2 - input` (the `context_reserve` trait in config/backends.py:
  the renderer keeps 2 tokens free); with `skip_tokenizer_init` it stops only on the config files' EOS,
  so we send the same stop ids the torch backend uses;
- only the async API is used, from the one loop thread: a synchronous call (`generate`,
  `flush_cache`, ...) binds SGLang's handle loop to `Engine.loop` and later requests hang;
- the repetition stop (`[repetition]`): 0.5.23 has no detector; our custom logit processor
  (repetition.repetition_processor, with `enable_custom_logit_processor` set) forces the stop token once
  the output ends in a loop, and sglang_format.completion_from relabels that stop "repetition" from the ids.

`Engine.shutdown()` kills every child process of the caller: the engine's helpers are threads, and
nothing else is spawned.
"""
from __future__ import annotations

import logging
import threading

from engine.backends.async_window import AsyncWindowBackend
from engine.backends.repetition import repetition_processor, sglang_repetition_stop
from engine.backends.sglang_format import completion_from, sampling_params
from engine.config.run_config import RunConfig
from engine.errors import BackendDead
from engine.model.setup import ModelSetup
from engine.model.size import default_parallelism
from engine.types import Completion, Request, SamplingParams

log = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.23"
_CHILD_DIED = threading.Event()


def on_child_died(signum, frame) -> None:
    """SGLang's SIGQUIT: one of its processes failed (its watchdog, or the process itself, signals us).
    Module-level, because SGLang pickles its ServerArgs (this handler included) to its children."""
    _CHILD_DIED.set()


class SGLangEngineBackend(AsyncWindowBackend):
    name = "sglang"

    def __init__(self, model_path: str, server_args: dict, sampling: SamplingParams, max_in_flight: int,
                 engine_factory=None, stop_ids: list[int] | None = None):
        super().__init__(max_in_flight)
        self.model_path, self.server_args, self.sampling = model_path, dict(server_args), sampling
        self.stop_ids = sorted(stop_ids or [])  # EOS of generation_config.json and the tokenizer (see module doc)
        self.engine_factory = engine_factory
        self.engine = None
        # The repetition stop: a custom logit processor that forces the stop token once the output ends
        # in a loop (0.5.23 has no detector of its own; the server must allow custom processors).
        self.processor = repetition_processor() if sglang_repetition_stop(sampling, self.stop_ids) else None

    @classmethod
    def from_config(cls, cfg: RunConfig, setup: ModelSetup) -> SGLangEngineBackend:
        """`[sglang.server_args]`, with one replica per GPU by default (default_parallelism), the ones SGLang
        would ignore flagged or fixed (guard_server_args), and the context from the model setup."""
        args = guard_server_args(default_parallelism(dict(cfg.sglang.server_args), setup.model_dir),
                                 cfg.scheduler.max_in_flight)
        args.setdefault("context_length", setup.context)
        return cls(str(setup.model_dir), args, setup.sampling, cfg.scheduler.max_in_flight,
                   stop_ids=list(setup.eos_ids()))

    def engine_kwargs(self) -> dict:
        return {"model_path": self.model_path, "skip_tokenizer_init": True, "log_level": "warning",
                "custom_sigquit_handler": on_child_died,
                **({"enable_custom_logit_processor": True} if self.processor else {}), **self.server_args}

    def start(self) -> None:
        # Built on the main thread (the run's): there SGLang installs our SIGQUIT handler, and the
        # children it spawns die with the thread that made them (PR_SET_PDEATHSIG), so not a helper thread.
        # Requests are then served from the loop thread only.
        from engine.errors import ConfigError

        factory = self.engine_factory
        if factory is None:
            try:
                import sglang
            except ImportError as exc:
                raise BackendDead(f"backend 'sglang' needs sglang {SGLANG_VERSION}: pip install -e '.[sglang]' "
                                  f"on a GPU machine ({exc})") from exc
            factory = sglang.Engine
        kwargs = self.engine_kwargs()
        log.info("starting sglang.Engine(%s)",
                 ", ".join(f"{k}={getattr(v, '__name__', v)!r}" for k, v in kwargs.items()))
        _CHILD_DIED.clear()
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        try:
            self.engine = factory(**kwargs)
        except Exception as exc:
            if _CHILD_DIED.is_set():  # a scheduler failed while loading (out of memory, a broken GPU...)
                raise BackendDead(f"an SGLang process died while the engine started: {exc}") from exc
            # Raised by Engine() itself: its argument checks (asserts, ValueErrors): requeueing cannot help.
            raise ConfigError(f"SGLang refused to start with this configuration: {type(exc).__name__}: {exc}") \
                from exc
        finally:
            # SGLang re-ran logging.basicConfig(force=True) at its log_level: ours back, SGLang's own at its level.
            for h in list(root.handlers):
                root.removeHandler(h)
            for h in handlers:
                root.addHandler(h)
            root.setLevel(level)
            logging.getLogger("sglang").setLevel(str(kwargs.get("log_level", "warning")).upper())
        super().start()

    def dead(self) -> str | None:
        if _CHILD_DIED.is_set():
            return ("an SGLang process died (SGLang signalled SIGQUIT; its error is in the log above); "
                    "the requests in flight are redone on resume")
        return None

    async def agenerate(self, req: Request) -> Completion:
        out = await self.engine.async_generate(input_ids=req.input_ids,
                                               sampling_params=sampling_params(req, self.sampling, self.stop_ids),
                                               **({"custom_logit_processor": self.processor} if self.processor else {}))
        return completion_from(req, out, self.sampling.repetition_stop)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.engine is not None:
                engine, self.engine = self.engine, None
                try:
                    engine.shutdown()
                except Exception as exc:  # noqa: BLE001 - e.g. a child not reaped in 60 s: the work is saved
                    log.error("sglang.Engine.shutdown() failed (%s: %s); leftover processes are killed at exit",
                              type(exc).__name__, exc)


BACKEND = SGLangEngineBackend  # what make_backend builds from this module (engine/config/backends.py names it)


LPM_MAX_WAITING = 128  # SGLang's WAITING_QUEUE_PREFIX_MATCH_MAX (schedule_policy.py:137)


def guard_server_args(args: dict, max_in_flight: int) -> dict:
    """Server arguments that SGLang 0.5.23 would take silently but not act on as written."""
    policy = str(args.get("schedule_policy", "fcfs"))
    running = int(args.get("max_running_requests") or 0)
    if policy in ("lpm", "dfs-weight") and running and max_in_flight - running > LPM_MAX_WAITING:
        log.warning("sglang.server_args.schedule_policy = %r has no effect here: SGLang switches to FCFS when more "
                    "than %d requests wait, and scheduler.max_in_flight %d - max_running_requests %d leaves ~%d "
                    "waiting (the radix cache still reuses the shared template prefix)", policy, LPM_MAX_WAITING,
                    max_in_flight, running, max_in_flight - running)
    drafts = args.get("speculative_num_draft_tokens")
    if str(args.get("speculative_algorithm", "")).upper() == "NGRAM" and drafts is not None \
            and "speculative_ngram_max_bfs_breadth" not in args and int(drafts) < 10:
        # SGLang sets speculative_num_steps = draft tokens // breadth (default 10): 0 below 10 drafts,
        # a path SGLang itself never takes by default; a breadth of the draft count keeps it at 1.
        args = {**args, "speculative_ngram_max_bfs_breadth": int(drafts)}
    return args
