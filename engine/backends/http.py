"""`http`: running SGLang servers (or a router), or any OpenAI-compatible completions server
(vLLM's `vllm serve`, SGLang's OpenAI routes, ...). `sglang-http`, its old name, is an alias.

- `http.api = "native"`: SGLang's `/generate` with `input_ids` (the renderer's tokens) and
  `sampling_params`; the response's `output_ids`/`text` and `meta_info` (prompt, completion and cached
  tokens, finish reason, latency) are used as in the in-process backend.
- `http.api = "openai"`: `/v1/completions` with the token ids as the prompt; `usage` gives the token
  counts (`prompt_tokens_details.cached_tokens` where the server reports it: `vllm serve` needs
  `--enable-prompt-tokens-details`, SGLang `--enable-cache-report`).

Before the first batch every URL is probed (`probe`): reachable, the API shape answers (a one-token
request), and for the OpenAI API the model name is one the server serves (`http.model` empty: the
server's own, asked from `/v1/models`). A wrong API, model or credential is a configuration error at
start (status 2), naming what to set.

During the run failures are classified:
- the request's own (HTTP 400/413/422 and other 4xx, a generation error, an `abort`): a failed
  completion, retried through the retry feed (schedule/retry.py) and then recorded as an error row;
- the backend's (connection refused, timeouts, 408/429/5xx): retried with exponential backoff
  (`http.backoff_s`, doubling, at most 30 s apart) for as long as the servers keep failing; once no
  request has succeeded for `http.dead_after` seconds the backend is dead and the run stops with
  status 4, resumable. A request that keeps failing while other requests succeed is the request's
  own failure after `http.retries` more tries;
- the configuration's (401/403/404/405 mid-run: a server swapped or a route gone): the run stops at
  once with status 4, naming the answer. None of these is ever stored as a row.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time

from engine.backends.async_window import AsyncWindowBackend
from engine.backends.repetition import cut_loop, repetition_params, repetition_processor, sglang_repetition_stop
from engine.backends.sglang_format import completion_from, sampling_params
from engine.config.run_config import HTTPConfig, RunConfig
from engine.errors import BackendDead, ProbeError
from engine.model.setup import ModelSetup
from engine.types import Completion, Request, SamplingParams

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}  # the backend's trouble: retried, then "dead"
FATAL_STATUS = {401: "unauthorised", 403: "forbidden", 404: "not found", 405: "method not allowed"}
MAX_BACKOFF_S = 30.0


class HTTPBackend(AsyncWindowBackend):
    name = "http"

    def __init__(self, http: HTTPConfig, sampling: SamplingParams, max_in_flight: int,
                 eos_ids: list[int] | set[int] | None = None):
        super().__init__(max_in_flight)
        if http.api not in ("native", "openai"):
            raise ValueError(f"http.api must be 'native' or 'openai', not {http.api!r}")
        if not http.urls:
            raise ValueError("backend 'http' needs http.urls (one or more server or router URLs)")
        self.urls, self.api, self.sampling = [u.rstrip("/") for u in http.urls], http.api, sampling
        self.timeout_s, self.retries, self.backoff_s = http.timeout_s, http.retries, http.backoff_s
        self.dead_after, self.model = http.dead_after, http.model  # model: filled in by the probe when empty
        # One pooled connection per request in flight, so the window never queues on the pool.
        self.connections = http.connections or max_in_flight
        self.next_url = itertools.cycle(self.urls)
        self.failing_since: float | None = None  # first backend failure since the last success
        self.last_success = 0.0
        self.client = None
        # The repetition stop. native: SGLang's custom logit processor (the server needs
        # --enable-custom-logit-processor; the probe says so); openai: vLLM's `repetition_detection`
        # request field (`vllm serve`; SGLang's OpenAI routes ignore it).
        self.eos_ids = sorted(eos_ids or [])
        self.processor = (repetition_processor() if self.api == "native"
                          and sglang_repetition_stop(sampling, self.eos_ids) else None)

    @classmethod
    def from_config(cls, cfg: RunConfig, setup: ModelSetup) -> HTTPBackend:
        return cls(cfg.http, setup.sampling, cfg.scheduler.max_in_flight, eos_ids=setup.eos_ids())

    async def astart(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.connections, max_keepalive_connections=self.connections)
        # The pool wait has no limit of its own: a request queued behind the window is not a slow server.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s),
                                                              pool=None), limits=limits)
        try:
            await self.probe()
        except BaseException:
            await self.client.aclose()
            raise

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def probe(self) -> None:
        """Every URL reachable, speaking the configured API, serving the configured model."""
        import httpx

        for url in self.urls:
            try:
                if self.api == "openai":  # the native API names no model
                    served = await self._served_models(url)
                    if not self.model:
                        if len(served) != 1:
                            raise ProbeError(f"{url} serves {len(served)} models ({', '.join(served) or 'none'}): "
                                             f"set http.model to one of them")
                        self.model = served[0]
                        log.info("http.model: %s (the model %s serves)", self.model, url)
                    elif served and self.model not in served:
                        raise ProbeError(f"{url} does not serve http.model = {self.model!r}; it serves "
                                         f"{', '.join(served)} (leave http.model empty to use the server's own)")
                path, payload = self._payload(Request(-1, "probe", [0], 0, 1), probe=True)
                resp = await self.client.post(url + path, json=payload)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                raise BackendDead(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc
            if resp.status_code in (404, 405):
                other = "openai" if self.api == "native" else "native"
                raise ProbeError(f"{url}{path}: HTTP {resp.status_code}: this server does not speak http.api = "
                                 f"{self.api!r} (try http.api = {other!r}): {resp.text[:200]}")
            if resp.status_code == 400 and self.processor and "custom logit processor" in resp.text:
                raise ProbeError(f"{url}{path}: the server does not allow custom logit processors, which the "
                                 f"repetition stop uses: start it with --enable-custom-logit-processor, or set "
                                 f"repetition.enabled = false: {resp.text[:200]}")
            if resp.status_code in (401, 403):
                raise ProbeError(f"{url}{path}: HTTP {resp.status_code} ({FATAL_STATUS[resp.status_code]}): "
                                 f"the server wants credentials: {resp.text[:200]}")
            if resp.status_code != 200:
                raise BackendDead(f"{url}{path}: the probe request failed: HTTP {resp.status_code}: "
                                  f"{resp.text[:300]}")

    async def _served_models(self, url: str) -> list[str]:
        """The model names an OpenAI-compatible server answers to (`/v1/models`; none when it has no such route)."""
        resp = await self.client.get(url + "/v1/models")
        if resp.status_code != 200:
            return []
        return [m["id"] for m in resp.json().get("data", []) if "id" in m]

    def _payload(self, req: Request, probe: bool = False) -> tuple[str, dict]:
        params = sampling_params(req, self.sampling)
        if probe:
            params.pop("sampling_seed", None)  # the probe never risks a server that dies on seeds
        rs = self.sampling.repetition_stop
        if self.api == "native":
            if self.processor:
                params["custom_params"] = repetition_params(rs, self.eos_ids)
            return "/generate", {"input_ids": req.input_ids, "sampling_params": params,
                                 **({"custom_logit_processor": self.processor} if self.processor else {})}
        return "/v1/completions", {"model": self.model, "prompt": req.input_ids, "max_tokens": req.max_new_tokens,
                                   "temperature": params["temperature"], "top_p": params["top_p"],
                                   **self.sampling.extra(),
                                   **({"seed": params["sampling_seed"]} if "sampling_seed" in params else {}),
                                   **({"ignore_eos": True} if self.sampling.ignore_eos else {}),
                                   **({"repetition_detection": {"max_pattern_size": rs.max_pattern,
                                                                "min_pattern_size": rs.min_pattern,
                                                                "min_count": rs.min_count},
                                       "return_token_ids": True} if rs is not None else {})}

    def _parse(self, req: Request, data: dict) -> Completion:
        if self.api == "native":
            return completion_from(req, data, self.sampling.repetition_stop if self.processor else None)
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        reason = choice.get("finish_reason")
        finish = {None: "stop", "stop": "stop", "length": "length", "repetition": "repetition"}.get(reason)
        if finish is None:  # SGLang's "abort" (a retracted request), vLLM's "abort" / "error": retried, not a success
            what = "aborted by the server" if reason == "abort" else f"the server finished it with {reason!r}"
            return Completion(req.key, "error", prompt_tokens=len(req.input_ids),
                              error=f"{what}: {choice.get('text', '')[:200]}")
        ids = choice.get("token_ids") if finish == "repetition" else None  # vLLM's, with return_token_ids
        kept = cut_loop(list(ids), self.sampling.repetition_stop) if ids else None
        return Completion(req.key, finish, text=None if kept is not None else choice.get("text", ""), output_ids=kept,
                          prompt_tokens=int(usage.get("prompt_tokens", len(req.input_ids))),
                          completion_tokens=int(usage.get("completion_tokens", 0)), cached_tokens=int(cached))

    async def agenerate(self, req: Request) -> Completion:
        import httpx

        path, payload = self._payload(req)
        first_failure, tries = None, 0
        while True:
            url = next(self.next_url) + path
            try:
                resp = await self.client.post(url, json=payload)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                last = f"{url}: {type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    self.failing_since, self.last_success = None, time.monotonic()
                    return self._parse(req, resp.json())
                if resp.status_code in FATAL_STATUS:
                    raise BackendDead(f"{url}: HTTP {resp.status_code} ({FATAL_STATUS[resp.status_code]}) in mid-run: "
                                      f"the server no longer takes this configuration: {resp.text[:200]}")
                if resp.status_code not in RETRYABLE_STATUS:  # this request's own failure (400, 413, 422, ...)
                    return Completion(req.key, "error", prompt_tokens=len(req.input_ids),
                                      error=f"{url}: HTTP {resp.status_code}: {resp.text[:300]}")
                last = f"{url}: HTTP {resp.status_code}: {resp.text[:200]}"
            now = time.monotonic()
            first_failure = first_failure or now
            self.failing_since = self.failing_since or now
            tries += 1
            if now - self.failing_since >= self.dead_after:
                raise BackendDead(f"no server answered for {now - self.failing_since:.0f} s (http.dead_after = "
                                  f"{self.dead_after:g}); last: {last}")
            if tries > self.retries and self.last_success > first_failure:  # others succeed: it is this request
                return Completion(req.key, "error", prompt_tokens=len(req.input_ids),
                                  error=f"failed after {tries} tries while the server answered others: {last}")
            await asyncio.sleep(min(self.backoff_s * 2 ** (tries - 1), MAX_BACKOFF_S))


BACKEND = HTTPBackend  # what make_backend builds from this module (engine/config/backends.py names it)
