"""Peer comparisons and one-off measurements of the engine, each driving the same code as `engine run`.
Not installed with the package: run them from the repository root as `python -m benchmarks.<name>`.
(The model x tier sweep users run is `engine bench`, engine/bench; the hot-path microbenchmarks are
kernels_bench/; the GPU checks are tests/gpu/.)

    host.py        can the host side keep a GPU fed (tokenizer vs Parquet I/O vs the instant-backend engine)
    torch_cpu.py   the torch backend against a naive `model.generate` loop, real SmolLM2-135M on CPU
    vllm_cpu.py    every engine a CPU user can pick (vLLM offline, engine vllm/torch, datatrove + vllm serve)
    storage.py     input read speed: local disk against an S3 store on loopback (tests/support/s3_server.py)
    repetition.py  the repetition stop: useful tokens per second with it on and off
    corpus.py      deterministic web-like documents (also used by kernels_bench/ and tests/gpu/)

README, "Performance", has each one's figures on this machine.
"""
