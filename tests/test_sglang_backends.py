"""SGLang backends on CPU: names checked against the pinned release's source, the in-process
adapter against a faithful double of `Engine.async_generate`, the HTTP backend against a real
server on loopback (`engine serve`), including timeouts, retries, a server that dies, and resume."""
import ast
import asyncio
import importlib.util
import inspect
import signal
import subprocess
import sys
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO, engine_cli, free_port, sample_docs, stored_rows, wait_for, write_config, write_jsonl
from engine.backends import sglang_engine
from engine.backends.engine_args import check_server_args, sampling_param_names, server_arg_names
from engine.config import ConfigError, load_config
from engine.runner import Run


def sglang_source() -> Path:
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sglang source not installed (scripts/setup.sh installs sglang==0.5.23 --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


def test_shipped_names_match_the_pinned_sglang_source():
    sys.path.insert(0, str(REPO / "tools"))
    import sglang_api

    pkg = sglang_source()
    version = (pkg.parent / f"sglang-{sglang_engine.SGLANG_VERSION}.dist-info").exists()
    assert version, f"installed sglang is not the pinned {sglang_engine.SGLANG_VERSION}"
    assert sglang_api.server_args(pkg) == set(server_arg_names())
    assert sglang_api.sampling_params(pkg) == set(sampling_param_names())


def test_every_name_the_project_emits_exists_in_sglang():
    assert set(sglang_engine.SAMPLING_KEYS) <= sampling_param_names()
    assert {"model_path", "skip_tokenizer_init", "context_length"} <= server_arg_names()
    for cfg_path in sorted((REPO / "runs").glob("*.toml")):
        cfg = load_config(cfg_path)  # validates sglang.server_args against the shipped names
        assert check_server_args(cfg.sglang.server_args) is None, cfg_path


def test_async_generate_call_matches_the_real_signature():
    src = (sglang_source() / "srt" / "entrypoints" / "engine.py").read_text()
    fn = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.AsyncFunctionDef) and n.name == "async_generate")
    real = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    assert {"input_ids", "sampling_params"} <= real
    ours = set(inspect.signature(FakeEngine.async_generate).parameters) - {"self"}
    assert ours <= real


