"""Every benchmark of the engine, each driving the same code as `engine run` (`python -m engine.bench.<name>`).

tools/bench (= python -m engine.bench): model x optimisation-tier sweeps
    sweep.py (the SWEEP.toml file) -> driver.py (sample, one process per config, resumable results)
    -> worker.py (warm-up + measured `Run` in that process) -> report.py (Markdown, CSV, PNG).

Side-by-side measurements on this machine (README, "Performance"):
    host.py        can the host side keep a GPU fed (tokenizer vs Parquet I/O vs the instant-backend engine)
    torch_cpu.py   the torch backend against a naive `model.generate` loop, real SmolLM2-135M on CPU
    vllm_cpu.py    every engine a CPU user can pick (vLLM offline, engine vllm/torch, datatrove + vllm serve)
    storage.py     input read speed: local disk against an S3 store on loopback (s3_server.py)
On a GPU machine (README, "On GPUs with SGLang"):
    gpu_acceptance.py   PASS/FAIL per GPU-only check of the SGLang review; gpu_smoke.py  tok/s/GPU, 512 docs
Shared: corpus.py (deterministic web-like documents), s3_server.py (moto's S3 behind a fault injector,
also the storage tests' server).
"""
