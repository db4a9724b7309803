"""`engine inspect OUTPUT`: read what the model wrote before training on it.

A few rows per prompt and finish reason, each with its source document beside the generation (side by
side on a wide terminal, one under the other on a narrow one), wrapped to the terminal's width. Filters:
prompt, finish reason, id. Only committed parts are read (OUTPUT/<prompt>/part-*.parquet; rows still in a
running shard's journal appear once committed). The rows shown are a seeded sample of each group (the
same command shows the same rows); the ids and finish-reason columns are read first, the text of the
chosen rows only.
"""
from __future__ import annotations

import random
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from engine.errors import ConfigError
from engine.output.layout import read_fingerprint
from engine.types import ENGINE_DIRS

SIDE_BY_SIDE_MIN = 80  # narrower terminals show the source above the generation


@dataclass
class InspectOptions:
    prompt: str | None = None  # one prompt's rows only
    finish_reason: str | None = None  # stop | length | repetition | error
    ids: tuple[str, ...] = ()  # these documents only
    n: int = 3  # rows shown per (prompt, finish reason)
    width: int = 100  # terminal columns
    lines: int = 16  # lines shown per side of a row (the rest is counted)
    seed: int = 0


def prompt_folders(out: Path) -> list[str]:
    """The prompts whose results `out` holds: the fingerprint's, else every folder with parts."""
    names = list((read_fingerprint(out) or {}).get("prompts", {}))
    if not names:
        names = sorted(d.name for d in out.iterdir() if d.is_dir() and d.name not in ENGINE_DIRS
                       and any(d.glob("part-*.parquet")))
    return [n for n in names if any((out / n).glob("part-*.parquet"))]


def inspect_output(out: Path, o: InspectOptions) -> str:
    """The rows chosen by `o`, as `engine inspect` prints them; a ConfigError for an output or filter that
    matches nothing (naming what there is)."""
    if not out.is_dir():
        raise ConfigError(f"{out} is not a directory")
    prompts = prompt_folders(out)
    if not prompts:
        raise ConfigError(f"{out} holds no committed results (<prompt>/part-*.parquet)")
    if o.prompt is not None:
        if o.prompt not in prompts:
            raise ConfigError(f"--prompt {o.prompt}: not in {out} (prompts there: {', '.join(prompts)})")
        prompts = [o.prompt]
    blocks, matched = [], 0
    for name in prompts:
        groups = _index(out / name, o)
        counts = ", ".join(f"{reason} {len(rows):,}" for reason, rows in sorted(groups.items()))
        matched += sum(len(rows) for rows in groups.values())
        blocks.append(f"=== {name}: {counts or 'no row matches'}")
        for reason, rows in sorted(groups.items()):
            chosen = sorted(random.Random(f"{o.seed}:{name}:{reason}").sample(rows, min(o.n, len(rows))))
            blocks.append(f"--- {name} / finish_reason {reason}: {len(chosen)} of {len(rows):,} row(s)")
            blocks += [_row(rec, o) for rec in _read(chosen)]
    if not matched:
        wanted = [f"--finish-reason {o.finish_reason}" if o.finish_reason else "",
                  f"--id {' '.join(o.ids)}" if o.ids else ""]
        raise ConfigError(f"no row of {out} matches {' '.join(w for w in wanted if w) or 'the filters'}")
    return "\n".join(blocks)


def _index(folder: Path, o: InspectOptions) -> dict[str, list[tuple[Path, int]]]:
    """(part, row) of every row that passes the filters, by finish reason; reads the id and reason columns."""
    wanted = set(o.ids)
    groups: dict[str, list[tuple[Path, int]]] = defaultdict(list)
    for part in sorted(folder.glob("part-*.parquet")):
        t = pq.read_table(part, columns=["id", "finish_reason"])
        for row, (doc_id, reason) in enumerate(zip(t.column("id").to_pylist(), t.column("finish_reason").to_pylist())):
            if (o.finish_reason is None or reason == o.finish_reason) and (not wanted or doc_id in wanted):
                groups[reason or "?"].append((part, row))
    return groups


COLUMNS = ["id", "doc_ref", "finish_reason", "prompt_tokens", "completion_tokens", "truncated", "error", "text",
           "generation"]


def _read(chosen: list[tuple[Path, int]]) -> list[dict]:
    by_part: dict[Path, list[int]] = defaultdict(list)
    for part, row in chosen:
        by_part[part].append(row)
    rows = []
    for part, idx in by_part.items():
        rows += pq.read_table(part, columns=COLUMNS).take(idx).to_pylist()
    return rows


def _wrap(text: str, width: int, lines: int) -> list[str]:
    out = []
    for line in (text or "").splitlines() or [""]:
        out += textwrap.wrap(line, width, replace_whitespace=False, drop_whitespace=True) or [""]
    if len(out) > lines:
        out = out[: lines - 1] + [f"[... {len(out) - lines + 1:,} more line(s)]"]
    return out


def _row(rec: dict, o: InspectOptions) -> str:
    head = (f"id {rec['id']} ({rec['doc_ref']}): prompt {rec['prompt_tokens']:,} tokens"
            f"{' (document truncated to fit)' if rec['truncated'] else ''}, generated {rec['completion_tokens']:,}, "
            f"finish {rec['finish_reason']}" + (f", error: {rec['error']}" if rec.get("error") else ""))
    head = "\n".join(textwrap.wrap(head, max(o.width, 20), subsequent_indent="    "))
    generation = rec["generation"] or ("(empty)" if not rec.get("error") else "(no generation: an error row)")
    if o.width < SIDE_BY_SIDE_MIN:
        width = max(o.width - 2, 20)
        body = (["source:"] + ["  " + ln for ln in _wrap(rec["text"], width, o.lines)] + ["generation:"]
                + ["  " + ln for ln in _wrap(generation, width, o.lines)])
        return "\n".join([head, *body, ""])
    col = (o.width - 3) // 2
    left, right = _wrap(rec["text"], col, o.lines), _wrap(generation, col, o.lines)
    left += [""] * (len(right) - len(left))
    right += [""] * (len(left) - len(right))
    body = [f"{'SOURCE':<{col}} | GENERATION", f"{'-' * col}-+-{'-' * col}"]
    body += [f"{a:<{col}} | {b}".rstrip() for a, b in zip(left, right)]
    return "\n".join([head, *body, ""])
