"""SGLang backends on CPU: names checked against the pinned release's source, the in-process
adapter against a faithful double of `Engine.async_generate`, the HTTP backend against a real
server on loopback (the double's `sglang.launch_server`), including timeouts, retries, a server that dies,
and resume."""
import ast
import importlib.machinery
import importlib.util
import inspect
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import (
    DOUBLES,
    REPO,
    Watched,
    engine_cli,
    free_port,
    load_double,
    reap_session,
    sample_docs,
    stored_rows,
    wait_for,
    write_config,
    write_jsonl,
)

from engine.backends import sglang_engine, sglang_format
from engine.config.engine_args import check_server_args, sampling_param_names, server_arg_names
from engine.config.run_config import HTTPConfig, load_config
from engine.errors import ConfigError
from engine.run import Run


def sglang_source() -> Path:
    # the installed package on sys.path, whatever a double left in sys.modules
    spec = importlib.machinery.PathFinder.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sglang source not installed (scripts/setup.sh installs sglang==0.5.23 --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


def test_shipped_names_match_the_pinned_sglang_source():
    spec = importlib.util.spec_from_file_location("sglang_api", REPO / "tools" / "sglang_api.py")
    sglang_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sglang_api)  # the maintainers' script, by path: tools/ is not a package
    pkg = sglang_source()
    version = (pkg.parent / f"sglang-{sglang_engine.SGLANG_VERSION}.dist-info").exists()
    assert version, f"installed sglang is not the pinned {sglang_engine.SGLANG_VERSION}"
    assert sglang_api.server_args(pkg) == set(server_arg_names())
    assert sglang_api.sampling_params(pkg) == set(sampling_param_names())


def test_every_name_the_project_emits_exists_in_sglang():
    assert set(sglang_format.SAMPLING_KEYS) <= sampling_param_names()
    backend = sglang_engine.SGLangEngineBackend("m", {}, None, 1)
    assert set(backend.engine_kwargs()) | {"context_length", "speculative_ngram_max_bfs_breadth"} <= server_arg_names()
    for cfg_path in sorted((REPO / "runs").glob("*.toml")):
        cfg = load_config(cfg_path)  # validates sglang.server_args against the shipped names
        assert check_server_args(cfg.sglang.server_args) is None, cfg_path


def test_async_generate_call_matches_the_real_signature():
    src = (sglang_source() / "srt" / "entrypoints" / "engine.py").read_text()
    fn = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.AsyncFunctionDef) and n.name == "async_generate")
    real = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    assert {"input_ids", "sampling_params"} <= real
    ours = set(inspect.signature(load_double().Engine.async_generate).parameters) - {"self", "_"}
    assert ours <= real


def _dataclass_fields(path: Path, name: str) -> set[str]:
    """The field names of the dataclass `name` in a source file (its annotated class attributes)."""
    cls = next(n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef) and n.name == name)
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _our_native_requests() -> list[tuple[str, dict]]:
    """What the `http` backend sends to /generate: every optional field on (seed, top_k / min_p /
    repetition_penalty, the repetition stop's processor and custom_params), then ignore_eos."""
    from engine.backends.http import HTTPBackend
    from engine.types import RepetitionStop, Request, SamplingParams

    full = SamplingParams(0.7, 0.95, 5, top_k=20, min_p=0.05, repetition_penalty=1.1, repetition_stop=RepetitionStop())
    bench = SamplingParams(0.0, 1.0, None, ignore_eos=True)
    req = Request(3, "faq", [5, 6, 7], 2, 16)
    out = []
    for sampling in (full, bench):
        b = HTTPBackend(HTTPConfig(["http://127.0.0.1:1"], "native"), sampling, 4, eos_ids=[2, 0])
        out += [b._payload(req), b._payload(req, probe=True)]
    assert "custom_logit_processor" in out[0][1] and "sampling_seed" in out[0][1]["sampling_params"]
    return out


