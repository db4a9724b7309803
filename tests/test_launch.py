"""Scale-out: Slurm job-array scripts (checked, and their task body run locally) and Ray shards. `engine launch
ray` is a process of its own (Ray starts and kills shard processes); the other commands run in this process
(`engine_main`)."""
import importlib.util
import json
import os
import subprocess
import threading

import orjson
import pytest
from conftest import engine_cli, engine_main, sample_docs, wait_for, write_config, write_jsonl
from test_recovery import check_exactly_once

from engine.errors import RESUMABLE

PROMPTS = ("faq", "math")


def test_slurm_script_directives_and_dry_run(tmp_path, tiny_model):
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(10))],
                       tmp_path / "out")
    p = engine_main("launch", "slurm", str(cfg), "--shards", "8", "--max-concurrent", "3", "--partition", "gpu",
                   "--account", "proj", "--qos", "high", "--time", "04:00:00", "--sbatch=--mem=64G", "--dry-run",
                   check=True)
    script = p.stdout
    directives = {line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")}
    for directive in ("--array=0-7%3", "--partition=gpu", "--account=proj", "--qos=high", "--time=04:00:00",
                      "--gres=gpu:1", "--signal=B:TERM@300", "--requeue", "--open-mode=append", "--mem=64G"):
        assert directive in directives, directive
    assert any(d.startswith("--output=") and d.endswith("/_logs/%A_%a.out") for d in directives)
    assert '--shard "${SLURM_ARRAY_TASK_ID}/8"' in script and "scontrol requeue" in script
    (tmp_path / "s.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "s.sh")]).returncode == 0
    assert not (tmp_path / "out" / "_run").exists()  # a dry run writes nothing


def test_slurm_gpus_per_shard_takes_whole_numbers(tmp_path, tiny_model):
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(10))],
                       tmp_path / "out")
    cpu = engine_main("launch", "slurm", str(cfg), "--shards", "2", "--gpus-per-shard", "0", "--dry-run", check=True)
    assert "--gres" not in cpu.stdout  # a partition without GPUs refuses any gres request
    two = engine_main("launch", "slurm", str(cfg), "--shards", "2", "--gpus-per-shard", "2", "--dry-run", check=True)
    assert "#SBATCH --gres=gpu:2\n" in two.stdout
    for bad in ("0.5", "1.5", "-1"):
        p = engine_main("launch", "slurm", str(cfg), "--shards", "2", f"--gpus-per-shard={bad}", "--dry-run")
        assert p.returncode == 2 and "whole number of GPUs" in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert "#!/bin/bash" not in p.stdout


def test_slurm_warns_when_the_time_limit_leaves_less_than_the_measured_startup(tmp_path, tiny_model):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(10))], out)
    engine_main("launch", "slurm", str(cfg), "--shards", "2", check=True)
    (out / "_state").mkdir(parents=True)
    assert "start-up" not in engine_main("launch", "slurm", str(cfg), "--shards", "2", "--time", "10",
                                        "--signal-seconds", "300", check=True).stderr  # nothing measured yet
    state = {"shard": "s00000-of-00002", "complete": False, "prompts": {}, "startup_s": 500.0}
    (out / "_state" / "s00000-of-00002.json").write_text(json.dumps(state))
    short = engine_main("launch", "slurm", str(cfg), "--shards", "2", "--time", "10", "--signal-seconds", "60",
                       check=True)  # 600 s - 60 s - 60 s (Slurm may signal early) < 500 s: no progress ever
    assert "less than the 500 s start-up" in short.stderr, short.stderr
    fine = engine_main("launch", "slurm", str(cfg), "--shards", "2", "--time", "1:00:00", check=True)
    assert "start-up" not in fine.stderr, fine.stderr
    none = engine_main("launch", "slurm", str(cfg), "--shards", "2", "--time", "5")  # 300 s <= 300 s: refused
    assert none.returncode == 2 and "leaves no time" in none.stderr, none.stderr
    # a start-up counted from the process's start (imports, model, input) is the one that counts
    state["process_startup_s"] = 700.0
    (out / "_state" / "s00000-of-00002.json").write_text(json.dumps(state))
    longer = engine_main("launch", "slurm", str(cfg), "--shards", "2", "--time", "12", "--signal-seconds", "60",
                        check=True)  # 720 - 120 = 600 s: more than startup_s, less than process_startup_s
    assert "less than the 700 s start-up" in longer.stderr, longer.stderr


