"""`sglang-http`: running SGLang servers (or a router), or any OpenAI-compatible completions server.

- `http.api = "native"`: SGLang's `/generate` with `input_ids` (the renderer's tokens) and
  `sampling_params`; the response's `output_ids`/`text` and `meta_info` (prompt, completion and cached
  tokens, finish reason, latency) are used as in the in-process backend.
- `http.api = "openai"`: `/v1/completions` with the token ids as the prompt; `usage` gives the token
  counts (`prompt_tokens_details.cached_tokens` where the server reports it).
Several `http.urls` are used round-robin (or give one router URL). Connections are pooled; every
request has a timeout and is retried with exponential backoff on connection errors, timeouts, 429
and 5xx; other HTTP errors are failures of that request (retried by the runner, then recorded).
When every try of `http.dead_after` consecutive requests fails to reach a server, the backend is
declared dead: the run stops with status 4, resumable, instead of marking the rest failed.
"""
from __future__ import annotations

import asyncio
import itertools
import logging

from .async_window import AsyncWindowBackend
from .base import BackendDead, Completion, Request, SamplingParams
from .sglang_engine import completion_from, sampling_params

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class _Transient(Exception):
    pass


class SGLangHTTPBackend(AsyncWindowBackend):
    name = "sglang-http"

    def __init__(self, urls: list[str], api: str, sampling: SamplingParams, max_in_flight: int,
                 timeout_s: float = 600.0, retries: int = 3, backoff_s: float = 1.0, dead_after: int = 16,
                 model: str = "default", connections: int = 256):
        super().__init__(max_in_flight)
        if api not in ("native", "openai"):
            raise ValueError(f"http.api must be 'native' or 'openai', not {api!r}")
        if not urls:
            raise ValueError("backend 'sglang-http' needs http.urls (one or more server or router URLs)")
        self.urls, self.api, self.sampling = [u.rstrip("/") for u in urls], api, sampling
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.dead_after, self.model, self.connections = dead_after, model, connections
        self.next_url = itertools.cycle(self.urls)
        self.unreachable = 0  # consecutive requests that could not reach any server
        self.client = None

    async def astart(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.connections, max_keepalive_connections=self.connections)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)),
                                        limits=limits)

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def _payload(self, req: Request) -> tuple[str, dict]:
        params = sampling_params(req, self.sampling)
        if self.api == "native":
            return "/generate", {"input_ids": req.input_ids, "sampling_params": params}
        return "/v1/completions", {"model": self.model, "prompt": req.input_ids, "max_tokens": req.max_new_tokens,
                                   "temperature": params["temperature"], "top_p": params["top_p"],
                                   "seed": params["sampling_seed"],
                                   **({"ignore_eos": True} if self.sampling.ignore_eos else {})}

    def _parse(self, req: Request, data: dict) -> Completion:
        if self.api == "native":
            return completion_from(req, data)
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        reason = choice.get("finish_reason")
        return Completion(req.key, "length" if reason == "length" else "stop", text=choice.get("text", ""),
                          prompt_tokens=int(usage.get("prompt_tokens", len(req.input_ids))),
                          completion_tokens=int(usage.get("completion_tokens", 0)), cached_tokens=int(cached))

    async def agenerate(self, req: Request) -> Completion:
        import httpx

        path, payload = self._payload(req)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            url = next(self.next_url) + path
            try:
                resp = await self.client.post(url, json=payload)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                last = f"{url}: {type(exc).__name__}: {exc}"
                continue
            if resp.status_code in RETRYABLE_STATUS:
                last = f"{url}: HTTP {resp.status_code}: {resp.text[:200]}"
                self.unreachable = 0
                continue
            self.unreachable = 0
            if resp.status_code != 200:
                return Completion(req.key, "error", prompt_tokens=len(req.input_ids),
                                  error=f"{url}: HTTP {resp.status_code}: {resp.text[:300]}")
            return self._parse(req, resp.json())
        if "HTTP" not in last:
            self.unreachable += 1
            if self.unreachable >= self.dead_after:
                raise BackendDead(f"no server reachable for {self.unreachable} requests in a row; last: {last}")
        return Completion(req.key, "error", prompt_tokens=len(req.input_ids),
                          error=f"failed after {self.retries + 1} tries: {last}")
