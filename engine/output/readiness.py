"""Whether a folder is an engine run's output, and whether that run is complete: what `engine mix`,
`engine export nanotron` and `engine report` check before they read its rows.

- An engine output has `_run/fingerprint.json` and result parts (`<prompt>/*.parquet`) with the result
  columns; anything else (a dataset folder given by mistake) is a one-line SourceError naming the folder.
- A run is complete when each of its `shard_count` shards (the fingerprint's) has a state file that says
  so (record.py `ShardState.complete`). `RunProgress` says what is missing: shards stopped or running,
  shards never started, and the documents not yet stored (per started shard: its input rows less its
  rejected rows less the rows stored, for the prompt that has the fewest).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from engine.errors import SourceError
from engine.output import layout
from engine.output.layout import work_tags
from engine.output.record import read_states

NOT_OURS = "give the output.dir of an `engine run`"


def read_fingerprint(out: Path) -> dict:
    """The run's fingerprint (layout.read_fingerprint: a damaged one is named); a SourceError when `out` is not
    an engine output."""
    if not out.is_dir():
        raise SourceError(f"{out}: not a directory ({NOT_OURS})")
    fp = layout.read_fingerprint(out)
    if fp is None:
        raise SourceError(f"{out}: not an engine output (no _run/fingerprint.json; {NOT_OURS})")
    return fp


def check_result_parts(out: Path, folders: list[Path], columns: list[str]) -> None:
    """Every part in `folders` has `columns` (read from the footers); else `out` is not an engine output."""
    for folder in folders:
        for part in sorted(folder.glob("*.parquet")):
            try:
                names = set(pq.read_schema(part).names)
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
                raise SourceError(f"{out}: {part.relative_to(out)} is not a readable Parquet part ({exc})") from None
            missing = [c for c in columns if c not in names]
            if missing:
                raise SourceError(f"{out}: not an engine output ({part.relative_to(out)} has no column(s) "
                                  f"{', '.join(missing)}; {NOT_OURS})")


@dataclass
class RunProgress:
    shard_count: int
    complete: list[str] = field(default_factory=list)  # shard tags
    unfinished: list[str] = field(default_factory=list)  # stopped, crashed or still running
    not_started: list[str] = field(default_factory=list)  # no state file
    documents_missing: int = 0  # of the started shards (the unstarted ones' are not known)
    rows_unknown: bool = False  # a started shard whose input rows were not counted

    @property
    def is_complete(self) -> bool:
        return len(self.complete) == self.shard_count

    def describe(self) -> str:
        parts = [f"{len(self.complete)} of {self.shard_count} shard(s) complete"]
        if self.unfinished:
            parts.append(f"{len(self.unfinished)} stopped or running ({', '.join(self.unfinished[:3])}"
                         f"{' ...' if len(self.unfinished) > 3 else ''})")
        if self.not_started:
            parts.append(f"{len(self.not_started)} not started")
        missing = f"{self.documents_missing:,} document(s) missing"
        if self.not_started or self.rows_unknown:
            missing = f"at least {missing} (shards not started or not counted are not included)"
        return "; ".join(parts) + "; " + missing

    def to_dict(self) -> dict:
        return {"complete": self.is_complete, "shards": self.shard_count, "shards_complete": len(self.complete),
                "documents_missing": self.documents_missing, "shards_not_started": len(self.not_started)}


def run_progress(out: Path, fingerprint: dict) -> RunProgress:
    """How far the run of `out` got, from its shards' state files."""
    tags = work_tags(fingerprint)  # its shards, or its units (input.unit_rows > 0)
    states = {st.shard: st for st in read_states(out)}
    prog = RunProgress(len(tags))
    for tag in tags:
        st = states.get(tag)
        if st is None:
            prog.not_started.append(tag)
            continue
        (prog.complete if st.complete else prog.unfinished).append(tag)
        if st.complete:
            continue
        if st.input_rows is None:
            prog.rows_unknown = True
            continue
        done = min((c.done for c in st.prompts.values()), default=0)
        prog.documents_missing += max(0, st.input_rows - st.rejected - done)
    return prog


def check_complete(out: Path, fingerprint: dict, allow_incomplete: bool, say) -> RunProgress:
    """Refuse the output of an incomplete run unless `allow_incomplete` (then `say` what is missing)."""
    prog = run_progress(out, fingerprint)
    if prog.is_complete:
        return prog
    if not allow_incomplete:
        raise SourceError(f"{out}: the run is not complete ({prog.describe()}); finish it (run the same command "
                          f"again; `engine status` shows it), or pass --allow-incomplete to use the rows stored so far")
    say(f"WARNING --allow-incomplete: {out}: the run is not complete ({prog.describe()}); using the rows stored "
        f"so far")
    return prog
