"""The two sources of a training mix: the rows a run generated, and an original ("mix-in") dataset.

Generated rows come from OUTPUT_DIR/<prompt>/*.parquet (the `generation` column); rows that failed
(finish_reason "error") or came back empty are left out and counted. The mix-in set is read with
the engine's own reader (Parquet, JSONL, JSONL.zst; bad rows are skipped and counted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from .. import output
from ..reader import Reader

GENERATED, MIX_IN = "generated", "mix-in"


class SourceError(ValueError):
    pass


@dataclass
class Row:
    id: str
    text: str
    prompt: str | None


@dataclass
class Skipped:
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + n


def generated_prompts(output_dir: Path, prompts: list[str] | None = None) -> list[str]:
    if not output_dir.is_dir():
        raise SourceError(f"{output_dir}: not a directory (give the output.dir of an `engine run`)")
    found = sorted(p.name for p in output_dir.iterdir()
                   if p.is_dir() and p.name != output.REJECTED and not p.name.startswith(("_", "."))
                   and any(p.glob("*.parquet")))
    if not found:
        raise SourceError(f"{output_dir}: no result parts (<prompt>/*.parquet); is it the output.dir of a run?")
    if prompts:
        missing = sorted(set(prompts) - set(found))
        if missing:
            raise SourceError(f"{output_dir}: no results for prompt(s) {', '.join(missing)} "
                              f"(it has {', '.join(found)})")
        return list(prompts)
    return found


def generated_rows(output_dir: Path, prompts: list[str], skipped: Skipped) -> Iterator[Row]:
    """Every usable generated row, prompt by prompt, part by part, in stored order."""
    for prompt in prompts:
        for part in sorted((output_dir / prompt).glob("*.parquet")):
            f = pq.ParquetFile(part)
            for batch in f.iter_batches(columns=["id", "generation", "finish_reason"], batch_size=4096):
                d = batch.to_pydict()
                for i, text, reason in zip(d["id"], d["generation"], d["finish_reason"]):
                    if reason == "error":
                        skipped.add("generation failed (finish_reason=error)")
                    elif not text or not text.strip():
                        skipped.add("empty generation")
                    else:
                        yield Row(i, text, prompt)


def mix_in_rows(paths: list[str], text_column: str, skipped: Skipped) -> Iterator[Row]:
    reader = Reader(paths, text_column, "id", 1024, 50_000_000)
    reader.preflight()
    for batch in reader.batches():
        for rej in batch.rejected:
            skipped.add(f"mix-in row skipped: {rej.reason}")
        for doc in batch.docs:
            yield Row(doc.id, doc.text, None)


def load_tokenizer(name: str):
    """A transformers tokenizer and the name to record for it: `embedded`, a local directory or a hub id."""
    from transformers import AutoTokenizer

    from ..model_store import ModelError, resolve_model
    try:
        where, _ = resolve_model(name, allow_hub=True)
    except ModelError as exc:
        raise SourceError(str(exc)) from None
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as exc:
        raise SourceError(f"tokenizer {name!r}: cannot load it ({exc})") from None
    recorded = str(where) if isinstance(where, Path) else name
    return tok, recorded
