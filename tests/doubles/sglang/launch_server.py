"""The SGLang double's HTTP server: `python -m sglang.launch_server` as our `http` backend meets it.

    PYTHONPATH=tests/doubles python -m sglang.launch_server --model-path MODEL --port 30000 [--delay-ms 20]

(from the repository root; `tests/doubles` first on the path makes `sglang` this double, as for the
in-process `Engine` in __init__.py). It answers SGLang's native `/generate` and the OpenAI
`/v1/completions` shapes, `/health` and `/v1/models`, GPU-free: with the instant backend
(deterministic, model-free, `--completion-tokens` per answer) or, slowly, with the torch backend one
request at a time. `--delay-ms` and `--fail-rate` (HTTP 500) simulate a loaded or flaky server; a
`/v1/completions` request for a model other than `--served-model-name` is a 404, as vLLM answers.
It prints `serving ... on http://HOST:PORT` once it listens. A wire-format double, not a serving engine.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engine.types import Completion, Request

log = logging.getLogger(__name__)


class Generator:
    def __init__(self, backend: str, model_dir: str | None, tokenizer, completion_tokens: int, temperature: float):
        self.kind, self.lock = backend, threading.Lock()
        self.tokenizer = tokenizer
        if backend == "instant":
            from engine.backends.instant import InstantBackend
            self.instant = InstantBackend(completion_tokens)
        else:
            from engine.backends.torch_backend import TorchBackend
            from engine.config.run_config import TorchConfig
            from engine.types import SamplingParams
            eos = {tokenizer.eos_token_id}
            self.torch = TorchBackend(model_dir, SamplingParams(temperature, 0.95, 0), eos, tokenizer.pad_token_id or 0,
                                      TorchConfig(batch_size=1))
            self.torch.start()

    def __call__(self, ids: list[int], max_new: int) -> Completion:
        req = Request(0, "double", ids, 0, max_new)
        if self.kind == "instant":
            return self.instant._complete(req)
        with self.lock:
            out = [c for batch in self.torch.generate(iter([req]), threading.Event()) for c in batch]
        return out[0]


def make_handler(gen: Generator, delay_ms: float, fail_rate: float, seed: int, served_name: str):
    rng = random.Random(seed)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: tests start many requests
            log.debug(fmt, *args)

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": served_name, "object": "model"}]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if delay_ms:
                time.sleep(delay_ms / 1000)
            if fail_rate and rng.random() < fail_rate:
                self._send(500, {"error": "injected failure (--fail-rate)"})
                return
            t = time.perf_counter()
            if self.path == "/generate":
                ids = body.get("input_ids")
                if ids is None:
                    ids = gen.tokenizer(body["text"], add_special_tokens=False).input_ids
                params = body.get("sampling_params", {})
                c = gen(ids, int(params.get("max_new_tokens", 128)))
                self._send(200, {
                    "text": gen.tokenizer.decode(c.output_ids, skip_special_tokens=True), "output_ids": c.output_ids,
                    "meta_info": {"prompt_tokens": len(ids), "completion_tokens": c.completion_tokens,
                                  "cached_tokens": 0, "finish_reason": {"type": c.finish_reason},
                                  "e2e_latency": time.perf_counter() - t}})
            elif self.path == "/v1/completions":
                if body.get("model") != served_name:  # as vLLM: only the served name is a model
                    self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                               "type": "NotFoundError", "code": 404}})
                    return
                prompt = body["prompt"]
                ids = prompt if isinstance(prompt, list) else gen.tokenizer(prompt, add_special_tokens=False).input_ids
                c = gen(ids, int(body.get("max_tokens", 16)))
                self._send(200, {
                    "object": "text_completion", "model": served_name,
                    "choices": [{"index": 0, "text": gen.tokenizer.decode(c.output_ids, skip_special_tokens=True),
                                 "finish_reason": c.finish_reason}],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": c.completion_tokens,
                              "total_tokens": len(ids) + c.completion_tokens}})
            else:
                self._send(404, {"error": f"no route {self.path}"})

    return Handler


def serve(host: str, port: int, backend: str, model: str, completion_tokens: int, delay_ms: float,
          fail_rate: float, temperature: float = 0.0, seed: int = 0, served_name: str | None = None) -> None:
    from transformers import AutoTokenizer

    from engine.model.locate import resolve_model

    model_dir, _ = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    gen = Generator(backend, str(model_dir), tok, completion_tokens, temperature)
    handler = make_handler(gen, delay_ms, fail_rate, seed, served_name or model)  # SGLang's default: the path
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    print(f"serving {backend} ({model}) on http://{host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sglang.launch_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", "--model", dest="model", default="embedded",
                    help="tokenizer (and model, for --backend torch): embedded, a directory or a hub id")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--served-model-name", help="the one model /v1/completions accepts (default: --model-path)")
    ap.add_argument("--backend", choices=["instant", "torch"], default="instant")
    ap.add_argument("--completion-tokens", type=int, default=64, help="instant backend: tokens per answer")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="simulated latency per request")
    ap.add_argument("--fail-rate", type=float, default=0.0, help="share of requests answered with HTTP 500")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0, help="of the --fail-rate draws")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    serve(a.host, a.port, a.backend, a.model, a.completion_tokens, a.delay_ms, a.fail_rate, a.temperature, a.seed,
          a.served_model_name)


if __name__ == "__main__":
    main()
