"""The argument names of the pinned SGLang and vLLM releases, shipped so that configs are validated on
machines without them (sglang needs a GPU; vllm is a large install). `tools/sglang_api.py` and
`tools/vllm_api.py` regenerate the lists from each release's own source, and tests check them
against the installed releases.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESERVED = {"model_path": "set from model.name", "skip_tokenizer_init": "the engine passes token ids; always true"}
VLLM_RESERVED = {"model": "set from model.name", "tokenizer": "the model's own tokenizer is used (model.name)",
                 "skip_tokenizer_init": "the engine passes token ids and decodes them itself"}


@cache
def _names(file: str) -> frozenset[str]:
    return frozenset((HERE / file).read_text().split())


def server_arg_names() -> frozenset[str]:
    return _names("sglang_server_args.txt")


def sampling_param_names() -> frozenset[str]:
    return _names("sglang_sampling_params.txt")


def vllm_engine_arg_names() -> frozenset[str]:
    return _names("vllm_engine_args.txt")


def _check(args: dict, names: frozenset[str], reserved: dict, what: str) -> str | None:
    import difflib

    for key in args:
        if key in reserved:
            return f"'{key}' is not set here ({reserved[key]})"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            return f"unknown {what} '{key}'{hint}"
    return None


def check_server_args(args: dict) -> str | None:
    """A message naming the first bad SGLang server argument, or None."""
    return _check(args, server_arg_names(), RESERVED, "SGLang server argument")


def check_vllm_engine_args(args: dict) -> str | None:
    """A message naming the first bad vLLM engine argument (`EngineArgs` field), or None."""
    return _check(args, vllm_engine_arg_names(), VLLM_RESERVED, "vLLM engine argument")
