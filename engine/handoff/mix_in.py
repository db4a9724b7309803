"""The original ("mix-in") rows of a mix, read with the engine's own reader (engine/input/reader.py):
Parquet, JSONL or JSONL.zst, local or URLs; bad rows are skipped and counted in `Skipped`."""
from __future__ import annotations

from collections.abc import Iterator

from engine.handoff.rows import Row, Skipped
from engine.input.reader import Reader


def mix_in_rows(paths: list[str], text_column: str, skipped: Skipped) -> Iterator[Row]:
    reader = Reader(paths, text_column, "id", 1024, 50_000_000)
    reader.text_option = "--text-column"
    reader.preflight()
    for batch in reader.batches():
        for rej in batch.rejected:
            skipped.add(f"mix-in row skipped: {rej.reason}")
        for doc in batch.docs:
            yield Row(doc.id, doc.text, None)