def test_native_requests_are_what_sglangs_generate_route_accepts():
    """Every field the `http` backend (native API) sends is a GenerateReqInput field of the pinned release
    (FastAPI parses /generate's body into that dataclass), and the body passes SGLang's own contract gate
    (`generate_contract_error`, srt/entrypoints/api_contract.py: the schema check /generate runs first)."""
    pkg = sglang_source()
    route = (pkg / "srt" / "entrypoints" / "http_server.py").read_text()
    handler = next(n for n in ast.walk(ast.parse(route))
                   if isinstance(n, ast.AsyncFunctionDef) and n.name == "generate_request")
    assert "/generate" in ast.unparse(handler.decorator_list[0]) and ast.unparse(handler.args.args[0].annotation) \
        == "GenerateReqInput" and "generate_contract_error" in ast.unparse(handler)
    fields = _dataclass_fields(pkg / "srt" / "managers" / "io_struct.py", "GenerateReqInput")
    assert {"input_ids", "sampling_params", "custom_logit_processor"} <= fields
    # the contract's decoder is generated code that needs only msgspec: loaded by path, without sglang's package
    pytest.importorskip("msgspec")
    spec = importlib.util.spec_from_file_location("sglang_api_types", pkg / "api" / "v1" / "api_types.py")
    api_types = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(api_types)

    def contract_error(body):
        try:
            api_types.GenerateRequest.from_json_value(body)
        except api_types.JsonContractError as exc:
            return str(exc)
        return None
    assert "unknown field `bogus`" in contract_error({"input_ids": [1], "sampling_params": {"bogus": 1}})
    for path, body in _our_native_requests():
        assert path == "/generate"
        assert set(body) <= fields, set(body) - fields
        assert set(body["sampling_params"]) <= set(sglang_format.SAMPLING_KEYS) <= sampling_param_names()
        assert contract_error(body) is None, (contract_error(body), body)


def test_engine_requests_use_async_generates_own_arguments():
    """The keywords the `sglang` backend passes to Engine.async_generate, recorded from a real call, are
    arguments of the pinned release's async_generate (and fields of GenerateReqInput, which it builds)."""
    import asyncio

    from engine.types import RepetitionStop, Request, SamplingParams

    class Recorder:
        async def async_generate(self, **kwargs):
            self.kwargs = kwargs
            return {"output_ids": [9, 2], "meta_info": {"finish_reason": {"type": "stop", "matched": 2},
                                                        "prompt_tokens": 3, "completion_tokens": 2}}
    b = sglang_engine.SGLangEngineBackend("m", {}, SamplingParams(0.7, 0.95, 5, repetition_stop=RepetitionStop()), 1,
                                          stop_ids=[2])
    b.engine = Recorder()
    done = asyncio.run(b.agenerate(Request(0, "faq", [5, 6, 7], 2, 16)))
    assert done.finish_reason == "stop" and done.output_ids == [9, 2]
    sent = set(b.engine.kwargs)
    assert sent == {"input_ids", "sampling_params", "custom_logit_processor"}
    src = (sglang_source() / "srt" / "entrypoints" / "engine.py").read_text()
    fn = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.AsyncFunctionDef) and n.name == "async_generate")
    assert sent <= {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    assert sent <= _dataclass_fields(sglang_source() / "srt" / "managers" / "io_struct.py", "GenerateReqInput")


def _meta_info_keys(src: str) -> set[str]:
    """Every key the source writes into a `meta_info` dict: `meta_info = {...}`, `meta_info.update({...})`,
    `meta_info["k"] = ...`."""
    keys = set()
    for n in ast.walk(ast.parse(src)):
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict):
            if any(isinstance(t, ast.Name) and t.id == "meta_info" for t in n.targets):
                keys |= {k.value for k in n.value.keys if isinstance(k, ast.Constant)}
        if isinstance(n, ast.Assign):
            for t in n.targets:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == "meta_info" \
                        and isinstance(t.slice, ast.Constant):
                    keys.add(t.slice.value)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "update" \
                and isinstance(n.func.value, ast.Name) and n.func.value.id == "meta_info" \
                and n.args and isinstance(n.args[0], ast.Dict):
            keys |= {k.value for k in n.args[0].keys if isinstance(k, ast.Constant)}
    return keys


