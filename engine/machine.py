"""What the engine needs to know about this machine: its CPU (the one reader of /proc/cpuinfo) and GPUs.

`cpu()` parses it once (model name, flags, core count); `cpu_has_bf16()` says whether bfloat16 matmuls
run natively (AVX512-BF16 or AMX: 3-4x float32 here), `cpu_isa()` names the widest vector ISA and
`cpu_label()` is the line benchmarks print beside their figures ("which CPU they ran on").
Its GPUs: `gpu_memories()` (each visible GPU's memory, from nvidia-smi, without initialising CUDA).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class CpuInfo:
    model: str  # "AMD EPYC 9R14 96-Core Processor", or the platform's name where /proc/cpuinfo is missing
    flags: frozenset[str]
    cores: int  # logical CPUs of the machine (os.cpu_count())


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor listed in a /proc/cpuinfo text."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return model, flags


@lru_cache(maxsize=1)
def cpu() -> CpuInfo:
    try:
        with open("/proc/cpuinfo") as f:
            model, flags = parse_cpuinfo(f.read())
    except OSError:
        model, flags = "", frozenset()
    return CpuInfo(model or platform.processor() or platform.machine() or "?", flags, os.cpu_count() or 1)


def cpu_has_bf16() -> bool:
    """bfloat16 matmuls are 3-4x faster than float32 on CPUs with AVX512-BF16 or AMX (measured here)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu().flags)


def cpu_isa() -> str:
    f = cpu().flags
    return ("AMX" if "amx_bf16" in f else "AVX512-BF16" if "avx512_bf16" in f else "AVX512" if "avx512f" in f
            else "AVX2" if "avx2" in f else "no AVX2")


def cpu_label() -> str:
    """'<model>, <ISA>, <n> cores': the CPU a benchmark ran on."""
    c = cpu()
    return f"{c.model}, {cpu_isa()}, {c.cores} cores"


def gpu_memories() -> list[int]:
    """Total memory (bytes) of each visible GPU, from nvidia-smi: asking torch.cuda would initialise CUDA
    in this process, and SGLang's schedulers want all of every GPU's memory (review finding 31)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    mems = [int(float(x)) * 1024 ** 2 for x in out.split() if x.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # nvidia-smi lists every GPU of the node
        mems = [m for i, m in enumerate(mems) if str(i) in {v.strip() for v in visible.split(",") if v.strip()}]
    return mems
