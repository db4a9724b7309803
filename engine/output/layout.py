"""The output directory: its layout, the output schema, the run fingerprint (state files: record.py).

    OUTPUT_DIR/<prompt>/part-*.parquet     results, one row per (document, prompt)
    OUTPUT_DIR/rejected/part-*.parquet     input rows that were skipped, with the reason
    OUTPUT_DIR/_run/fingerprint.json       what the results depend on (model, prompts, sampling ...)
    OUTPUT_DIR/_state/<shard>.json         progress of each shard (record.py; read by `engine status`)
    OUTPUT_DIR/_journal, _manifest         crash recovery (see parts.py)
    OUTPUT_DIR/_lease/<shard>.*            one writer per shard (lease.py); never deleted by clear()
    OUTPUT_DIR/summary.json                the last run's summary (per shard: summary-<shard>.json)
    OUTPUT_DIR/README.md                   the dataset card (card.py)
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import orjson
import pyarrow as pa

from engine.atomic import temp_name, write_atomic
from engine.config.run_config import DOCUMENT_LAST
from engine.errors import DamagedOutput, ResumeError, WriterError
from engine.input.identity import compare as input_changes
from engine.output.record import SlurmAttempt
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


def unit_tag(index: int, count: int) -> str:
    """Unit `index` of `count` (input.unit_rows; output/units.py)."""
    return f"u{index:05d}-of-{count:05d}"


def work_tags(fp: dict) -> list[str]:
    """The tags of a run's pieces of work, from its fingerprint: its units (input.unit_rows > 0), else its shards."""
    units = fp.get("units")
    if units:
        return [unit_tag(i, int(units["count"])) for i in range(int(units["count"]))]
    n = int(fp.get("shard_count", 1))
    return [shard_tag(i, n) for i in range(n)]


def work_noun(fp: dict) -> str:
    return "unit" if fp.get("units") else "shard"


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


def fingerprint_layout(fp: dict) -> str:
    """The run's render.layout; outputs of versions before render.layout were document_last."""
    return fp.get("render", {}).get("layout", DOCUMENT_LAST)


def check_fingerprint(out: Path, fingerprint: dict, overwrite: bool, extend_input: bool = False) -> bool:
    """Refuse to mix results of different configs or inputs in one directory; True when resuming.

    The input record (`input.files`, input/identity.py): a file changed or gone is refused; files that
    joined are refused unless `extend_input` (`--extend-input`, one shard only); an output of an earlier
    version, without a record, is accepted once with a warning and its record written then."""
    path = out / "_run" / "fingerprint.json"
    if overwrite and out.exists():
        clear(out, list(fingerprint.get("prompts", {})))
    old = read_fingerprint(out)
    if old is None:
        _write_fingerprint(path, fingerprint)
        return False
    _check_mode(out, old, fingerprint)
    old.setdefault("render", {"layout": fingerprint_layout(old)})
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


def _check_mode(out: Path, old: dict, new: dict) -> None:
    """Workers (units: input.unit_rows > 0) and static shards never write one output: a refusal naming the way in."""
    was, now = old.get("units"), new.get("units")
    if was and not now:
        raise ResumeError(f"{out} is being made by workers claiming units of input.unit_rows = {was['rows']} rows; "
                          f"static shards (--shard, input.unit_rows = 0) cannot write it. Run `engine run CONFIG` "
                          f"without --shard (and with input.unit_rows = {was['rows']}) to join the run as a worker")
    if now and not was:
        raise ResumeError(f"{out} was made by static shards (shard count {old.get('shard_count', 1)}); workers "
                          f"(input.unit_rows > 0) cannot join it. Resume it as it was started (input.unit_rows = 0, "
                          f"--shard i/N where it was sharded), or write the workers' run to another output.dir")


def read_fingerprint(out: Path) -> dict | None:
    """`out`'s run fingerprint; None when there is none; a DamagedOutput naming the file when it is unreadable."""
    path = Path(out) / "_run" / "fingerprint.json"
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (orjson.JSONDecodeError, OSError) as exc:
        raise DamagedOutput(f"{path}: damaged, not readable ({exc}): the configuration and input these results were "
                            f"made with cannot be checked. Restore the file, or start afresh with --overwrite "
                            f"(deletes the results) or another output.dir") from None
    if not isinstance(data, dict):
        raise DamagedOutput(f"{path}: damaged (a JSON {type(data).__name__}, not a run fingerprint). Restore the "
                            f"file, or start afresh with --overwrite (deletes the results) or another output.dir")
    return data


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


PART_NAME = re.compile(r"part-[su]\d+-of-\d+-\d+\.parquet(\.tmp)?")


def clear(out: Path, prompts: list[str] = ()) -> None:
    """Delete what the engine wrote in `out`: the prompt folders the fingerprint names and `prompts` (this
    run's); with a damaged fingerprint, also every folder that holds nothing but engine parts."""
    try:
        fp = read_fingerprint(out) or {}
        prompts = [*prompts, *fp.get("prompts", {})]
    except DamagedOutput:
        log.warning("%s is damaged: deleting this run's prompt folders and every folder that holds only engine "
                    "parts", out / "_run" / "fingerprint.json")
        prompts = [*prompts, *(d.name for d in out.iterdir() if d.is_dir() and d.name not in ENGINE_DIRS
                               and any(d.iterdir()) and all(PART_NAME.fullmatch(f.name) for f in d.iterdir()))]
    for name in [*ENGINE_DIRS, *prompts]:
        shutil.rmtree(out / name, ignore_errors=True)
    for f in [*out.glob("summary*.json"), out / "README.md"]:
        f.unlink(missing_ok=True)


def slurm_attempt() -> SlurmAttempt | None:
    """Under Slurm, for the state file: the job, array task and restart count of this attempt."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return None
    task = f"{env.get('SLURM_ARRAY_JOB_ID', env['SLURM_JOB_ID'])}_{env['SLURM_ARRAY_TASK_ID']}" \
        if "SLURM_ARRAY_TASK_ID" in env else env["SLURM_JOB_ID"]
    return SlurmAttempt(env["SLURM_JOB_ID"], task, int(env.get("SLURM_RESTART_COUNT") or 0))