def test_slurm_dry_run_checks_the_time_limit_and_writes_nothing(tmp_path, tiny_model):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(4))], out)
    for bad, why in (("banana", "not a Slurm time limit"), ("1:2:3:4", "not a Slurm time limit"),
                     ("00:04:00", "leaves no time to generate"), ("0", "leaves no time to generate")):
        p = engine_main("launch", "slurm", str(cfg), "--shards", "2", "--time", bad, "--dry-run")
        assert p.returncode == 2 and why in p.stderr and "Traceback" not in p.stderr, (bad, p.stderr)
        assert "#!/bin/bash" not in p.stdout
    ok = engine_main("launch", "slurm", str(cfg), "--shards", "2", "--time", "00:04:00", "--signal-seconds", "60",
                     "--dry-run", check=True)  # 240 - 60 - 60 s > 0
    assert "#SBATCH --time=00:04:00" in ok.stdout and "nothing was written or submitted" in ok.stderr
    assert not out.exists()


def test_slurm_cpus_per_shard_default_follows_the_gpus(tmp_path, tiny_model):
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(4))],
                       tmp_path / "out")
    for extra, cpus in (((), 8), (("--gpus-per-shard", "2"), 10), (("--gpus-per-shard", "0"), 4),
                        (("--cpus-per-shard", "3"), 3)):
        p = engine_main("launch", "slurm", str(cfg), "--shards", "2", *extra, "--dry-run", check=True)
        assert f"#SBATCH --cpus-per-task={cpus}\n" in p.stdout, (extra, p.stdout)


@pytest.mark.parametrize("scheduler", ["slurm", "ray"])
def test_dry_runs_refuse_a_shard_count_the_output_was_not_made_with(tmp_path, tiny_model, scheduler):
    if scheduler == "ray":
        pytest.importorskip("ray")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(8))], out,
                       report={"enabled": False})
    engine_main("run", str(cfg), check=True)  # one shard
    for extra in (("--dry-run",), ()):  # the real launch checks the same
        p = engine_main("launch", scheduler, str(cfg), "--shards", "4", *extra)
        assert p.returncode == 2 and "made with 1 shard(s)" in p.stderr and "--shards 1" in p.stderr, p.stderr
    assert not (out / "_logs").exists() and not list((out / "_run").glob("slurm-*.sbatch"))
    done = engine_main("launch", scheduler, str(cfg), "--shards", "1", "--dry-run", check=True)
    assert "nothing to launch" in done.stdout


def test_ray_dry_run_starts_nothing_and_lists_the_shards(tmp_path, tiny_model):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(4))], out)
    p = engine_main("launch", "ray", str(cfg), "--shards", "3", "--gpus-per-shard", "1", "--dry-run", check=True)
    assert "Would run 3 of 3 shards on Ray" in p.stdout and "1 GPU and 8 (at most a node's CPUs) CPU" in p.stdout
    assert all(f"--shard {i}/3" in p.stdout for i in range(3)), p.stdout
    assert not out.exists()  # no logs directory, no part: nothing ran
    bad = engine_main("launch", "ray", str(cfg), "--shards", "3", "--set", "sampling.top_p=7", "--dry-run")
    assert bad.returncode == 2 and "sampling.top_p" in bad.stderr


@pytest.mark.parametrize("code", sorted({0, 1, 2, 5, *(int(c) for c in RESUMABLE)}))
def test_slurm_task_requeues_on_every_resumable_status(tmp_path, tiny_model, code):
    """The task body with the engine replaced by a process that exits `code`, and a recording `scontrol`:
    requeued exactly for the statuses in engine.errors.RESUMABLE, and the status is the script's own."""
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(4))],
                       tmp_path / "out")
    script = engine_main("launch", "slurm", str(cfg), "--shards", "2", "--dry-run", check=True).stdout
    body = [line for line in script.splitlines() if line.endswith('/2" &')]
    assert len(body) == 1, script
    (tmp_path / "s.sh").write_text(script.replace(body[0], f"sh -c 'exit {code}' &"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "1",
           "SLURM_ARRAY_JOB_ID": "4242", "SLURM_JOB_ID": "4243", "SLURM_RESTART_COUNT": "2"}
    proc = subprocess.run(["bash", str(tmp_path / "s.sh")], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    calls = (tmp_path / "scontrol.calls").read_text().splitlines() if (tmp_path / "scontrol.calls").exists() else []
    assert calls == (["requeue 4242_1"] if code in RESUMABLE else []), calls
    for text in (proc.stdout, proc.stderr):  # a first and a last line per attempt, in both logs
        lines = text.strip().splitlines()
        assert lines[0].startswith("=== start shard 1/2: job 4243 (array task 4242_1), SLURM_RESTART_COUNT=2"), text
        assert lines[-1].startswith("=== end shard 1/2") and f": exit {code}" in lines[-1], text
        assert ("(resumable: requeued)" in lines[-1]) == (code in RESUMABLE), lines[-1]


def test_slurm_task_body_runs_shards_and_relaunch_skips_complete(tmp_path, tiny_model):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(40))], out,
                       prompts=PROMPTS)
    engine_main("launch", "slurm", str(cfg), "--shards", "2", check=True)
    (script,) = (out / "_run").glob("slurm-*.sbatch")
    for i in range(2):
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_JOB_ID": "4242", "SLURM_JOB_ID": "99"}
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    check_exactly_once(out, {d["id"] for d in sample_docs(40)}, PROMPTS)
    again = engine_main("launch", "slurm", str(cfg), "--shards", "2", check=True)
    assert "all 2 shards" in again.stdout and "nothing to launch" in again.stdout


