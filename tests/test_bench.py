"""`engine bench` (= tools/bench, python -m engine.bench): sweep files, one process per config, outcomes,
resume after kill -9, report files."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from conftest import REPO, engine_cli, sample_docs, wait_for, write_jsonl

from engine.bench.driver import FAILURE, OK, OOM, TIMEOUT, classify, metrics
from engine.bench.report import pareto
from engine.bench.sweep import load_sweep
from engine.errors import ConfigError


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "ENGINE_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", str(REPO / "tools" / "bench"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def write_sweep(path: Path, model: Path, docs: Path, results: Path, timeout_s: float = 120, tiers: str = "",
                models: str = "", delay_ms: float = 0) -> Path:
    path.write_text(f"""
[sweep]
name = "test"
results = "{results}"
timeout_s = {timeout_s}
gpu_hour_usd = 2.0

[data]
paths = ["{docs}"]
docs = 8
warmup_docs = 2

[run]
backend = "instant"
prompts = ["faq"]
[run.sampling]
max_new_tokens = 16
[run.instant]
completion_tokens = 12
delay_ms = {delay_ms}

{tiers or '''[tiers.tier1]
vary = { "instant.completion_tokens" = [4, 8] }
[tiers.tier2]
after = "tier1"
vary = { "scheduler.lookahead" = [64, 128] }'''}

