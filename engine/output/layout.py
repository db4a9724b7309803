"""The output directory: its layout, the output schema, the run fingerprint, per-shard state files.

    OUTPUT_DIR/<prompt>/part-*.parquet     results, one row per (document, prompt)
    OUTPUT_DIR/rejected/part-*.parquet     input rows that were skipped, with the reason
    OUTPUT_DIR/_run/fingerprint.json       what the results depend on (model, prompts, sampling ...)
    OUTPUT_DIR/_state/<shard>.json         progress of each shard (read by `engine status`)
    OUTPUT_DIR/_journal, _manifest         crash recovery (see parts.py)
    OUTPUT_DIR/_lease/<shard>.*            one writer per shard (lease.py); never deleted by clear()
    OUTPUT_DIR/summary.json                the last run's summary (per shard: summary-<shard>.json)
    OUTPUT_DIR/README.md                   the dataset card (card.py)
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import orjson
import pyarrow as pa

from engine.atomic import temp_name, write_atomic
from engine.errors import ResumeError, WriterError
from engine.input.identity import compare as input_changes
from engine.types import ENGINE_DIRS, REJECTED  # noqa: F401 - REJECTED re-exported (layout.REJECTED)

log = logging.getLogger(__name__)

RESULT_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("model", pa.string()),
    pa.field("generation", pa.string()),
    # stop | length (cut at max_new_tokens) | repetition (stopped in a loop: the text up to it, completion_tokens
    # counting every token generated, the loop included) | error
    pa.field("finish_reason", pa.string()),
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


def check_fingerprint(out: Path, fingerprint: dict, overwrite: bool, extend_input: bool = False) -> bool:
    """Refuse to mix results of different configs or inputs in one directory; True when resuming.

    The input record (`input.files`, input/identity.py): a file changed or gone is refused; files that
    joined are refused unless `extend_input` (`--extend-input`, one shard only); an output of an earlier
    version, without a record, is accepted once with a warning and its record written then."""
    path = out / "_run" / "fingerprint.json"
    if overwrite and out.exists():
        clear(out)
    if not path.exists():
        _write_fingerprint(path, fingerprint)
        return False
    old = orjson.loads(path.read_bytes())
    old_files = old.get("input", {}).get("files")
    new_files = fingerprint.get("input", {}).get("files")
    diffs = _diff(_without_files(old), _without_files(fingerprint))
    afresh = "To start afresh: pass --overwrite (deletes those results) or use another output.dir."
    if diffs:
        raise ResumeError(f"{out} holds results of a different run configuration:\n  " + "\n  ".join(diffs) +
                          "\nRestore the old settings to resume. " + afresh)
    if new_files is None:
        return True
    if old_files is None:
        log.warning("%s was made by an earlier version that did not record its input files: taking this run's "
                    "%d input file(s) as its input and recording them now", out, len(new_files))
        _write_fingerprint(path, fingerprint)
        return True
    changed, added = input_changes(old_files, new_files)
    if changed:
        raise ResumeError(f"{out} holds results of another input:\n  " + "\n  ".join(changed) + "\n" + afresh)
    if added and not extend_input:
        raise ResumeError(f"{out}: {len(added)} file(s) joined the input since these results were made ("
                          f"{', '.join(added[:5])}{' ...' if len(added) > 5 else ''}). Pass --extend-input to add "
                          f"them to this output (the stored results are kept), or " + afresh[len("To start afresh: "):])
    if added:
        if fingerprint.get("shard_count", 1) > 1:
            raise ResumeError(f"{out}: --extend-input needs shard.count = 1 (with more shards a new file moves "
                              f"other files to other shards); write the new files to another output.dir")
        log.info("--extend-input: %d file(s) added to the input of %s: %s", len(added), out, ", ".join(added))
        _write_fingerprint(path, fingerprint)
    return True


def _write_fingerprint(path: Path, fingerprint: dict) -> None:
    write_atomic(path, orjson.dumps(fingerprint, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def _without_files(fp: dict) -> dict:
    return {**fp, "input": {k: v for k, v in fp.get("input", {}).items() if k != "files"}}


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


def slurm_attempt() -> dict:
    """Under Slurm, for the state file: the job, array task and restart count of this attempt."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return {}
    task = f"{env.get('SLURM_ARRAY_JOB_ID', env['SLURM_JOB_ID'])}_{env['SLURM_ARRAY_TASK_ID']}" \
        if "SLURM_ARRAY_TASK_ID" in env else env["SLURM_JOB_ID"]
    return {"slurm": {"job_id": env["SLURM_JOB_ID"], "task": task,
                      "restart_count": int(env.get("SLURM_RESTART_COUNT") or 0)}}