def test_slurm_relaunch_lists_only_unfinished_shards(tmp_path, tiny_model):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(30))], out)
    engine_main("run", str(cfg), "--shard", "1/3", check=True)
    p = engine_main("launch", "slurm", str(cfg), "--shards", "3", "--dry-run", check=True)
    assert "#SBATCH --array=0,2\n" in p.stdout


@pytest.fixture
def ray_available():
    pytest.importorskip("ray")


def _kill_when_started(out, pattern: str, killed: list):
    """kill -9 shard 1 once it has journaled rows (its readiness signal), from a thread."""
    try:
        wait_for(lambda: list((out / "_journal" / "faq").glob("s00001-of-00004-*.arrows")), "shard 1 started", 600)
    except AssertionError:
        return  # the test then fails on `killed`, saying so
    if subprocess.run(["pkill", "-9", "-f", pattern]).returncode == 0:
        killed.append(True)


def test_ray_runs_shards_retries_a_killed_one_exactly_once(tmp_path, tiny_model, ray_available):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(1200))], out,
                       prompts=PROMPTS, instant={"delay_ms": 2.0}, output={"flush_seconds": 0.2})
    killed: list = []
    killer = threading.Thread(target=_kill_when_started, args=(out, f"{cfg} --shard 1/4", killed))
    killer.start()
    p = engine_cli("launch", "ray", str(cfg), "--shards", "4", "--max-retries", "3", timeout=900)
    killer.join()
    assert p.returncode == 0, p.stdout + p.stderr
    assert killed, "shard 1 was never killed: the test did not exercise a retry"
    log = (out / "_logs" / "shard-00001.log").read_text()
    assert log.count("--- attempt") >= 2  # killed, then run again by Ray, resuming from its journal
    check_exactly_once(out, {d["id"] for d in sample_docs(1200)}, PROMPTS)
    status = engine_main("status", str(out), "--check")
    assert status.returncode == 0 and "4/4 shards complete" in status.stdout