{models or f'''[[models]]
name = "{model}"
label = "tiny"
params_b = 0.001
quality = 0.5
reference = {{ default = 10.0, tier1 = 20.0 }}'''}
""")
    return path


@pytest.fixture
def docs(tmp_path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", sample_docs(12))


def read_results(results: Path) -> list[dict]:
    return [orjson.loads(x) for x in (results / "results.jsonl").read_bytes().splitlines() if x.strip()]


def test_sweep_runs_every_config_and_writes_report(tmp_path, tiny_model, docs):
    results = tmp_path / "res"
    sweep = write_sweep(tmp_path / "s.toml", tiny_model, docs, results)
    proc = bench(str(sweep))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = read_results(results)
    # baseline + 2 tier-1 configs + 2 tier-2 configs on top of tier 1's winner
    assert [r["tier"] for r in recs] == ["baseline", "tier1", "tier1", "tier2", "tier2"]
    assert all(r["outcome"] == OK for r in recs), recs
    for r in recs:  # the measured run is the sample only: warm-up documents are not counted
        assert r["docs"] == 8 and r["failed"] == 0 and r["sweep"] == "test"
        assert r["mean_output_tokens"] == r["settings"].get("instant.completion_tokens", 12)
        assert r["output_tokens"] == 8 * r["mean_output_tokens"]
        assert r["gpu_hours_per_b"] == pytest.approx(1e9 / r["output_tok_s_gpu"] / 3600, rel=1e-3)
        assert r["cost_per_b_usd"] == pytest.approx(r["gpu_hours_per_b"] * 2.0, rel=1e-3)
    # tier 2 starts from the best of baseline + tier 1
    best = max((r for r in recs if r["tier"] in ("baseline", "tier1")), key=lambda r: r["output_tok_s_gpu"])
    for r in recs[3:]:
        assert {k: v for k, v in r["settings"].items() if k != "scheduler.lookahead"} == best["settings"]
    md = (results / "report.md").read_text()
    assert "## tiny" in md and "**best**" in md and "speed-up" in md
    with open(results / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {r["outcome"] for r in rows} == {"ok"}
    for name in ("throughput.png", "pareto_size.png", "pareto_quality.png"):
        assert (results / name).read_bytes()[:4] == b"\x89PNG"
    # a rerun skips every finished config
    again = bench(str(sweep))
    assert again.returncode == 0 and again.stdout.count("done before") == 5
    assert len(read_results(results)) == 5
    # the report alone, re-priced: nothing runs, the cost column follows the new price
    priced = bench(str(sweep), "--report-only", "--gpu-hour-usd", "4")
    assert priced.returncode == 0 and "running" not in priced.stdout and "$4.00 per" in priced.stdout
    with open(results / "results.csv") as f:
        for row in csv.DictReader(f):
            assert float(row["cost_per_b_usd"]) == pytest.approx(float(row["gpu_hours_per_b"]) * 4, rel=1e-3)


def test_failures_are_recorded_and_the_sweep_goes_on(tmp_path, tiny_model, docs):
    results = tmp_path / "res"
    models = f'''
[[models]]
name = "{tiny_model}"
label = "dies"
set = {{ "instant.die_after" = 3 }}
[[models]]
name = "{tiny_model}"
label = "slow"
set = {{ "instant.delay_ms" = 1500 }}
[[models]]
name = "{tiny_model}"
label = "fine"
'''
    sweep = write_sweep(tmp_path / "s.toml", tiny_model, docs, results, timeout_s=12, tiers="# baseline only",
                        models=models)
    proc = bench(str(sweep), "--set", "sweep.name=failures")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    by_model = {}
    for r in read_results(results):
        by_model.setdefault(r["model"], []).append(r)
    assert {r["outcome"] for r in by_model["dies"]} == {FAILURE}
    assert "exit status 4" in by_model["dies"][0]["error"]
    assert {r["outcome"] for r in by_model["slow"]} == {TIMEOUT}
    assert {r["outcome"] for r in by_model["fine"]} == {OK}
    assert [r["sweep"] for r in by_model["fine"]] == ["failures"]
    md = (results / "report.md").read_text()
    assert "timeout" in md and "server_failure" in md
    # --retry-failed reruns only what did not end ok
    again = bench(str(sweep), "--retry-failed", "--models", "dies")
    assert again.returncode == 0 and again.stdout.count("running") == 1


def test_killed_sweep_resumes_without_rerunning_finished_configs(tmp_path, tiny_model, docs):
    results = tmp_path / "res"
    sweep = write_sweep(tmp_path / "s.toml", tiny_model, docs, results, delay_ms=150)
    env = {**os.environ, "ENGINE_PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(REPO / "tools" / "bench"), str(sweep)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=REPO)
    def recorded() -> int:
        return len(read_results(results)) if (results / "results.jsonl").exists() else 0
    wait_for(lambda: recorded() >= 2, "two finished configs", 300, proc)
    # the next config is running: its log exists and it has no record yet
    wait_for(lambda: len(list((results / "configs").glob("*/log.txt"))) > recorded(), "a config running", 300, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {r["key"] for r in read_results(results)}
    assert 2 <= len(finished) < 5

    # the config that was running died with the sweep (no orphaned worker still measuring)
    wait_for(lambda: not sweep_workers(results), "the running config to die with the sweep", 60)
    again = bench(str(sweep))
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("done before") == len(finished)
    recs = read_results(results)
    assert len(recs) == 5 and len({r["key"] for r in recs}) == 5
    assert all(r["outcome"] == OK for r in recs)


def test_sigterm_stops_the_sweep_and_its_running_config(tmp_path, tiny_model, docs):
    results = tmp_path / "res"
    sweep = write_sweep(tmp_path / "s.toml", tiny_model, docs, results, delay_ms=150)
    proc = subprocess.Popen([sys.executable, "-m", "engine.bench", str(sweep)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    wait_for(lambda: (results / "results.jsonl").exists() and read_results(results), "a finished config", 600, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "resume" in err, err[-2000:]
    finished = {r["key"] for r in read_results(results)}

    wait_for(lambda: not sweep_workers(results), "the running config to stop with the sweep", 60)
    again = bench(str(sweep))
    assert again.returncode == 0 and again.stdout.count("done before") == len(finished)
    assert len(read_results(results)) == 5


def test_a_stop_request_the_interpreter_swallowed_still_stops_the_running_config(tmp_path, monkeypatch):
    """CI caught a SIGTERM whose exception was raised inside logging's at-fork hook while a config was
    forked ("Exception ignored in ... _releaseLock"): the sweep ran on and exited 0. The handler's flag
    (noted by engine.signals) is what the running config's wait and the next config's start look at."""
    from engine import signals
    from engine.bench import driver
    from engine.signals import Interrupted

    proc_file = tmp_path / "pid"
    cmd = [sys.executable, "-c", f"import os, time; open({str(proc_file)!r}, 'w').write(str(os.getpid())); "
           "time.sleep(300)"]
    monkeypatch.setattr(signals._Stop, "first", "SIGTERM")  # the handler noted it; its exception went nowhere
    with pytest.raises(Interrupted, match="SIGTERM"):
        driver._run_process(cmd, tmp_path / "log.txt", timeout_s=600)
    if proc_file.exists():  # the config started before the poll saw the request: it is gone now
        assert not Path(f"/proc/{proc_file.read_text()}").exists()
    with pytest.raises(Interrupted, match="SIGTERM"):
        driver._check_stop()  # and no further config starts


def sweep_workers(results: Path) -> list[Path]:
    return [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).count(str(results))]


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_bad_sweeps_fail_before_running(tmp_path, tiny_model, docs):
    results = tmp_path / "res"
    sweep = write_sweep(tmp_path / "s.toml", tiny_model, docs, results,
                        tiers='[tiers.tier1]\nvary = { "torch.batch_sise" = [4, 8] }')
    proc = bench(str(sweep))
    assert proc.returncode == 2 and "torch.batch_sise" in proc.stderr and "tiny" in proc.stderr
    assert not (results / "results.jsonl").exists()
    sweep = write_sweep(tmp_path / "s2.toml", tiny_model, docs, results,
                        tiers='[tiers.tier2]\nafter = "tier1"\nvary = { "torch.batch_size" = [4] }')
    with pytest.raises(ConfigError, match="not an earlier tier"):
        load_sweep(sweep)
    sweep = write_sweep(tmp_path / "s3.toml", tiny_model, docs, results,
                        tiers='[tiers.tier1]\nvary = { "input.paths" = [["x"]] }')
    with pytest.raises(ConfigError, match="set by the bench"):
        load_sweep(sweep)
    proc = bench(str(write_sweep(tmp_path / "s4.toml", tiny_model, docs, results)), "--set", "data.docs=500")
    assert proc.returncode == 1 and "12 usable documents" in proc.stderr


def test_engine_bench_is_the_command_and_its_errors_go_through_the_one_handler(tmp_path, tiny_model, docs):
    """`engine bench` is the sweep; tools/bench and `python -m engine.bench` are the same command, so an error
    reads the same (engine.cli's handler: `error: ...`, status 2 for a bad sweep) whichever spelling ran."""
    sweep = write_sweep(tmp_path / "s.toml", tiny_model, docs, tmp_path / "res")
    p = engine_cli("bench", str(sweep), "--dry-run", check=True)
    assert "tiny (" in p.stdout and "baseline + tier1 2, tier2 2 after tier1" in p.stdout
    assert "5 configs, each in its own process" in p.stdout and not (tmp_path / "res" / "results.jsonl").exists()
    wrong = engine_cli("bench", str(sweep), "--models", "tiny,huge", "--dry-run")
    assert wrong.returncode == 2 and "error: --models: unknown huge (the sweep has tiny)" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    missing = str(tmp_path / "nope.toml")
    for proc in (engine_cli("bench", missing), bench(missing),
                 subprocess.run([sys.executable, "-m", "engine.bench", missing], capture_output=True, text=True,
                                cwd=REPO)):
        assert proc.returncode == 2 and proc.stderr.strip() == f"error: sweep file not found: {missing}", proc.stderr
    assert "resumable" in engine_cli("bench", "--help", check=True).stdout.lower()


def test_group_values_apply_settings_together(tmp_path, tiny_model, docs):
    tiers = '''[tiers.tier1]
vary = { "torch.batch_size" = [4, 8], spec = [{}, { "torch.prefix_cache" = false, "torch.refill_fraction" = 1.0 }] }'''
    sw = load_sweep(write_sweep(tmp_path / "s.toml", tiny_model, docs, tmp_path / "r", tiers=tiers))
    configs = sw.expand(sw.models[0], sw.tiers[0], {})
    assert [c.settings for c in configs] == [
        {"torch.batch_size": 4}, {"torch.batch_size": 4, "torch.prefix_cache": False, "torch.refill_fraction": 1.0},
        {"torch.batch_size": 8}, {"torch.batch_size": 8, "torch.prefix_cache": False, "torch.refill_fraction": 1.0}]
    assert len({c.key for c in configs}) == 4


def test_shipped_h100_sweep_is_valid_against_the_pinned_sglang():
    proc = bench("runs/bench/h100_18models.toml", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert len([ln for ln in proc.stdout.splitlines() if "baseline +" in ln]) == 18
    sw = load_sweep(REPO / "runs/bench/h100_18models.toml")
    ref = {m.label: m.reference for m in sw.models}
    assert ref["SmolLM2-1.7B"] == {"default": 5255, "tier1": 5437, "tier2": 9220}  # FIELD.md
    assert ref["SmolLM2-135M"]["tier2"] == 45540


def test_shipped_vllm_and_engine_sweeps_are_valid_against_the_pinned_releases():
    """The 18-model sweep on vLLM, the engine axis (SGLang vs vLLM; torch vs vLLM on CPU): every knob is a
    run-config key and every engine argument exists in vllm 0.32.0 / sglang 0.5.23."""
    proc = bench("runs/bench/h100_18models_vllm.toml", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert len([ln for ln in proc.stdout.splitlines() if "baseline +" in ln]) == 18
    sw = load_sweep(REPO / "runs/bench/h100_18models_vllm.toml")
    assert sw.run["backend"] == "vllm" and {m.label for m in sw.models} == \
        {m.label for m in load_sweep(REPO / "runs/bench/h100_18models.toml").models}
    for name, engines in (("engines.toml", {"sglang", "vllm"}), ("engines_cpu.toml", {"torch", "vllm"}),
                          ("layouts_cpu.toml", {"torch", "vllm"})):
        proc = bench(f"runs/bench/{name}", "--dry-run")
        assert proc.returncode == 0, proc.stderr
        sw = load_sweep(REPO / "runs/bench" / name)
        backends = {sw.run["backend"]}
        for tier in sw.tiers:
            for c in sw.expand(sw.models[0], tier, {}):
                backends.add(sw.run_data(c.settings, {})["backend"])
        assert backends == engines
    sw = load_sweep(REPO / "runs/bench/layouts_cpu.toml")  # both layouts on both backends
    runs = [sw.run_data(c.settings, {}) for t in sw.tiers for c in sw.expand(sw.models[0], t, {})] + [sw.run]
    assert {(r["backend"], r.get("render", {}).get("layout", "document_last")) for r in runs} == \
        {(b, lay) for b in ("torch", "vllm") for lay in ("document_last", "document_first")}


def test_classify_outcomes():
    torch_oom = ("Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. "
                 "GPU 0 has a total capacity of 79.1 GiB")
    assert classify(1, False, torch_oom)[0] == OOM
    oom = "RuntimeError: Not enough memory. Please try to increase --mem-fraction-static."
    assert classify(1, False, oom)[0] == OOM
    assert classify(-signal.SIGKILL, False, "loading weights")[0] == OOM
    assert classify(None, True, "")[0] == TIMEOUT
    outcome, err = classify(4, False, "x\nerror: BackendDead: sglang scheduler died\n")
    assert outcome == FAILURE and "exit status 4" in err and "BackendDead" in err


def test_metrics_known_answer():
    result = {"summary": {"wall_seconds": 10.0, "output_tokens": 50_000, "input_tokens": 120_000,
                          "requests_generated": 100, "failed": 0, "prefix_cache_hit_rate": 0.25,
                          "prompts": ["faq", "math"]},
              "gpus": 2, "startup_s": 1.0, "warmup_s": 2.0, "device": "H100"}
    m = metrics(result, 3.0)
    assert m["output_tok_s"] == 5000 and m["output_tok_s_gpu"] == 2500
    assert m["docs"] == 50 and m["requests"] == 100 and m["docs_s"] == 5  # 2 prompts: 2 requests a document
    assert m["input_tok_s"] == 12000 and m["mean_output_tokens"] == 500
    assert m["gpu_hours_per_b"] == 111.1  # 1e9 / 2500 / 3600 = 111.11, four significant digits
    assert m["cost_per_b_usd"] == 333.3


def test_pareto_frontier():
    # (size, throughput): a model is on the frontier unless another is at least as large and as fast
    pts = [(0.1, 300.0), (0.3, 200.0), (0.2, 150.0), (1.0, 100.0), (1.0, 50.0)]
    assert sorted(pareto(pts)) == [0, 1, 3]


@pytest.mark.slow
def test_shipped_cpu_sweep_end_to_end(tmp_path):
    """The documented command on the shipped CPU sweep: SmolLM2-135M and tiny-random, torch backend."""
    results = tmp_path / "cpu"
    proc = bench("runs/bench/cpu.toml", "--set", f"sweep.results={results}", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = read_results(results)
    assert len(recs) == 10 and all(r["outcome"] == OK for r in recs), [(r["model"], r.get("error")) for r in recs]
    assert {r["model"] for r in recs} == {"SmolLM2-135M", "tiny-random"}
    for r in recs:
        assert r["docs"] == 12 and 0 < r["mean_output_tokens"] <= 64 and r["prefix_cache_hit"] > 0
    assert next(r for r in recs if r["model"] == "tiny-random")["params"] < 5e6  # estimated, not given
    md = (results / "report.md").read_text()
    assert "## SmolLM2-135M" in md and "## tiny-random" in md
    with open(results / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 10
    for name in ("throughput.png", "pareto_size.png"):
        assert (results / name).stat().st_size > 10_000


@pytest.mark.slow
def test_the_prefill_sharing_benchmark_runs_end_to_end(tmp_path):
    """`python -m benchmarks.prefill_sharing` (instant backend, 2 documents, 8 for the order figures): both
    layouts in both passes, the order figures of both layouts, results.json and table.md written; a second
    invocation that measures the order alone (--passes "") keeps the first one's runs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "benchmarks.prefill_sharing", "--docs", "2", "--max-new-tokens", "8",
           "--order-docs", "8", "--lookahead", "16", "--backends", "instant", "--out", "out"]
    for extra in ([], ["--passes", ""]):
        p = subprocess.run(cmd + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    res = orjson.loads((tmp_path / "out" / "results.json").read_bytes())
    layouts = ("document_last", "document_first")
    assert {(o["layout"], o["order"]) for o in res["order"]} == {
        (lay, order) for lay in layouts for order in ("arrival (no buckets)", "length_buckets")}
    assert sorted((r["backend"], r["layout"], r["pass"]) for r in res["runs"]) == sorted(
        [("instant", lay, pas) for lay in layouts for pas in ("fixed length", "natural endings")])
    first = [o for o in res["order"] if o["layout"] == "document_first" and o["order"] == "length_buckets"][0]
    assert first["documents_split_across_batches"] == 0  # batches of 16 = 4 documents x 4 prompts, kept whole
    assert all(r["output_tokens"] == 2 * 4 * 8 for r in res["runs"] if r["pass"] == "fixed length")
    assert "## Quality signals" in (tmp_path / "out" / "table.md").read_text()