def test_response_fields_we_read_are_ones_sglang_writes():
    """SGLang's response as the pinned release builds it: the `meta_info` keys completion_from reads are
    written by its tokenizer manager (e2e_latency once a request finishes), and every finish reason its
    scheduler can send (`BaseFinishReason.to_json`: stop, length, abort) maps to the row we intend. Our
    doubles (tests/doubles/sglang) write no key SGLang does not."""
    from engine.types import Request

    pkg = sglang_source()
    manager = (pkg / "srt" / "managers" / "tokenizer_manager.py").read_text()
    written = _meta_info_keys(manager)
    assert set(sglang_format.META_INFO_KEYS) <= written, set(sglang_format.META_INFO_KEYS) - written
    for key in ("output_ids", "meta_info", "text"):  # the result dict (text: not with skip_tokenizer_init)
        assert f'"{key}":' in manager
    # finish reasons: each to_json's dict literal, as the scheduler sends it (output_streamer.py)
    reasons = {}
    for cls in ast.walk(ast.parse((pkg / "srt" / "managers" / "schedule_batch.py").read_text())):
        if isinstance(cls, ast.ClassDef) and any(ast.unparse(b) == "BaseFinishReason" for b in cls.bases):
            fn = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "to_json")
            d = next(r.value for r in ast.walk(fn) if isinstance(r, ast.Return) and isinstance(r.value, ast.Dict))
            keys = [k.value for k in d.keys]
            reasons[cls.name] = ({k: ("x" if k == "message" else 1) for k in keys}
                                 | {"type": d.values[keys.index("type")].value})
    assert {r["type"] for r in reasons.values()} == {"stop", "length", "abort"}, reasons
    streamer = (pkg / "srt" / "managers" / "scheduler_components" / "output_streamer.py").read_text()
    assert "req.finished_reason.to_json()" in streamer
    want = {"stop": "stop", "length": "length", "abort": "error"}
    req = Request(0, "faq", [5, 6, 7], 2, 16)
    for name, reason in reasons.items():
        c = sglang_format.completion_from(req, {"output_ids": [9, 9], "meta_info": {
            "finish_reason": reason, "prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 2,
            "e2e_latency": 0.5}})
        assert c.finish_reason == want[reason["type"]], name
        if c.finish_reason == "error":
            assert "aborted by SGLang: x" in c.error
        else:
            assert (c.prompt_tokens, c.completion_tokens, c.cached_tokens, c.latency_s) == (3, 2, 2, 0.5)
    for double in (DOUBLES / "sglang" / "__init__.py", DOUBLES / "sglang" / "launch_server.py"):
        ours = _meta_info_keys_in_literals(double.read_text())
        assert ours and ours <= written, (double.name, ours - written)


def _meta_info_keys_in_literals(src: str) -> set[str]:
    """Keys of every dict literal that is the value of a "meta_info" key (how the doubles build theirs)."""
    keys = set()
    for n in ast.walk(ast.parse(src)):
        if isinstance(n, ast.Dict):
            for k, v in zip(n.keys, n.values):
                if isinstance(k, ast.Constant) and k.value == "meta_info" and isinstance(v, ast.Dict):
                    keys |= {kk.value for kk in v.keys if isinstance(kk, ast.Constant)}
    return keys


