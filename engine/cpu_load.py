"""Which CPU cores are free for our compute threads right now.

A parallel region of an OpenMP pool runs at the pace of its slowest thread, and a decode step is
hundreds of small regions: one thread that shares its core with another busy process waits a
scheduler time slice at every barrier. Measured here with a busy loop on one of two cores: the torch
backend with 2 threads fell from ~170 to ~1 output tok/s. So on CPU the backends size (torch) or bind
(vLLM) their compute threads to the cores that are not busy at start-up. A machine that gets busy
later is not seen: set `torch.threads` / `vllm.cpu_threads_bind` yourself on shared machines.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
BUSY = 50.0  # percent: a core busier than this (by other processes) is not free


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def free_cores(sample_s: float = 0.3) -> list[int]:
    """The usable cores that were less than half busy over `sample_s` seconds (at least one)."""
    cores = usable_cores()
    try:
        import psutil
        usage = psutil.cpu_percent(interval=sample_s, percpu=True)
    except Exception:  # noqa: BLE001 - no measurement: assume every core is free
        return cores
    free = [c for c in cores if c < len(usage) and usage[c] < BUSY]
    if not free:  # everything is busy: one thread, on the least busy core
        free = [min(cores, key=lambda c: usage[c] if c < len(usage) else 100.0)]
    if len(free) < len(cores):
        log.warning("CPU cores %s are busy with other work: computing on %s only (a thread on a busy core "
                    "slows every step)", sorted(set(cores) - set(free)), free)
    return free
