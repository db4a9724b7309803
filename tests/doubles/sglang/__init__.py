"""A double of `sglang` 0.5.23 for a machine without a GPU: `sglang.Engine` as our `sglang` backend meets
it (this file), and its HTTP server as our `http` backend meets it (`python -m sglang.launch_server`:
launch_server.py, the native /generate and OpenAI /v1/completions shapes).

Put `tests/doubles` first on `sys.path` (or PYTHONPATH for an `engine run` subprocess) and
`import sglang` finds this. Each behaviour below is the real one from the reviewed source
(../shared/reviews/sglang-0.5.23-first-contact.md, SG = site-packages/sglang), and each has a test in
tests/test_sglang_backends.py:

- Construction (`SG/srt/entrypoints/engine.py`): `log_level` defaults to "error" and
  `configure_logger` re-runs `logging.basicConfig(..., force=True)` at that level (:295, :1152;
  `SG/srt/utils/common.py:2631`): every root handler the caller had is replaced. Keyword arguments
  are ServerArgs fields (an unknown one is a TypeError) and ServerArgs is pickled to spawned
  children (`server_args.py:498`), so `custom_sigquit_handler` must be a module-level function.
  `schedule_conservativeness < 0` fails its validation assert (`validation_hook.py:314`).
- Children and SIGQUIT (engine.py:1968-1991, `utils/watchdog.py:181-222`): on the main thread a SIGQUIT
  handler is installed: `custom_sigquit_handler` when given, else the launch-phase one, which kills
  the whole process tree *including the caller* (SIGKILL). A "scheduler" child is spawned in the
  caller's process group with Python's default signal handling (Ctrl-C makes it exit 1); a watchdog
  thread checks it every second and sends SIGQUIT to the caller when it has exited non-zero. A
  scheduler that fails while loading sends SIGQUIT itself, then `Engine()` raises (engine.py:2013-2032).
- Requests (`async_generate`): `input_ids` with `skip_tokenizer_init=True`; sampling parameter names
  checked (unknown: TypeError); `max_new_tokens` capped at `context_length - 2 - input`
  (`scheduler.py:2709`, `tp_worker.py:568`), and an input + max_new_tokens over the context is a
  ValueError (`tokenizer_manager.py:1353`); the result is `{"output_ids", "meta_info"}` with no
  "text"; `output_ids` end with the matched stop token; cached_tokens is the longest prefix shared
  with an earlier request. Aborts: a dict `{"type": "abort"}` without a status code, a ValueError for
  400, an HTTPException otherwise (`tokenizer_manager.py:1891-1923`). A request never finishes once
  the scheduler is gone (no timeout for Engine requests, :1956).
- Custom logit processors (the repetition stop uses one): a request carrying `custom_logit_processor`
  is a ValueError unless the engine was built with `enable_custom_logit_processor`
  (`tokenizer_manager.py:1413`); the processor string is loaded as `CustomLogitProcessor.from_str` does
  (orjson, then dill of the hex `callable`, `sampling/custom_logit_processor.py`) and called on every
  step's logits with the row's `custom_params` plus `"__req__"` (the Req, whose `output_ids` it reads:
  `schedule_batch.py:1148`) before sampling (`layers/sampler.py:143`); a stop token it makes the sampled
  one ends the request as a stop (`{"type": "stop", "matched": id}`, the stop id last in `output_ids`).
- `shutdown()` stops the watchdog and kills the children, not the caller.

Knobs for tests (environment, so an `engine run` subprocess sees them too): SGLANG_DOUBLE_DELAY_S
(seconds per request), SGLANG_DOUBLE_PIDFILE (the scheduler child's pid is written there),
SGLANG_DOUBLE_MAX_RUNNING (requests served at once; default max_running_requests, else all),
SGLANG_DOUBLE_FAIL_LOAD=1, SGLANG_DOUBLE_ABORT_EVERY=N with SGLANG_DOUBLE_ABORT_STATUS (none | 400 | 503),
SGLANG_DOUBLE_LOOP_AFTER=N (the "model" loops on a 3-token unit after N tokens, where it would run to its limit).
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

__version__ = "0.5.23"
logger = logging.getLogger("sglang.srt.entrypoints.engine")
instances: list[Engine] = []

_NAMES = Path(__file__).resolve().parents[3] / "engine" / "config"
SERVER_ARGS = set(_NAMES.joinpath("sglang_server_args.txt").read_text().split())
SAMPLING_PARAMS = set(_NAMES.joinpath("sglang_sampling_params.txt").read_text().split())

_CHILD = """
import os, signal, sys, time
if os.environ.get("SGLANG_DOUBLE_FAIL_LOAD"):
    print("scheduler: CUDA out of memory while loading the weights", file=sys.stderr, flush=True)
    os.kill(os.getppid(), signal.SIGQUIT)  # as the scheduler's exception handler does
    sys.exit(1)