def test_unknown_server_argument_is_named(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('backend = "sglang"\n[input]\npaths = ["x"]\n[sglang.server_args]\nmem_fraction = 0.9\n')
    with pytest.raises(ConfigError, match="unknown SGLang server argument 'mem_fraction'.*mem_fraction_static"):
        load_config(cfg)




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
    assert summary.process.prefix_cache_hit_rate > 0.3  # every request of a prompt shares its prefix


def test_document_first_order_gives_sglangs_cache_each_document_once(tmp_path, tiny_model, fake_sglang):
    """render.layout = "document_first": a document's four prompts are sent back to back, so the server's prefix
    cache (the double: the longest prefix shared with recent requests, as SGLang's radix cache reports it in
    meta_info.cached_tokens) serves the document to three of them; summary and stored rows carry its counts."""
    from transformers import AutoTokenizer

    docs = [{"id": f"d{i}", "text": f"Page {i}. " + f"The river {i} flows past the old mill and the square. " * 20}
            for i in range(24)]  # ~260 tokens: longer than a prompt's instruction, which document_last shares
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out"
    prompts = ("faq", "math", "table", "tutorial")
    cfg = load_config(write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="sglang", prompts=prompts,
                                   scheduler={"max_in_flight": 8}, render={"layout": "document_first"}))
    code, summary = Run(cfg).execute()
    assert code == 0
    tok = AutoTokenizer.from_pretrained(tiny_model)
    cached: dict[str, int] = {}
    for prompt in prompts:
        for r in pq.read_table(out / prompt).to_pylist():
            cached[r["id"]] = cached.get(r["id"], 0) + r["cached_tokens"]
    for d in docs:
        doc_tokens = len(tok(d["text"], add_special_tokens=False).input_ids)
        assert cached[d["id"]] >= 3 * doc_tokens, d["id"]
    per = summary.process.per_prompt
    assert sum(q.cached_prompt_tokens for q in per.values()) == summary.process.cached_tokens == sum(cached.values())
    assert all(q.computed_prompt_tokens == q.prompt_tokens - q.cached_prompt_tokens for q in per.values())


def test_ignore_eos_reaches_sglang(tmp_path, tiny_model, fake_sglang):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(10))
    cfg = load_config(write_config(tmp_path / "r.toml", tiny_model, [src], tmp_path / "out", backend="sglang",
                                   sampling={"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}))
    code, _ = Run(cfg).execute()
    assert code == 0
    t = pq.read_table(tmp_path / "out" / "faq")
    assert set(t.column("finish_reason").to_pylist()) == {"length"}
    assert set(t.column("completion_tokens").to_pylist()) == {16}


@pytest.mark.parametrize("status", ["none", "400", "503"])
def test_in_process_aborts_are_retried(tmp_path, tiny_model, fake_sglang, monkeypatch, status):
    # SGLang returns an abort without a status code as a dict, and raises one with a status code:
    # ValueError for 400, HTTPException otherwise (tokenizer_manager.py:1891-1923).
    monkeypatch.setenv("SGLANG_DOUBLE_ABORT_EVERY", "5")
    monkeypatch.setenv("SGLANG_DOUBLE_ABORT_STATUS", status)
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(40))
    out = tmp_path / "out"
    cfg = load_config(write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="sglang",
                                   retry={"backoff_seconds": 0.0}))
    code, summary = Run(cfg).execute()
    assert code == 0 and summary.process.retries >= 5 and summary.failed == 0
    assert pq.read_table(out / "faq").num_rows == 40


def double_env(tmp_path, **extra) -> dict:
    """Environment of an `engine run` subprocess that imports the double as `sglang`."""
    path = os.pathsep.join(p for p in (str(DOUBLES), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "SGLANG_DOUBLE_PIDFILE": str(tmp_path / "scheduler.pid"), **extra}


def slow_sglang_run(tmp_path, model, n=60):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(n))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", model, [src], out, backend="sglang", scheduler={"max_in_flight": 2},
                       output={"flush_seconds": 0.2}, report={"enabled": False})
    return src, out, cfg


def exactly_once(out, n):
    ids = pq.read_table(out / "faq").column("id").to_pylist()
    assert sorted(ids) == sorted(d["id"] for d in sample_docs(n))


def test_our_logging_survives_sglang_start(tmp_path, tiny_model):
    # sglang.Engine re-runs logging.basicConfig(force=True) at its log_level ("error" by default).
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(6))
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], tmp_path / "out", backend="sglang")
    p = engine_cli("run", str(cfg), env=double_env(tmp_path), check=True)
    assert "sglang backend ready" in p.stderr and "writing the diversity report" in p.stderr, p.stderr
    assert "INFO engine.run" in p.stderr  # our format, not SGLang's