def test_unknown_server_argument_is_named(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('backend = "sglang"\n[input]\npaths = ["x"]\n[sglang.server_args]\nmem_fraction = 0.9\n')
    with pytest.raises(ConfigError, match="unknown SGLang server argument 'mem_fraction'.*mem_fraction_static"):
        load_config(cfg)


class FakeEngine:
    """A double of sglang.Engine 0.5.23 for one GPU-less process: same constructor keywords, same
    async_generate keywords and return shape (`output_ids`, `meta_info` with prompt/completion/cached
    tokens and a finish_reason dict). It keeps a radix-like cache: cached_tokens is the longest prefix
    shared with an earlier request."""

    instances: list["FakeEngine"] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.seen: list[list[int]] = []
        self.calls = 0
        self.concurrent = self.max_concurrent = 0
        self.abort_every = kwargs.pop("_abort_every", 0)
        self.shut = False
        FakeEngine.instances.append(self)

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, rid=None, stream=False):
        assert prompt is None and input_ids and self.kwargs["skip_tokenizer_init"] is True
        self.calls += 1
        call = self.calls
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        await asyncio.sleep(0.001)
        self.concurrent -= 1
        cached = max((_lcp(input_ids, s) for s in self.seen[-64:]), default=0)
        self.seen.append(input_ids)
        if self.abort_every and call % self.abort_every == 0:
            return {"output_ids": [], "meta_info": {"finish_reason": {"type": "abort", "message": "retracted"},
                                                    "prompt_tokens": len(input_ids), "completion_tokens": 0}}
        n = sampling_params["max_new_tokens"]
        stops_early = call % 2 and not sampling_params.get("ignore_eos")
        out = (input_ids[::-1] * (n // len(input_ids) + 1))[: n - 1 if stops_early else n]
        return {"text": None, "output_ids": out, "meta_info": {
            "id": rid or str(call), "prompt_tokens": len(input_ids), "completion_tokens": len(out),
            "cached_tokens": cached, "e2e_latency": 0.01,
            "finish_reason": {"type": "length", "length": n} if len(out) == n else {"type": "stop", "matched": 2}}}

    def shutdown(self):
        self.shut = True


def _lcp(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.fixture
def fake_sglang(monkeypatch):
    FakeEngine.instances.clear()
    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=FakeEngine))
    return FakeEngine


def test_in_process_backend_end_to_end(tmp_path, tiny_model, fake_sglang):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(60))
    out = tmp_path / "out"
    cfg = load_config(write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="sglang",
                                   prompts=("faq", "table"), scheduler={"max_in_flight": 8},
                                   sglang={"server_args": {"mem_fraction_static": 0.9, "schedule_policy": "lpm"}}))
    code, summary = Run(cfg).execute()
    assert code == 0
    (eng,) = fake_sglang.instances
    assert eng.kwargs["mem_fraction_static"] == 0.9 and eng.kwargs["model_path"] == str(tiny_model)
    assert eng.kwargs["context_length"] == 1024 and eng.shut
    assert 1 < eng.max_concurrent <= 8  # the in-flight window is kept full but bounded
    for prompt in ("faq", "table"):
        t = pq.read_table(out / prompt)
        assert sorted(t.column("id").to_pylist()) == sorted(d["id"] for d in sample_docs(60))
        assert set(t.column("finish_reason").to_pylist()) == {"stop", "length"}
        assert all(g for g in t.column("generation").to_pylist())
    assert summary["prefix_cache_hit_rate"] > 0.3  # every request of a prompt shares its prefix


def test_ignore_eos_reaches_sglang(tmp_path, tiny_model, fake_sglang):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(10))
    cfg = load_config(write_config(tmp_path / "r.toml", tiny_model, [src], tmp_path / "out", backend="sglang",
                                   sampling={"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}))
    code, _ = Run(cfg).execute()
    assert code == 0
    t = pq.read_table(tmp_path / "out" / "faq")
    assert set(t.column("finish_reason").to_pylist()) == {"length"}
    assert set(t.column("completion_tokens").to_pylist()) == {16}


def test_in_process_aborts_are_retried(tmp_path, tiny_model, fake_sglang, monkeypatch):
    monkeypatch.setattr(sglang_engine.SGLangEngineBackend, "engine_kwargs",
                        lambda self: {"model_path": self.model_path, "skip_tokenizer_init": True, "_abort_every": 5})
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(40))
    out = tmp_path / "out"
    cfg = load_config(write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="sglang",
                                   retry={"backoff_seconds": 0.0}))
    code, summary = Run(cfg).execute()
    assert code == 0 and summary["retries"] >= 5 and summary["failed"] == 0
    assert pq.read_table(out / "faq").num_rows == 40


def start_server(model, *args, port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", str(port), "--model", str(model),
                             *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    def ready():
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False
    try:
        wait_for(ready, f"engine serve on {url}", 300, proc, poll=0.1)  # a loaded machine starts it slowly
    except AssertionError:
        proc.kill()
        raise
    return proc, url


def test_http_configuration_errors_are_found_at_start(tmp_path, tiny_model):
    server, url = start_server(tiny_model, "--served-model-name", "smol")
    try:
        src = write_jsonl(tmp_path / "in.jsonl", sample_docs(5))
        out = tmp_path / "out"
        cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="sglang-http",
                           http={"urls": [url], "api": "openai", "model": "default"})
        p = engine_cli("run", str(cfg))
        assert p.returncode == 2 and "does not serve http.model = 'default'" in p.stderr and "smol" in p.stderr
        assert not list((out / "faq").glob("*.parquet"))
        # Empty http.model (the default): the server's own model, asked from /v1/models.
        p = engine_cli("run", str(cfg), "--set", 'http.model=""', check=True)
        assert "complete:" in p.stdout and pq.read_table(out / "faq").num_rows == 5
        # Nothing listening: the backend, not the documents: status 4, no rows.
        out2 = tmp_path / "out2"
        p = engine_cli("run", str(cfg), "--set", f'http.urls=["http://127.0.0.1:{free_port()}"]',
                       "--set", f'output.dir="{out2}"')
        assert p.returncode == 4 and "cannot reach" in p.stderr
        assert not list((out2 / "faq").glob("*.parquet"))
    finally:
        server.kill()


def test_server_dying_with_few_documents_left_is_status_4_not_error_rows(tmp_path, tiny_model):
    server, url = start_server(tiny_model, "--delay-ms", "1000")
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(5))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="sglang-http",
                       http={"urls": [url], "backoff_s": 0.05, "dead_after": 3}, scheduler={"max_in_flight": 1},
                       output={"flush_seconds": 0.1})
    run = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg)], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: stored_rows(out) >= 1, "the first stored row", 300, run)
    finally:
        server.kill()
    stdout, err = run.communicate(timeout=120)
    assert run.returncode == 4 and "no server answered" in err, err
    t = pq.read_table(out / "faq")
    assert 1 <= t.num_rows < 5 and "error" not in t.column("finish_reason").to_pylist()


