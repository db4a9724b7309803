"""The quality gate: which generated rows are *useful* (kept for training), and why the others are not.

One rule, used everywhere a row is judged: the collector's and the state file's counts, `engine status`,
the dataset card, the summary, `engine mix` and `engine export`. A row is useful when

    the model ended it itself (finish_reason "stop": not cut at max_new_tokens ("length"), not stopped
    in a repetition loop ("repetition"), not failed ("error")), and its generation holds more than
    whitespace.

Its completion tokens are the "useful output tokens". `keep_truncated` (mix/export `--keep-truncated`)
also keeps rows cut at max_new_tokens or in a loop: they are never *useful*, but a user may train on them.
`passes_gate` judges one row, `useful_mask` a column of rows (Arrow, vectorised): the two agree
(tests/test_gate.py checks them on the same rows).
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

USEFUL_REASONS = ("stop",)  # finish reasons of rows the model ended itself
CUT_REASONS = ("length", "repetition")  # rows cut short: kept only with keep_truncated

# The reason a row is left out, as `engine mix` / `export` count and print it.
FAILED = "generation failed (finish_reason=error)"
EMPTY = "empty generation"
TRUNCATED = "truncated generation (finish_reason=length; --keep-truncated keeps them)"
REPEATED = "stopped in a repetition loop (finish_reason=repetition; --keep-truncated keeps them)"
UNKNOWN = "unknown finish_reason"

EXPLAINED = ("useful: finished by the model (finish_reason=stop) with a non-blank generation; "
             "rows cut at max_new_tokens, stopped in a loop, failed or blank are not")


def is_blank(text: str | None) -> bool:
    return text is None or not text.strip()


def rejection(finish_reason: str | None, text: str | None, keep_truncated: bool = False) -> str | None:
    """Why a row is left out of training data, or None when it is kept."""
    if finish_reason == "error":
        return FAILED
    if is_blank(text):
        return EMPTY
    if finish_reason in USEFUL_REASONS:
        return None
    if finish_reason == "length":
        return None if keep_truncated else TRUNCATED
    if finish_reason == "repetition":
        return None if keep_truncated else REPEATED
    return UNKNOWN


def passes_gate(finish_reason: str | None, text: str | None) -> bool:
    """A useful row: ended by the model, with more than whitespace."""
    return rejection(finish_reason, text) is None


def useful_mask(finish_reason: pa.Array | pa.ChunkedArray, generation: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`passes_gate` over columns: True where the row is useful (nulls are not)."""
    ended = pc.is_in(finish_reason, value_set=pa.array(USEFUL_REASONS))
    # Python's str.strip() whitespace, as utf8_trim_whitespace trims it (Unicode White_Space)
    filled = pc.not_equal(pc.utf8_length(pc.utf8_trim_whitespace(generation)), 0)
    mask = pc.and_kleene(ended, filled)
    return pc.fill_null(mask, False)


LOW_SHARE = 0.25  # a prompt whose rows are cut this often gets a note saying why its useful share is low


def useful_notes(finish_reasons: dict[str, dict[str, int]], used: dict[str, int], recommended: dict[str, int]
                 ) -> list[str]:
    """Why many rows of a prompt are not useful, where they are not: cut at max_new_tokens (`used`; the prompt
    file recommends `recommended`) or stopped in a repetition loop. `finish_reasons`: rows per reason, per prompt."""
    notes = []
    for name, reasons in finish_reasons.items():
        rows = sum(reasons.values())
        cut, loops = reasons.get("length", 0), reasons.get("repetition", 0)
        if rows and cut >= LOW_SHARE * rows:
            rec, now = recommended.get(name, 0), used.get(name, 0)
            notes.append(f"{name}: {cut:,} of {rows:,} rows cut at max_new_tokens = {now}"
                         + (f"; the prompt recommends {rec}: raise sampling.max_new_tokens, or leave it unset to use "
                            f"each prompt's own" if rec > now else "; raise sampling.max_new_tokens for longer texts"))
        if rows and loops >= LOW_SHARE * rows:
            notes.append(f"{name}: {loops:,} of {rows:,} rows stopped in a repetition loop (the model repeated itself; "
                         f"read them with `engine inspect OUTPUT --finish-reason repetition`)")
    return notes