while True:
    time.sleep(3600)
"""


def _pdeathsig():  # the real children die with the thread that created them
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class HTTPException(Exception):  # fastapi.HTTPException's shape
    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code, self.detail = status_code, detail


def _kill_process_tree(include_parent: bool) -> None:
    for engine in instances:
        for child in engine.children:
            if child.poll() is None:
                child.kill()
    if include_parent:
        os.kill(os.getpid(), signal.SIGKILL)  # psutil's itself.kill()


class Engine:
    def __init__(self, **kwargs):
        kwargs.setdefault("log_level", "error")
        unknown = set(kwargs) - SERVER_ARGS
        if unknown:
            raise TypeError(f"Unexpected keyword argument(s) for ServerArgs: {sorted(unknown)}")
        pickle.dumps(kwargs)  # ServerArgs goes to spawned children: a lambda or closure fails here
        self.kwargs = kwargs
        self.context_length = int(kwargs.get("context_length") or 8192)
        self.requests: list[dict] = []
        self.seen: list[list[int]] = []
        self.calls = self.concurrent = self.max_concurrent = 0
        self.shut = False
        self.children: list[subprocess.Popen] = []
        self.stop_watch = threading.Event()
        running = int(os.environ.get("SGLANG_DOUBLE_MAX_RUNNING") or kwargs.get("max_running_requests") or 0)
        self.running = asyncio.Semaphore(running) if running else None  # max_running_requests: the rest wait
        instances.append(self)
        logging.basicConfig(level=getattr(logging, kwargs["log_level"].upper()), format="[%(asctime)s] %(message)s",
                            datefmt="%Y-%m-%d %H:%M:%S", force=True)
        if threading.current_thread() is threading.main_thread():
            handler = kwargs.get("custom_sigquit_handler")
            if handler is None:
                def handler(signum, frame):  # launch_phase_sigquit_handler
                    logger.error("Received sigquit from a child process. It usually means the child failed.")
                    _kill_process_tree(include_parent=True)
            else:
                logger.error("Using custom SIGQUIT handler: %s", handler)
            signal.signal(signal.SIGQUIT, handler)
        assert float(kwargs.get("schedule_conservativeness", 1.0)) >= 0, \
            "schedule_conservativeness must be non-negative"
        # named as SGLang's process title names it (setproctitle "sglang::scheduler")
        child = subprocess.Popen([sys.executable, "-c", _CHILD, "sglang::scheduler_TP0"], preexec_fn=_pdeathsig)
        self.children.append(child)
        if os.environ.get("SGLANG_DOUBLE_PIDFILE"):
            Path(os.environ["SGLANG_DOUBLE_PIDFILE"]).write_text(str(child.pid))
        if os.environ.get("SGLANG_DOUBLE_FAIL_LOAD"):
            child.wait()
            raise RuntimeError(f"Rank 0 scheduler died during initialization (exit code: {child.returncode}). "
                               "If exit code is -9 (SIGKILL), a common cause is the OS OOM killer.")
        self.watchdog = threading.Thread(target=self._watch, name="subprocess-watchdog", daemon=True)
        self.watchdog.start()

    def _watch(self) -> None:
        while not self.stop_watch.wait(1.0):
            for child in self.children:
                if child.poll() not in (None, 0):
                    logger.error("Subprocess scheduler_0 (pid=%d) crashed with exit code %s. Triggering SIGQUIT "
                                 "for cleanup...", child.pid, child.returncode)
                    os.kill(os.getpid(), signal.SIGQUIT)
                    return

    def _alive(self) -> bool:
        return all(c.poll() is None for c in self.children)

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, image_data=None,
                             return_logprob=False, rid=None, stream=False, custom_logit_processor=None, **_):
        assert prompt is None and input_ids and self.kwargs["skip_tokenizer_init"] is True
        sp = dict(sampling_params or {})
        unknown = set(sp) - SAMPLING_PARAMS
        if unknown:
            raise TypeError(f"Unexpected keyword argument(s) for SamplingParams: {sorted(unknown)}")
        if custom_logit_processor and not self.kwargs.get("enable_custom_logit_processor"):
            raise ValueError("The server is not configured to enable custom logit processor. "
                             "Please set `--enable-custom-logit-processor` to enable this feature.")
        self.requests.append(sp)
        self.calls += 1
        call = self.calls
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if len(input_ids) >= self.context_length:
                raise ValueError(f"The input ({len(input_ids)} tokens) is longer than the model's context length "
                                 f"({self.context_length} tokens).")
            asked = sp.get("max_new_tokens", 128)
            if asked + len(input_ids) > self.context_length:
                raise ValueError("Requested token count exceeds the model's maximum context length")
            if self.running is not None:
                async with self.running:
                    await asyncio.sleep(float(os.environ.get("SGLANG_DOUBLE_DELAY_S", "0.001")))
            else:
                await asyncio.sleep(float(os.environ.get("SGLANG_DOUBLE_DELAY_S", "0.001")))
            if not self._alive():
                await asyncio.Event().wait()  # the scheduler is gone: an Engine request waits for ever
        finally:
            self.concurrent -= 1
        abort_every = int(os.environ.get("SGLANG_DOUBLE_ABORT_EVERY", "0"))
        if abort_every and call % abort_every == 0:
            status = os.environ.get("SGLANG_DOUBLE_ABORT_STATUS", "none")
            if status == "400":
                raise ValueError("aborted: the request was retracted")
            if status != "none":
                raise HTTPException(int(status), "aborted: the server is overloaded")
            return {"output_ids": [], "meta_info": {"id": rid or str(call), "prompt_tokens": len(input_ids),
                                                    "completion_tokens": 0,
                                                    "finish_reason": {"type": "abort", "message": "retracted"}}}
        cached = max((_lcp(input_ids, s) for s in self.seen[-64:]), default=0)
        self.seen.append(input_ids)
        n = max(0, min(asked, (self.context_length - 1) - len(input_ids) - 1))
        stops_early = call % 2 and not sp.get("ignore_eos") and n > 1
        loop_after = int(os.environ.get("SGLANG_DOUBLE_LOOP_AFTER", "-1"))  # the "model" loops: 3 tokens for ever
        if loop_after >= 0 and not stops_early:
            out = (input_ids[::-1] * n)[:loop_after] + [5, 6, 7] * n
            out, reason = out[:n], {"type": "length", "length": n}
        elif stops_early:
            stop = (sp.get("stop_token_ids") or [2])[0]
            out = (input_ids[::-1] * n)[: n - 2] + [stop]
            reason = {"type": "stop", "matched": stop}
        else:
            out = (input_ids[::-1] * (n // len(input_ids) + 1))[:n]
            reason = {"type": "length", "length": n}
        if custom_logit_processor and isinstance(sp.get("custom_params"), dict):
            out, reason = _with_processor(custom_logit_processor, sp, out, reason)
        return {"output_ids": out, "meta_info": {
            "id": rid or str(call), "finish_reason": reason, "prompt_tokens": len(input_ids),
            "completion_tokens": len(out), "cached_tokens": cached, "e2e_latency": 0.01}}

    def _sync_api(self, name):
        raise AssertionError(f"Engine.{name} (synchronous) called after construction: it binds SGLang's handle "
                             "loop to Engine.loop and every later async_generate hangs (review finding 2)")

    def generate(self, *a, **k):
        self._sync_api("generate")

    def flush_cache(self, *a, **k):
        self._sync_api("flush_cache")

    def get_server_info(self, *a, **k):
        self._sync_api("get_server_info")

    def shutdown(self):
        self.stop_watch.set()
        for c in self.children:
            if c.poll() is None:
                c.kill()
            c.wait(timeout=60)
        self.shut = True


class _Req:  # the part of schedule_batch.Req a custom logit processor reads (through "__req__")
    def __init__(self, input_ids):
        self.origin_input_ids, self.output_ids = list(input_ids), []


def _with_processor(serialized: str, sp: dict, out: list[int], reason: dict):
    """Decode `out` token by token through a custom logit processor, as SGLang 0.5.23 does: the processor
    is loaded with CustomLogitProcessor.from_str (orjson + dill of the hex string, custom_logit_processor.py),
    called on each step's logits with the row's custom_params plus "__req__" (schedule_batch.py:1148) before
    sampling (sampler.py:143); a sampled stop token ends the request (finish_reason stop, matched)."""
    import dill
    import orjson
    import torch

    processor = dill.loads(bytes.fromhex(orjson.loads(serialized)["callable"]))()
    req = _Req([])
    params = dict(sp["custom_params"], __req__=req)
    stops = set(sp.get("stop_token_ids") or [])
    vocab = max([*out, *stops, 0]) + 8
    for j, tok in enumerate(out):
        req.output_ids = out[:j]
        logits = torch.full((1, vocab), -10.0)
        logits[0, tok] = 10.0  # greedy: the "model's" token, unless the processor says otherwise
        chosen = int(processor(logits, [params]).argmax(dim=-1)[0])
        if chosen != tok:  # the processor changed this step's token
            if chosen in stops and not sp.get("ignore_eos"):
                return out[:j] + [chosen], {"type": "stop", "matched": chosen}
            out = out[:j] + [chosen] + out[j + 1:]
    return out, reason


def _lcp(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