def test_ray_launch_sigterm_stops_every_shard_then_resumes(tmp_path, tiny_model, ray_available):
    import signal
    import sys
    from pathlib import Path

    from conftest import REPO

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(2000))], out,
                       prompts=PROMPTS, instant={"delay_ms": 3.0}, output={"flush_seconds": 0.2})
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "launch", "ray", str(cfg), "--shards", "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list((out / "_journal").rglob("*.arrows")), "a shard with journaled rows", 600, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]

    def shard_processes():
        found = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and str(cfg) in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(p.name)
            except OSError:
                pass
        return found
    wait_for(lambda: not shard_processes(), "every shard's engine run to stop with the launcher", 60)
    p = engine_cli("launch", "ray", str(cfg), "--shards", "2", timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    check_exactly_once(out, {d["id"] for d in sample_docs(2000)}, PROMPTS)


def test_ray_with_the_tiny_model(tmp_path, tiny_model, ray_available):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(24))], out,
                       backend="torch", prompts=PROMPTS, sampling={"max_new_tokens": 4, "temperature": 0.0})
    p = engine_cli("launch", "ray", str(cfg), "--shards", "4", timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    check_exactly_once(out, {d["id"] for d in sample_docs(24)}, PROMPTS)
    again = engine_cli("launch", "ray", str(cfg), "--shards", "4", check=True)
    assert "nothing to launch" in again.stdout


def test_sglang_defaults_to_one_replica_per_gpu_for_small_models(tiny_model, monkeypatch, tmp_path):
    import os

    from engine.model.size import default_parallelism, estimate_params

    # The GPUs are counted by nvidia-smi, not torch.cuda (which would initialise CUDA in the run's process).
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\nprintf '81559\\n81559\\n81559\\n81559\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert 0 < estimate_params(tiny_model) < 10**6
    assert default_parallelism({}, tiny_model) == {"dp_size": 4}
    assert default_parallelism({"tp_size": 2}, tiny_model) == {"tp_size": 2}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert default_parallelism({}, tiny_model) == {"dp_size": 2}
    monkeypatch.setattr("engine.model.size.estimate_params", lambda d: 70 * 10**9)  # 140 GB of bf16 weights
    assert default_parallelism({}, tiny_model) == {}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr("engine.model.size.estimate_params", lambda d: 10**6)
    assert default_parallelism({}, tiny_model) == {}


def test_workers_launch_dry_runs_and_refusals(tmp_path, tiny_model):
    """--workers: the array runs `engine run CONFIG` (no --shard) with the unit size passed on; an output made by
    static shards is refused by --workers and one made by workers by --shards; a complete one launches nothing."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(8))], out,
                       report={"enabled": False})
    p = engine_main("launch", "slurm", str(cfg), "--workers", "3", "--gpus-per-shard", "0", "--dry-run", check=True)
    assert "#SBATCH --array=0-2\n" in p.stdout
    body = [ln for ln in p.stdout.splitlines() if "engine.cli run" in ln]
    assert body and "--shard" not in body[0] and "input.unit_rows=2000" in body[0], body
    assert "=== start $attempt" in p.stdout and 'attempt="worker ${SLURM_ARRAY_TASK_ID:-?}/3' in p.stdout
    if importlib.util.find_spec("ray") is not None:
        r = engine_main("launch", "ray", str(cfg), "--workers", "2", "--dry-run", check=True)
        assert "Would run 2 of 2 workers on Ray" in r.stdout and "--shard" not in r.stdout, r.stdout
    engine_main("run", str(cfg), check=True)  # a static output
    refused = engine_main("launch", "slurm", str(cfg), "--workers", "3", "--dry-run")
    assert refused.returncode == 2 and "was made by static shards" in refused.stderr, refused.stderr
    units = tmp_path / "units"
    cfg2 = write_config(tmp_path / "u.toml", tiny_model, [write_jsonl(tmp_path / "in2.jsonl", sample_docs(8))], units,
                        input={"unit_rows": 3}, report={"enabled": False})
    engine_main("run", str(cfg2), check=True)  # a worker: 3 units, all committed
    static = engine_main("launch", "slurm", str(cfg2), "--shards", "2", "--dry-run")
    assert static.returncode == 2 and "is being made by workers" in static.stderr, static.stderr
    other = engine_main("launch", "slurm", str(cfg2), "--workers", "2", "--set", "input.unit_rows=4", "--dry-run")
    assert other.returncode == 2 and "input.unit_rows = 3, not 4" in other.stderr, other.stderr
    done = engine_main("launch", "slurm", str(cfg2), "--workers", "2", "--dry-run", check=True)
    assert "all 3 units" in done.stdout and "nothing to launch" in done.stdout


def test_ray_runs_workers_and_a_killed_one_rejoins_exactly_once(tmp_path, tiny_model, ray_available):
    import psutil

    out = tmp_path / "out"
    n = 900
    cfg = write_config(tmp_path / "r.toml", tiny_model, [write_jsonl(tmp_path / "in.jsonl", sample_docs(n))], out,
                       prompts=PROMPTS, instant={"delay_ms": 4.0}, input={"unit_rows": 50},
                       output={"flush_seconds": 0.2, "lease_heartbeat_seconds": 0.5, "lease_timeout_seconds": 3.0})
    killed: list = []

    def kill_one():  # kill -9 one worker once it holds a unit (its readiness: a lease record with its pid)
        def holder():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if f"run {cfg}" in cmd and "engine.cli" in cmd and "launch" not in cmd:
                    for p in (out / "_lease").glob("u*.json") if (out / "_lease").is_dir() else []:
                        try:
                            rec = orjson.loads(p.read_bytes())
                        except (OSError, ValueError):
                            continue
                        if rec.get("pid") == proc.pid and not rec.get("committed"):
                            return proc
            return None
        try:
            proc = wait_for(holder, "a worker holding a unit", 600)
        except AssertionError:
            return
        proc.kill()
        killed.append(proc.pid)
    killer = threading.Thread(target=kill_one)
    killer.start()
    p = engine_cli("launch", "ray", str(cfg), "--workers", "2", "--max-retries", "3", timeout=900)
    killer.join()
    assert p.returncode == 0, p.stdout + p.stderr
    assert killed, "no worker was killed: the test did not exercise a takeover"
    check_exactly_once(out, {d["id"] for d in sample_docs(n)}, PROMPTS)
    status = engine_main("status", str(out), "--check")
    assert status.returncode == 0 and "18/18 units committed" in status.stdout, status.stdout
