"""Hand-off of generated data to training and evaluation: `engine mix`, `engine export nanotron|lighteval`,
`engine compare`. The CLI (engine/cli/handoff.py) builds one spec per command and calls one function.

    sources.py (Sources, read_sources)  <- generated.py (the run's rows through engine/gate.py)
                                        <- mix_in.py (original rows through engine/input's reader)
                                        <- rows.py (Row, Skipped, the sources' names)
    tokenizer.py        the training tokenizer, its document separator, its copy in an export
    mix.py              MixSpec -> run_mix: a token-ratio mix, zstd Parquet
    nanotron_export.py  NanotronExport -> export_nanotron: tokenizer -> rows -> token_files.py (datatrove
                        .ds files) -> nanotron.py (weights, coverage, nanotron.yaml); the path in its docstring
    lighteval_export.py LightevalExport -> export_lighteval: early_signal_tasks.py (the cloze suite) + command
    compare.py          lighteval results -> one table
"""
from __future__ import annotations

from engine.errors import SourceError

# Synthetic share of tokens: 50/50 by default; the field's sweep found 60-80 % best for structured prompts.
PRESETS = {"default": 0.5, "faq": 0.6, "tutorial": 0.6, "table": 0.7, "math": 0.8}


def check_ratio(ratio: float) -> float:
    """The synthetic share of tokens, refused unless strictly between 0 and 1 (checked before any token is
    counted: that can take hours on real data)."""
    if not 0 < ratio < 1:
        raise SourceError(f"--ratio {ratio}: the synthetic share must be between 0 and 1 (exclusive)")
    return ratio
