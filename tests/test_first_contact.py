"""First contact, through the command line (`engine_main`: the CLI's own dispatch and error handler, in this
process): a config that cannot run is status 2 before any model loads; `engine run --dry-run` checks,
counts, renders and estimates, and writes nothing; `engine inspect` shows and filters rows. The launchers'
dry-runs are in test_launch.py."""
from __future__ import annotations

import json
import os
import shutil
import tomllib

import pytest
from conftest import REPO, engine_main, sample_docs, write_config, write_jsonl

from engine.output.record import load_summary
from engine.plan import PUBLISHED, model_key

PROMPTS = ("faq", "math")
MODEL_LOADED = "tokenizer and config loaded"  # engine.run's log line once the model's tokenizer is loaded


def _config(tmp_path, model, n=30, **sections):
    sections.setdefault("report", {"enabled": False})
    return write_config(tmp_path / "r.toml", model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(n))],
                        tmp_path / "out", prompts=PROMPTS, **sections)


# ---- a config that cannot run: status 2, before the model loads, nothing written ------------------------------
def test_cuda_on_a_machine_without_cuda_is_status_2_before_any_model_load(tmp_path, tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = _config(tmp_path, tiny_model)
    for device in ("cuda", "cuda:1"):
        p = engine_main("run", str(cfg), "--set", 'backend="torch"', "--set", f'model.device="{device}"')
        assert p.returncode == 2, p.stderr
        assert "model.device" in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert MODEL_LOADED not in p.stderr, "the model was loaded before the device was checked"
        assert not (tmp_path / "out").exists()
    dry = engine_main("run", str(cfg), "--set", 'backend="torch"', "--set", 'model.device="cuda"', "--dry-run")
    assert dry.returncode == 2 and "model.device" in dry.stderr


@pytest.mark.parametrize("override, key", [
    ('model.device="banana"', "model.device"),
    ('model.name="/nonexistent/model-dir"', "model.name"),
])
def test_configs_that_cannot_start_are_status_2(tmp_path, tiny_model, override, key):
    cfg = _config(tmp_path, tiny_model)
    p = engine_main("run", str(cfg), "--set", 'backend="torch"', "--set", override)
    assert p.returncode == 2 and f"config key '{key}'" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


def test_a_backend_that_is_not_installed_is_status_2(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setitem(__import__("engine.preflight").preflight.REQUIRES, "torch", ("no_such_package_h7",))
    p = engine_main("run", str(_config(tmp_path, tiny_model)), "--set", 'backend="torch"')
    assert p.returncode == 2 and "no_such_package_h7" in p.stderr and MODEL_LOADED not in p.stderr, p.stderr


def test_an_output_dir_beneath_a_file_is_status_1_before_any_model_load(tmp_path, tiny_model):
    (tmp_path / "a-file").write_text("")  # status 1 as for any path that cannot be written (test_cli_manners.py)
    p = engine_main("run", str(_config(tmp_path, tiny_model, output={"dir": str(tmp_path / "a-file" / "out")})))
    assert p.returncode == 1 and "output.dir" in p.stderr and "is not a directory" in p.stderr, p.stderr
    assert MODEL_LOADED not in p.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_output_dir_that_cannot_be_written_is_status_1_before_any_model_load(tmp_path, tiny_model):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        p = engine_main("run", str(_config(tmp_path, tiny_model, output={"dir": str(locked / "out")})))
    finally:
        locked.chmod(0o700)
    assert p.returncode == 1 and "not writable" in p.stderr and MODEL_LOADED not in p.stderr, p.stderr


# ---- engine run --dry-run --------------------------------------------------------------------------------------
def test_dry_run_writes_nothing_and_its_counts_match_the_run(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model, instant={"completion_tokens": 8})
    p = engine_main("run", str(cfg), "--dry-run", "--throughput", "1000", check=True)
    assert not (tmp_path / "out").exists(), "a dry run created output.dir"
    text = p.stdout
    assert "input      30 rows" in text and "requests   60 (30 rows x 2 prompt(s)" in text, text
    for name in PROMPTS:
        assert f"--- sample prompt: {name} ---" in text
    assert sample_docs(1)[0]["text"].split("\n")[0] in text  # the first document, rendered
    prompt_total = int(text.split("tokens     prompt ~")[1].split(", output")[0].replace(",", ""))
    out_max = int(text.split("output at most ")[1].split(" ")[0].replace(",", ""))
    assert out_max == 60 * 16  # max_new_tokens 16 (conftest's config) for each of the 60 requests
    hours = out_max / 1000 / 3600
    assert f"{hours:,.2f} GPU-hours" in text and "[--throughput (yours)]" in text, text
    # the real run: every document was sampled, so its prompt tokens are the estimate exactly
    engine_main("run", str(cfg), check=True)
    summary = load_summary(tmp_path / "out" / "summary.json")
    assert summary.process.input_tokens == prompt_total
    assert 0 < summary.process.output_tokens <= out_max
    again = engine_main("run", str(cfg), "--dry-run", check=True)  # an output of this config: a run resumes it
    assert "a run resumes them" in again.stdout


def test_dry_run_refuses_what_the_run_would_refuse_and_writes_nothing(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model)
    engine_main("run", str(cfg), check=True)
    fp = tmp_path / "out" / "_run" / "fingerprint.json"
    before = fp.read_bytes(), fp.stat().st_mtime_ns
    p = engine_main("run", str(cfg), "--dry-run", "--set", "sampling.max_new_tokens=32")
    assert p.returncode == 2 and "different run configuration" in p.stderr, p.stderr
    assert (fp.read_bytes(), fp.stat().st_mtime_ns) == before
    over = engine_main("run", str(cfg), "--dry-run", "--overwrite", "--set", "sampling.max_new_tokens=32", check=True)
    assert "output at most 1,920" in over.stdout  # 60 requests x 32
    assert (fp.read_bytes(), fp.stat().st_mtime_ns) == before  # --overwrite in a dry run deletes nothing


def test_dry_run_estimates_from_published_and_benchmarked_figures(tmp_path, tiny_model):
    model = shutil.copytree(tiny_model, tmp_path / "SmolLM2-1.7B-Instruct")
    cfg = _config(tmp_path, model)
    results = tmp_path / "bench" / "results.jsonl"
    results.parent.mkdir()
    recs = [{"model": "SmolLM2-1.7B", "model_name": "HuggingFaceTB/SmolLM2-1.7B-Instruct", "outcome": "ok",
             "output_tok_s_gpu": 7000.0, "device": "NVIDIA H200", "tier": "tier1", "knobs": "max_num_seqs=512"},
            {"model": "SmolLM2-1.7B", "model_name": "HuggingFaceTB/SmolLM2-1.7B-Instruct", "outcome": "oom",
             "output_tok_s_gpu": 99999.0, "device": "NVIDIA H200", "tier": "tier2"},
            {"model": "Qwen3-8B", "model_name": "Qwen/Qwen3-8B", "outcome": "ok", "output_tok_s_gpu": 1234.0,
             "device": "NVIDIA H200", "tier": "baseline"}]
    results.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"cut by a kill')
    text = engine_main("run", str(cfg), "--dry-run", "--bench", str(results.parent), check=True).stdout
    assert "5,255 tok/s/GPU" in text and "9,220 tok/s/GPU" in text and "H100" in text, text
    assert "7,000 tok/s/GPU" in text and "NVIDIA H200" in text, text
    assert "99,999" not in text and "1,234" not in text  # a failed config, another model
    bare = engine_main("run", str(_config(tmp_path, tiny_model)), "--dry-run", check=True).stdout
    assert "no throughput figure" in bare and "--throughput" in bare


def test_the_published_table_is_the_sweeps_reference():
    sweep = tomllib.loads((REPO / "runs" / "bench" / "h100_18models_vllm.toml").read_text())
    table = {model_key(m["name"]): (m["reference"]["default"], max(m["reference"].values()))
             for m in sweep["models"]}
    assert table == PUBLISHED


# ---- engine inspect --------------------------------------------------------------------------------------------
@pytest.fixture
def mixed_output(tmp_path, tiny_model):
    """An output with stop and error rows for two prompts (instant backend: 8 tokens under max_new_tokens 16;
    a third of the requests fail once, and one attempt is all they get)."""
    cfg = _config(tmp_path, tiny_model, n=40, instant={"completion_tokens": 8, "fail_rate": 0.3},
                  retry={"max_attempts": 1, "max_error_fraction": 1.0}, sampling={"seed": 1})
    engine_main("run", str(cfg), check=True)
    return tmp_path / "out"


def test_inspect_shows_source_beside_generation_per_prompt_and_finish_reason(mixed_output):
    text = engine_main("inspect", str(mixed_output), "--width", "120", check=True).stdout
    for name in PROMPTS:
        assert f"=== {name}: error " in text and f"--- {name} / finish_reason stop: 3 of " in text, text
    assert "SOURCE" in text and "| GENERATION" in text
    assert max(len(line) for line in text.splitlines()) <= 120
    narrow = engine_main("inspect", str(mixed_output), "--width", "60", check=True).stdout
    assert "source:" in narrow and "generation:" in narrow and "SOURCE" not in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 60


def test_inspect_filters(mixed_output):
    only_math = engine_main("inspect", str(mixed_output), "--prompt", "math", check=True).stdout
    assert "=== math" in only_math and "=== faq" not in only_math
    errors = engine_main("inspect", str(mixed_output), "--finish-reason", "error", "-n", "2", "--width", "200",
                         check=True).stdout
    heads = [line for line in errors.splitlines() if line.startswith("id ")]
    assert len(heads) == 4 and all("finish error" in h and "injected failure" in h for h in heads), errors
    doc = sample_docs(40)[7]
    one = engine_main("inspect", str(mixed_output), "--id", doc["id"], "--width", "200", check=True).stdout
    heads = [line for line in one.splitlines() if line.startswith("id ")]
    assert len(heads) == 2 and all(h.startswith(f"id {doc['id']} ") for h in heads), one  # one row per prompt
    assert doc["text"].split("\n")[0][:40] in one
    missing = engine_main("inspect", str(mixed_output), "--prompt", "table")
    assert missing.returncode == 2 and "prompts there: faq, math" in missing.stderr
    nothing = engine_main("inspect", str(mixed_output), "--id", "no-such-doc")
    assert nothing.returncode == 2 and "no row" in nothing.stderr
