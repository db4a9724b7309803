"""The argument names of the pinned sglang release, shipped so that configs are validated on machines
without sglang (sglang needs a GPU). `tools/sglang_api.py` regenerates the lists from sglang's own
source, and a test checks them against the installed release.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESERVED = {"model_path": "set from model.name", "skip_tokenizer_init": "the engine passes token ids; always true"}


@cache
def server_arg_names() -> frozenset[str]:
    return frozenset((HERE / "sglang_server_args.txt").read_text().split())


@cache
def sampling_param_names() -> frozenset[str]:
    return frozenset((HERE / "sglang_sampling_params.txt").read_text().split())


def check_server_args(args: dict) -> str | None:
    """A message naming the first bad key, or None."""
    import difflib

    for key in args:
        if key in RESERVED:
            return f"'{key}' is not set here ({RESERVED[key]})"
        if key not in server_arg_names():
            close = difflib.get_close_matches(key, server_arg_names(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            return f"unknown SGLang server argument '{key}'{hint}"
    return None
