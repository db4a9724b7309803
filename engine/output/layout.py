"""The output directory: its layout, the output schema, the run fingerprint, per-shard state files.

    OUTPUT_DIR/<prompt>/part-*.parquet     results, one row per (document, prompt)
    OUTPUT_DIR/rejected/part-*.parquet     input rows that were skipped, with the reason
    OUTPUT_DIR/_run/fingerprint.json       what the results depend on (model, prompts, sampling ...)
    OUTPUT_DIR/_state/<shard>.json         progress of each shard (read by `engine status`)
    OUTPUT_DIR/_journal, _manifest         crash recovery (see journal.py)
    OUTPUT_DIR/summary.json                the last run's summary (per shard: summary-<shard>.json)
    OUTPUT_DIR/README.md                   the dataset card (card.py)
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import orjson
import pyarrow as pa

from engine.atomic import temp_name, write_atomic
from engine.errors import ResumeError, WriterError
from engine.types import ENGINE_DIRS, REJECTED


RESULT_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("model", pa.string()),
    pa.field("generation", pa.string()),
    pa.field("finish_reason", pa.string()),  # stop | length | error
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("cached_tokens", pa.int32()),
    pa.field("truncated", pa.bool_()),  # the document was cut to fit the context
    pa.field("error", pa.string()),
    pa.field("doc_ref", pa.string()),  # "<file>:<row>" of the source document
]
REJECTED_SCHEMA = pa.schema([pa.field("doc_ref", pa.string()), pa.field("id", pa.string()),
                             pa.field("reason", pa.string())])


def source_column_names(passthrough: pa.Schema | None) -> dict[str, str]:
    """Source column -> output column name; clashes with result columns get a `source_` prefix."""
    taken = {f.name for f in RESULT_FIELDS} | {"text"}
    return {f.name: (f"source_{f.name}" if f.name in taken else f.name) for f in (passthrough or [])}


def result_schema(passthrough: pa.Schema | None) -> pa.Schema:
    names = source_column_names(passthrough)
    extra = [pa.field(names[f.name], f.type) for f in (passthrough or [])]
    return pa.schema(RESULT_FIELDS + [pa.field("text", pa.string())] + extra)


def shard_tag(index: int, count: int) -> str:
    return f"s{index:05d}-of-{count:05d}"


def writable_dir(out: Path) -> Path:
    """`out`, created if need be; an error naming output.dir when it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = temp_name(out / ".write-check")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise WriterError(f"output.dir {out}: cannot write there ({exc.strerror or exc})") from exc
    return out


def check_fingerprint(out: Path, fingerprint: dict, overwrite: bool) -> bool:
    """Refuse to mix results of different configs in one directory; True when resuming."""
    path = out / "_run" / "fingerprint.json"
    if overwrite and out.exists():
        clear(out)
    if path.exists():
        old = orjson.loads(path.read_bytes())
        diffs = _diff(old, fingerprint)
        if diffs:
            raise ResumeError(
                f"{out} holds results of a different run configuration:\n  " + "\n  ".join(diffs) +
                "\nUse another output.dir, restore the old settings, or pass --overwrite to delete those results.")
        return True
    write_atomic(path, orjson.dumps(fingerprint, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return False


def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: was {old!r}, now {new!r}"]


def clear(out: Path) -> None:
    """Delete what the engine wrote in `out` (prompt folders are found from the fingerprint)."""
    fp = out / "_run" / "fingerprint.json"
    prompts = list(orjson.loads(fp.read_bytes()).get("prompts", {})) if fp.exists() else []
    for name in [*ENGINE_DIRS, *prompts]:
        shutil.rmtree(out / name, ignore_errors=True)
    for f in [*out.glob("summary*.json"), out / "README.md"]:
        f.unlink(missing_ok=True)


def write_state(out: Path, tag: str, state: dict) -> None:
    state = {**state, "updated_at": time.time()}
    write_atomic(out / "_state" / f"{tag}.json", orjson.dumps(state, option=orjson.OPT_INDENT_2))


def read_states(out: Path) -> list[dict]:
    folder = out / "_state"
    if not folder.is_dir():
        return []
    return [orjson.loads(p.read_bytes()) for p in sorted(folder.glob("*.json"))]
