"""One benchmark config, in its own process: `python -m engine.bench.worker SPEC.json RESULT.json`.

It drives the same code as `engine run` (`engine.run.Run`): the model and backend are started
once, a warm-up run over the warm-up documents goes first (not counted: CUDA graphs, allocator,
caches), then the measured run over the sample. The result file is written only on success; the
driver classifies every other ending (OOM, timeout, crash) from the exit status and the log.
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import orjson

from engine.atomic import write_atomic
from engine.backends import make_backend
from engine.config.run_config import RunConfig, config_from_dict
from engine.errors import RunFailed
from engine.machine import cpu
from engine.model.setup import ModelSetup
from engine.model.size import default_parallelism, estimate_params
from engine.run import Run


def gpus_used(cfg: RunConfig, model_dir, fixed: int | None) -> int:
    """GPUs one config occupies (the divisor of tok/s/GPU); 1 for the CPU backends."""
    if fixed:
        return fixed
    if cfg.backend == "sglang":
        args = default_parallelism(dict(cfg.sglang.server_args), model_dir)
        return int(args.get("tp_size", 1)) * int(args.get("dp_size", 1)) * int(args.get("pp_size", 1))
    if cfg.backend == "vllm" and not device_name(cfg).startswith("CPU "):
        args = cfg.vllm.engine_args
        return int(args.get("tensor_parallel_size", 1)) * int(args.get("data_parallel_size", 1)) * \
            int(args.get("pipeline_parallel_size", 1))
    gpus = 1  # the CPU, or a backend on one device
    return gpus


def device_name(cfg: RunConfig) -> str:
    try:
        import torch
        if cfg.model.device != "cpu" and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001,S110 - only a label; fall back to the CPU's name
        pass
    c = cpu()
    return f"CPU {c.model} x{c.cores}"


def measure(spec: dict) -> dict:
    base = Path(spec["base_dir"])
    out = Path(spec["output_dir"])
    cfg = config_from_dict(spec["run"], base, [])
    setup = ModelSetup.load(cfg)
    t0 = time.perf_counter()
    backend = make_backend(cfg, setup)
    backend.start()
    startup_s = time.perf_counter() - t0
    try:
        warmup_s = 0.0
        if spec.get("warmup_path"):
            warm = config_from_dict(spec["run"], base, [])
            warm.input.paths, warm.output.dir = [spec["warmup_path"]], str(out / "warmup")
            t = time.perf_counter()
            code, _ = Run(warm, overwrite=True, setup=setup, backend=backend).execute()
            if code != 0:
                raise RuntimeError(f"the warm-up run ended with status {code}")
            warmup_s = time.perf_counter() - t
        code, summary = Run(cfg, overwrite=True, setup=setup, backend=backend).execute()
        if code != 0:
            raise RuntimeError(f"the measured run ended with status {code}")
    finally:
        backend.close()
    params = estimate_params(setup.model_dir)
    return {"summary": summary.to_dict(), "startup_s": round(startup_s, 2), "warmup_s": round(warmup_s, 2),
            "gpus": gpus_used(cfg, setup.model_dir, spec.get("gpus")), "params": params,
            "device": device_name(cfg), "model_id": setup.model_name}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = orjson.loads(spec_path.read_bytes())
    try:
        result = measure(spec)
    except RunFailed as exc:
        print(f"error: {type(exc.cause).__name__}: {exc.cause}", file=sys.stderr)
        return exc.code
    write_atomic(result_path, orjson.dumps(result, option=orjson.OPT_INDENT_2))
    if not spec.get("keep_outputs"):
        shutil.rmtree(spec["output_dir"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