def test_a_crashed_sglang_process_is_status_4_with_the_run_saved_then_resume(tmp_path, tiny_model):
    # SGLang's watchdog SIGQUITs its caller when a child dies; the default handler SIGKILLs the caller.
    src, out, cfg = slow_sglang_run(tmp_path, tiny_model)
    env = double_env(tmp_path, SGLANG_DOUBLE_DELAY_S="0.4")
    w = Watched(cfg, env=env)
    wait_for(lambda: stored_rows(out) > 0, "rows stored", 300, w.proc)
    os.kill(int((tmp_path / "scheduler.pid").read_text()), signal.SIGKILL)
    code, _, err = w.finish()
    assert code == 4, err[-3000:]
    assert "an SGLang process died" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is False and 0 < sum(summary["documents_stored"].values()) < 60
    assert reap_session(w.proc.pid) == []
    p = engine_cli("run", str(cfg), env=double_env(tmp_path), check=True)
    assert "resuming" in p.stderr
    exactly_once(out, 60)


def test_ctrl_c_to_the_process_group_is_status_3_not_a_sigkill(tmp_path, tiny_model):
    # Ctrl-C (or scancel) reaches SGLang's children too: they die of it and the watchdog SIGQUITs us.
    src, out, cfg = slow_sglang_run(tmp_path, tiny_model)
    w = Watched(cfg, env=double_env(tmp_path, SGLANG_DOUBLE_DELAY_S="0.4"))
    wait_for(lambda: stored_rows(out) > 0, "rows stored", 300, w.proc)
    os.killpg(w.proc.pid, signal.SIGINT)
    code, _, err = w.finish()
    assert code == 3, err[-3000:]
    assert json.loads((out / "summary.json").read_text())["complete"] is False
    assert reap_session(w.proc.pid) == []
    engine_cli("run", str(cfg), env=double_env(tmp_path), check=True)
    exactly_once(out, 60)


def test_sglang_failing_at_start_is_4_for_a_dead_process_and_2_for_a_refused_argument(tmp_path, tiny_model):
    src, out, cfg = slow_sglang_run(tmp_path, tiny_model, n=4)
    p = engine_cli("run", str(cfg), env=double_env(tmp_path, SGLANG_DOUBLE_FAIL_LOAD="1"))
    assert p.returncode == 4, p.stderr[-3000:]  # was: SIGKILLed by SGLang's launch-phase SIGQUIT handler
    assert "an SGLang process died while the engine started" in p.stderr
    p = engine_cli("run", str(cfg), "--set", "sglang.server_args.schedule_conservativeness=-1",
                   env=double_env(tmp_path))
    assert p.returncode == 2 and "SGLang refused to start" in p.stderr, p.stderr[-3000:]


def long_docs(n: int) -> list[dict]:
    # no line or word break: truncated to exactly the document budget
    return [{"id": f"long-{i}", "text": "".join(f"w{(i * 31 + j) % 997}" for j in range(3000))} for i in range(n)]


