"""The rows a run generated, through the quality gate: OUTPUT_DIR/<prompt>/*.parquet, column `generation`.

Every row is judged by the one gate (engine/gate.py `rejection`): rows that failed, are blank
(empty or whitespace only), were cut at max_new_tokens (a student trained on them learns to end
documents mid-sentence) or stopped in a repetition loop are left out and counted in `Skipped` under
the gate's reason; `keep_truncated` keeps both kinds of cut-off row. An id stored twice in a prompt
is used once.

Before any row is read, `generated_prompts` checks that the folder is an engine output (its fingerprint,
and parts with the columns read here: engine/output/readiness.py); `Sources.progress` whether its run is
complete.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import SourceError
from engine.gate import rejection
from engine.handoff.rows import Row, Skipped
from engine.ids import id_hash
from engine.output.readiness import check_result_parts, read_fingerprint
from engine.types import REJECTED

log = logging.getLogger(__name__)

DUPLICATE = "DUPLICATE id (a second copy of a stored row; the first is used)"
COLUMNS = ["id", "generation", "finish_reason"]  # what generated_rows reads


def generated_prompts(output_dir: Path, prompts: list[str] | None = None) -> list[str]:
    """The run's prompts that have result parts (`prompts`, checked, when given); a SourceError naming the
    folder when it is not an engine output."""
    read_fingerprint(output_dir)
    found = sorted(p.name for p in output_dir.iterdir()
                   if p.is_dir() and p.name != REJECTED and not p.name.startswith(("_", "."))
                   and any(p.glob("*.parquet")))
    if not found:
        raise SourceError(f"{output_dir}: no result parts (<prompt>/*.parquet); is it the output.dir of a run?")
    if prompts:
        missing = sorted(set(prompts) - set(found))
        if missing:
            raise SourceError(f"{output_dir}: no results for prompt(s) {', '.join(missing)} "
                              f"(it has {', '.join(found)})")
        found = list(prompts)
    check_result_parts(output_dir, [output_dir / p for p in found], COLUMNS)
    return found


def generated_rows(output_dir: Path, prompts: list[str], skipped: Skipped,
                   keep_truncated: bool = False) -> Iterator[Row]:
    """Every row that passes the gate, prompt by prompt, part by part, in stored order. An id stored twice in
    a prompt (two runs wrote one shard at once, before leases) is counted in `skipped`, said loudly, and only
    its first copy used."""
    for prompt in prompts:
        seen: set[int] = set()
        dupes = 0
        for part in sorted((output_dir / prompt).glob("*.parquet")):
            for d in _batches(part):
                for i, text, reason in zip(d["id"], d["generation"], d["finish_reason"]):
                    h = id_hash(i)
                    if h in seen:
                        dupes += 1
                        skipped.add(DUPLICATE)
                        continue
                    seen.add(h)
                    why = rejection(reason, text, keep_truncated)
                    if why is None:
                        yield Row(i, text, prompt)
                    else:
                        skipped.add(why)
        if dupes:
            log.warning("DUPLICATES: %s/%s stores %d id(s) more than once (two runs wrote one shard at once); "
                        "only the first copy of each is used", output_dir, prompt, dupes)


def _batches(part: Path) -> Iterator[dict]:
    """The part's rows (id, generation, finish_reason) in batches; a part that does not read (bytes flipped, cut,
    not Parquet) is a SourceError naming it, never a zstd or UTF-8 traceback."""
    try:
        for batch in pq.ParquetFile(part).iter_batches(columns=COLUMNS, batch_size=4096):
            yield batch.to_pydict()
    except (OSError, ValueError, pa.ArrowException) as exc:  # ArrowInvalid, zstd, UnicodeDecodeError
        raise SourceError(f"{part}: damaged result part ({type(exc).__name__}: {exc}); `engine status --check "
                          f"--deep` names every damaged part, and the next `engine run` of the config regenerates "
                          f"its rows once the file is deleted") from None
