"""A row of training text, the count of rows left out by reason, and the two sources' names.

`Row` is one document of either source; `Skipped` counts, by reason, the rows left out (engine/gate.py's
reasons for generated rows, the reader's for mix-in rows). Reading them: generated.py and mix_in.py,
both at once: sources.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GENERATED, MIX_IN = "generated", "mix-in"  # the two sources, as `source` columns, folders and reports name them


@dataclass
class Row:
    id: str
    text: str
    prompt: str | None  # the prompt that generated it; None for a mix-in row


@dataclass
class Skipped:
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + n
