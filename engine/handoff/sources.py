"""The two sources of a training mix, as `engine mix` and `engine export nanotron` read them.

`Sources` says where they are (the run's output directory and the prompts to take; the mix-in files and
their text column) and whether cut-off generated rows are kept. `read_sources` streams both: the run's
rows through the quality gate (generated.py, engine/gate.py) and the original rows through the engine's
reader (mix_in.py), each left-out row counted by reason. `Sources.progress` refuses the output of an
incomplete run unless `allow_incomplete` (engine/output/readiness.py), and that of the model-free `instant`
backend (test filler) unless `allow_test_backend`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.errors import SourceError
from engine.handoff.generated import generated_prompts, generated_rows
from engine.handoff.mix_in import mix_in_rows
from engine.handoff.rows import GENERATED, MIX_IN, Row, Skipped
from engine.output.readiness import RunProgress, check_complete, read_fingerprint


@dataclass(frozen=True)
class Sources:
    output_dir: Path  # the output.dir of an `engine run`
    mix_in: list[str]  # original data: Parquet, JSONL or JSONL.zst files (local or URLs)
    prompts: list[str] | None = None  # prompts of the run to take; None: every prompt it has
    text_column: str = "text"  # the mix-in files' text column
    keep_truncated: bool = False  # keep generated rows cut at max_new_tokens or in a loop (--keep-truncated)
    allow_incomplete: bool = False  # use the rows of a run that is not complete (--allow-incomplete), said loudly
    allow_test_backend: bool = False  # use the rows of the `instant` backend (--allow-test-backend): test filler

    def checked_prompts(self) -> list[str]:
        """The prompts to read: those asked for, each checked to have results, else every prompt of the run."""
        return generated_prompts(self.output_dir, self.prompts)

    def progress(self, say: Callable[[str], object]) -> RunProgress:
        """Whether the run is complete: refused when not, unless allow_incomplete (then `say` what is missing); the
        rows of the model-free `instant` backend (test filler, not language) are refused unless allow_test_backend."""
        fingerprint = read_fingerprint(self.output_dir)
        if fingerprint.get("backend_family") == "instant":
            if not self.allow_test_backend:
                raise SourceError(f"{self.output_dir}: made by the `instant` backend (no model ran: its rows are the "
                                  f"documents' own tokens repeated, test filler, not language); generate with a model, "
                                  f"or pass --allow-test-backend to use them anyway (tests, pipelines checks)")
            say(f"WARNING --allow-test-backend: {self.output_dir} was made by the `instant` backend: its rows are "
                f"test filler, not language")
        return check_complete(self.output_dir, fingerprint, self.allow_incomplete, say)


def read_sources(src: Sources, prompts: list[str], skipped: dict[str, Skipped]) -> dict[str, Iterator[Row]]:
    """Both sources' usable rows, GENERATED then MIX_IN, each in stream order (the same on every pass); the
    rows left out are counted in skipped[GENERATED] / skipped[MIX_IN]."""
    return {GENERATED: generated_rows(src.output_dir, prompts, skipped[GENERATED], src.keep_truncated),
            MIX_IN: mix_in_rows(src.mix_in, src.text_column, skipped[MIX_IN])}