@pytest.mark.parametrize("api", ["native", "openai"])
def test_http_backend_against_a_real_server(tmp_path, tiny_model, api):
    server, url = start_server(tiny_model, "--completion-tokens", "9")
    try:
        src = write_jsonl(tmp_path / "in.jsonl", sample_docs(40))
        out = tmp_path / "out"
        cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="sglang-http",
                           http={"urls": [url, url], "api": api}, scheduler={"max_in_flight": 16})
        p = engine_cli("run", str(cfg), check=True)
        t = pq.read_table(out / "faq")
        assert t.num_rows == 40 and set(t.column("completion_tokens").to_pylist()) == {9}
        assert all(g for g in t.column("generation").to_pylist())
        assert "complete:" in p.stdout
    finally:
        server.kill()


def test_http_timeouts_and_server_errors_are_retried_then_recorded(tmp_path, tiny_model):
    server, url = start_server(tiny_model, "--fail-rate", "0.5")
    slow, slow_url = start_server(tiny_model, "--delay-ms", "3000")
    try:
        src = write_jsonl(tmp_path / "in.jsonl", sample_docs(30))
        out = tmp_path / "out"
        cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="sglang-http",
                           http={"urls": [url], "retries": 2, "backoff_s": 0.01},
                           retry={"backoff_seconds": 0.01, "max_error_fraction": 0.2})
        engine_cli("run", str(cfg), check=True)
        t = pq.read_table(out / "faq")
        reasons = t.column("finish_reason").to_pylist()
        assert t.num_rows == 30 and reasons.count("error") <= 3  # 0.5^9 per request: retries win
        # A server that answers nothing in time is the backend's failure, never 3 error rows: status 4.
        out2 = tmp_path / "out2"
        cfg2 = write_config(tmp_path / "r2.toml", tiny_model, [write_jsonl(tmp_path / "b.jsonl", sample_docs(3))], out2,
                            backend="sglang-http", http={"urls": [slow_url], "timeout_s": 0.3, "retries": 1,
                                                         "backoff_s": 0.01, "dead_after": 2},
                            retry={"max_attempts": 1})
        p = engine_cli("run", str(cfg2))
        assert p.returncode == 4 and "Timeout" in p.stderr, p.stderr
        assert not list((out2 / "faq").glob("*.parquet"))
    finally:
        server.kill()
        slow.kill()