def test_full_budget_documents_get_every_new_token_under_sglangs_cap(tmp_path, tiny_model, fake_sglang):
    # SGLang caps max_new_tokens at context - 2 - input: the renderer keeps those 2 tokens free.
    src = write_jsonl(tmp_path / "in.jsonl", long_docs(4))
    cfg = load_config(write_config(tmp_path / "r.toml", tiny_model, [src], tmp_path / "out", backend="sglang",
                                   sampling={"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}))
    code, summary = Run(cfg).execute()
    assert code == 0 and summary.process.truncated == 4
    t = pq.read_table(tmp_path / "out" / "faq")
    assert set(t.column("completion_tokens").to_pylist()) == {16}
    assert set(t.column("prompt_tokens").to_pylist()) == {1024 - 16 - 2}


def test_generation_config_sampling_reaches_every_backend(tmp_path, tiny_model, fake_sglang):
    import shutil

    from engine.backends import make_backend
    from engine.backends.http import HTTPBackend
    from engine.backends.torch_backend import TorchBackend
    from engine.model.setup import ModelSetup
    from engine.types import Request

    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    gen_file = model / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    gen.update({"do_sample": True, "temperature": 0.6, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    (model / "generation_config.json").write_text(json.dumps(gen))
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(4))
    path = write_config(tmp_path / "r.toml", model, [src], tmp_path / "out", backend="sglang",
                        sampling={"max_new_tokens": 16})
    path.write_text(path.read_text().replace("temperature = 0.0\n", ""))  # the model's temperature
    cfg = load_config(path)
    setup = ModelSetup.load(cfg)
    s = setup.sampling
    assert (s.temperature, s.top_k, s.min_p, s.repetition_penalty) == (0.6, 20, 0.05, 1.1)
    # every backend gets the same resolved parameters
    assert isinstance(make_backend(load_config(path, ["backend=torch"]), setup), TorchBackend)
    assert make_backend(load_config(path, ["backend=torch"]), setup).sampling is s
    # the old name `sglang-http` still builds the http backend
    via_alias = make_backend(load_config(path, ["backend=sglang-http", 'http.urls=["http://127.0.0.1:1"]']), setup)
    assert isinstance(via_alias, HTTPBackend) and via_alias.sampling is s and via_alias.eos_ids == sorted(
        setup.eos_ids())
    req = Request(0, "faq", [5, 6, 7], 2, 16)
    http = HTTPBackend(HTTPConfig(["http://127.0.0.1:1"], "openai"), s, 4)
    assert {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}.items() <= http._payload(req)[1].items()
    native = HTTPBackend(HTTPConfig(["http://127.0.0.1:1"], "native"), s, 4)
    assert native._payload(req)[1]["sampling_params"]["top_k"] == 20
    code, _ = Run(cfg).execute()
    assert code == 0
    (eng,) = fake_sglang.instances
    tok_eos = setup.tokenizer.eos_token_id
    for sp in eng.requests:
        assert (sp["top_k"], sp["min_p"], sp["repetition_penalty"], sp["temperature"]) == (20, 0.05, 1.1, 0.6)
        assert tok_eos in sp["stop_token_ids"]
    fingerprint = json.loads((tmp_path / "out" / "_run" / "fingerprint.json").read_text())
    assert {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}.items() <= fingerprint["sampling"].items()
    # The run config overrides the model's values; 0 / 1 switch a knob off.
    over = load_config(path, ["sampling.top_k=0", "sampling.repetition_penalty=1.0", "sampling.min_p=0.1"])
    s2 = ModelSetup.load(over).sampling
    assert s2.extra() == {"min_p": 0.1}


def start_server(model, *args, port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    """The SGLang double's HTTP server (tests/doubles/sglang/launch_server.py), as `python -m sglang.launch_server`."""
    path = os.pathsep.join(p for p in (str(DOUBLES), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--port", str(port), "--model-path",
                             str(model), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": path})
    url = f"http://127.0.0.1:{port}"
    import httpx

    def ready():
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False
    try:
        wait_for(ready, f"the SGLang server double on {url}", 300, proc, poll=0.1)  # a loaded machine starts it slowly
    except AssertionError:
        proc.kill()
        raise
    return proc, url


def test_http_configuration_errors_are_found_at_start(tmp_path, tiny_model):
    server, url = start_server(tiny_model, "--served-model-name", "smol")
    try:
        src = write_jsonl(tmp_path / "in.jsonl", sample_docs(5))
        out = tmp_path / "out"
        cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="http",
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
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="http",
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
        cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="http",
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
        cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="http",
                           http={"urls": [url], "retries": 2, "backoff_s": 0.01},
                           retry={"backoff_seconds": 0.01, "max_error_fraction": 0.2})
        engine_cli("run", str(cfg), check=True)
        t = pq.read_table(out / "faq")
        reasons = t.column("finish_reason").to_pylist()
        assert t.num_rows == 30 and reasons.count("error") <= 3  # 0.5^9 per request: retries win
        # A server that answers nothing in time is the backend's failure, never 3 error rows: status 4.
        out2 = tmp_path / "out2"
        cfg2 = write_config(tmp_path / "r2.toml", tiny_model, [write_jsonl(tmp_path / "b.jsonl", sample_docs(3))], out2,
                            backend="http", http={"urls": [slow_url], "timeout_s": 0.3, "retries": 1,
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
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="http",
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
    from tests.gpu import smoke as gpu_smoke

    why = gpu_smoke.available()
    if why:
        pytest.skip(why)
    assert gpu_smoke.main(["--docs", "64", "--max-new-tokens", "128"]) == 0


def test_openai_abort_is_an_error_not_a_success():
    from engine.backends.http import HTTPBackend
    from engine.types import Request, SamplingParams

    b = HTTPBackend(HTTPConfig(["http://127.0.0.1:1"], "openai"), SamplingParams(0.7, 0.95, None), 4)
    req = Request(7, "faq", [1, 2, 3], 1, 16)
    aborted = b._parse(req, {"choices": [{"text": "", "finish_reason": "abort"}], "usage": {"prompt_tokens": 3}})
    assert aborted.finish_reason == "error" and "aborted" in aborted.error
    # vLLM's "error" (a retryable request-level failure) is not a stop either
    failed = b._parse(req, {"choices": [{"text": "", "finish_reason": "error"}], "usage": {"prompt_tokens": 3}})
    assert failed.finish_reason == "error" and "'error'" in failed.error
    ok = b._parse(req, {"choices": [{"text": "hi", "finish_reason": "length"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 16,
                                  "prompt_tokens_details": {"cached_tokens": 2}}})
    assert (ok.finish_reason, ok.completion_tokens, ok.cached_tokens) == ("length", 16, 2)
    # No per-request seed unless sampling.seed is set (vLLM's CPU engine dies on one).
    assert "seed" not in b._payload(req)[1]
    seeded = HTTPBackend(HTTPConfig(["http://127.0.0.1:1"], "openai"), SamplingParams(0.7, 0.95, 5), 4)
    assert isinstance(seeded._payload(req)[1]["seed"], int)


def test_http_sigterm_cancels_in_flight_requests_quietly_and_a_5xx_storm_is_not_rows(tmp_path, tiny_model):
    server, url = start_server(tiny_model, "--delay-ms", "200")
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(200))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="http",
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


def test_server_args_sglang_would_ignore_are_flagged_or_fixed(caplog):
    from engine.backends.sglang_engine import guard_server_args

    args = {"schedule_policy": "lpm", "max_running_requests": 1024}
    with caplog.at_level("WARNING"):
        assert guard_server_args(args, 4096) == args
    assert "has no effect here" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        guard_server_args(args, 1100)  # 76 waiting: LPM works
    assert not caplog.text
    ngram = {"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 8}
    assert guard_server_args(ngram, 512)["speculative_ngram_max_bfs_breadth"] == 8  # else num_steps = 8 // 10 = 0
    more = {**ngram, "speculative_num_draft_tokens": 12}
    assert "speculative_ngram_max_bfs_breadth" not in guard_server_args(more, 1)
    for cfg_path in ("tier1.toml", "tier2.toml", "prod_smollm2_1.7b_h100.toml"):
        assert load_config(REPO / "runs" / cfg_path).sglang.server_args["schedule_policy"] == "fcfs"


def test_gpu_acceptance_script_runs_every_item_against_the_double(tmp_path, tiny_model):
    """tests/gpu/acceptance.py is the first thing run on a GPU machine: here each of its items runs
    against the SGLang double, so the script itself works before a GPU ever sees it."""
    env = {**os.environ, **double_env(tmp_path, SGLANG_DOUBLE_DELAY_S="0.3", SGLANG_DOUBLE_MAX_RUNNING="2"),
           "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "tests.gpu.acceptance", "--no-gpu-check",
                        "--model", str(tiny_model), "--docs", "6"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    for item in ("2/5 end to end", "4 our logging", "7 stops", "9 full-budget", "11 top_k", "13 NGRAM",
                 "15 runs/tier1.toml", "15 runs/tier2.toml", "16 scheduler killed -> 4", "16 resume",
                 "17 Ctrl-C to the group -> 3 (#1)", "17 resume after Ctrl-C (#2)", "19 nothing left",
                 "20 argument refused"):
        assert any(line.startswith("PASS") and item in line for line in lines), (item, p.stdout)
    assert any(line.startswith("INFO") and "29 tok/s per GPU" in line for line in lines)
    assert "0 failed" in p.stdout