def test_server_dying_mid_run_then_resume(tmp_path, tiny_model):
    server, url = start_server(tiny_model, "--delay-ms", "20")
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(300))
    out = tmp_path / "out"
    port = url.rsplit(":", 1)[1]
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="sglang-http",
                       http={"urls": [url], "retries": 1, "backoff_s": 0.05, "dead_after": 4, "timeout_s": 5},
                       scheduler={"max_in_flight": 4}, output={"flush_seconds": 0.2})
    run = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg)], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: stored_rows(out) >= 8, "rows stored before the server dies", 300, run)
    server.kill()
    _, err = run.communicate(timeout=120)
    assert run.returncode == 4 and "no server answered" in err and "resume" in err, err
    assert "Task was destroyed" not in err
    done = pq.read_table(out / "faq").num_rows
    assert 0 < done < 300
    assert "error" not in pq.read_table(out / "faq").column("finish_reason").to_pylist()
    server2, _ = start_server(tiny_model, "--delay-ms", "0", port=int(port))
    try:
        engine_cli("run", str(cfg), check=True)
        ids = pq.read_table(out / "faq").column("id").to_pylist()
        assert sorted(ids) == sorted(d["id"] for d in sample_docs(300))
        assert "error" not in pq.read_table(out / "faq").column("finish_reason").to_pylist()
    finally:
        server2.kill()


@pytest.mark.gpu
@pytest.mark.sglang
def test_gpu_smoke():
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_smoke

    why = gpu_smoke.available()
    if why:
        pytest.skip(why)
    assert gpu_smoke.main(["--docs", "64", "--max-new-tokens", "128"]) == 0


def test_openai_abort_is_an_error_not_a_success():
    from engine.backends.base import Request, SamplingParams
    from engine.backends.sglang_http import SGLangHTTPBackend

    b = SGLangHTTPBackend(["http://127.0.0.1:1"], "openai", SamplingParams(0.7, 0.95, None), 4)
    req = Request(7, "faq", [1, 2, 3], 1, 16)
    aborted = b._parse(req, {"choices": [{"text": "", "finish_reason": "abort"}], "usage": {"prompt_tokens": 3}})
    assert aborted.finish_reason == "error" and "aborted" in aborted.error
    ok = b._parse(req, {"choices": [{"text": "hi", "finish_reason": "length"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 16,
                                  "prompt_tokens_details": {"cached_tokens": 2}}})
    assert (ok.finish_reason, ok.completion_tokens, ok.cached_tokens) == ("length", 16, 2)
    # No per-request seed unless sampling.seed is set (vLLM's CPU engine dies on one).
    assert "seed" not in b._payload(req)[1]
    seeded = SGLangHTTPBackend(["http://127.0.0.1:1"], "openai", SamplingParams(0.7, 0.95, 5), 4)
    assert isinstance(seeded._payload(req)[1]["seed"], int)


def test_http_sigterm_cancels_in_flight_requests_quietly_and_a_5xx_storm_is_not_rows(tmp_path, tiny_model):
    server, url = start_server(tiny_model, "--delay-ms", "200")
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(200))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="sglang-http",
                       http={"urls": [url]}, scheduler={"max_in_flight": 8}, output={"flush_seconds": 0.1})
    try:
        run = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: stored_rows(out) >= 8, "rows stored", 300, run)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=120)
        assert run.returncode == 3 and "resume" in err, err
        assert "Task was destroyed" not in err and "Traceback" not in err  # in-flight tasks cancelled, awaited
    finally:
        server.kill()
    # A server that answers every request with HTTP 500: the backend's failure, found by the probe: status 4.
    storm, storm_url = start_server(tiny_model, "--fail-rate", "1.0")
    try:
        out2 = tmp_path / "out2"
        p = engine_cli("run", str(cfg), "--set", f'http.urls=["{storm_url}"]', "--set", f'output.dir="{out2}"')
        assert p.returncode == 4 and "HTTP 500" in p.stderr, p.stderr
        assert not list((out2 / "faq").glob("*.parquet"))
    finally:
        storm.kill()
