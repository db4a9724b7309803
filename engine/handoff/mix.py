"""`engine mix`: generated rows + original ("mix-in") rows at a target share of tokens, deterministic.

Synthetic-only training data fails; the field mixes 50/50 by tokens by default and found 60-80 %
synthetic best for structured prompts (math 80 %, table 70 %, FAQ and tutorial 60 %): the presets.

Output: OUT/part-NNNNN.parquet and OUT/_mix.json (what was taken; "_" keeps it out of Parquet readers),
written into a hidden folder renamed to OUT at the end (staging.py): a killed mix leaves nothing in OUT.

`run_mix(MixSpec)` (the CLI builds the spec) runs, in order:
0. Refuse a bad ratio, a non-empty OUT (unless `overwrite`), a folder that is not an engine output and
   an incomplete run (unless `allow_incomplete`: then say how many documents are missing); check the
   prompts, load the tokenizer.
1. Count tokens of every usable row of both sources with one tokenizer (the training tokenizer).
2. Keep all of the scarcer side and as much of the other as the ratio asks: rows are taken in a
   seeded random order until the token target is reached.
3. Stream both sources again and interleave the kept rows in proportion, shuffled (seeded) within
   windows of `shuffle_window` rows, into zstd Parquet parts with a `source` column. Memory stays
   bounded by the window; a global shuffle is the trainer's loader's job.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from engine.atomic import replace_synced
from engine.errors import SourceError
from engine.handoff import check_ratio
from engine.handoff.rows import GENERATED, MIX_IN, Row, Skipped
from engine.handoff.sources import Sources, read_sources
from engine.handoff.staging import clear, staged, work_folder
from engine.handoff.tokenizer import load_tokenizer

SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string()), ("id", pa.string()), ("prompt", pa.string()),
                    ("tokens", pa.int32())])


@dataclass(frozen=True)
class MixSpec:
    """What `engine mix` is asked for."""
    sources: Sources
    out: Path  # directory for the parts and _mix.json
    ratio: float  # synthetic share of tokens, 0 < ratio < 1
    tokenizer: str = "embedded"  # tokens are counted with it: `embedded`, a local directory or a hub id
    seed: int = 0
    shuffle_window: int = 100_000  # rows shuffled together (bounded memory)
    part_rows: int = 500_000  # rows per Parquet part
    overwrite: bool = False  # replace what an earlier mix wrote in `out`

    def __post_init__(self) -> None:
        check_ratio(self.ratio)


@dataclass
class MixPlan:
    keep: dict[str, np.ndarray]  # per source, one bool per usable row in stream order
    target: dict[str, int]  # per source, tokens to take


def count_tokens(rows: Iterator[Row], tokenizer, batch: int = 2000) -> np.ndarray:
    counts: list[int] = []
    texts: list[str] = []
    for row in rows:
        texts.append(row.text)
        if len(texts) >= batch:
            counts += [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
            texts = []
    if texts:
        counts += [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return np.asarray(counts, dtype=np.int64)


def _take(tokens: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    keep = np.zeros(len(tokens), dtype=bool)
    if target <= 0 or len(tokens) == 0:
        return keep
    order = rng.permutation(len(tokens))
    upto = int(np.searchsorted(np.cumsum(tokens[order]), target)) + 1  # the row that reaches the target too
    keep[order[:upto]] = True
    return keep


def plan_mix(tokens: dict[str, np.ndarray], ratio: float, seed: int) -> MixPlan:
    check_ratio(ratio)
    g, o = int(tokens[GENERATED].sum()), int(tokens[MIX_IN].sum())
    if g == 0:
        raise SourceError("no usable generated rows to mix")
    if o == 0:
        raise SourceError("no usable mix-in rows to mix")
    want_o = g * (1 - ratio) / ratio
    if o >= want_o:
        target = {GENERATED: g, MIX_IN: int(round(want_o))}
    else:
        target = {GENERATED: int(round(o * ratio / (1 - ratio))), MIX_IN: o}
    rng = np.random.default_rng(seed)
    keep = {s: _take(tokens[s], target[s], rng) for s in (GENERATED, MIX_IN)}
    return MixPlan(keep, target)


def _selected(rows: Iterator[Row], keep: np.ndarray, tokens: np.ndarray) -> Iterator[tuple[Row, int]]:
    for i, row in enumerate(rows):
        if i >= len(keep):
            raise SourceError("the input changed while mixing (more rows than in the first pass)")
        if keep[i]:
            yield row, int(tokens[i])


def interleave(streams: dict[str, Iterator[tuple[Row, int]]], target: dict[str, int]) -> Iterator[tuple[str, Row, int]]:
    """Emit from whichever source is furthest behind its share of tokens."""
    done = {s: 0 for s in streams}
    heads = {s: next(it, None) for s, it in streams.items()}
    while any(h is not None for h in heads.values()):
        live = [s for s, h in heads.items() if h is not None]
        s = min(live, key=lambda x: done[x] / max(target[x], 1))
        row, n = heads[s]
        yield s, row, n
        done[s] += n
        heads[s] = next(streams[s], None)


def write_mix(out: Path, items: Iterator[tuple[str, Row, int]], seed: int, shuffle_window: int,
              part_rows: int, level: int = 3) -> dict:
    rng = random.Random(seed)
    stats = {GENERATED: {"rows": 0, "tokens": 0}, MIX_IN: {"rows": 0, "tokens": 0}}
    parts: list[str] = []
    writer, written, path = None, 0, None

    def flush(buf: list) -> None:
        nonlocal writer, written, path
        rng.shuffle(buf)
        while buf:
            if writer is None:
                path = out / f"part-{len(parts):05d}.parquet"
                writer = pq.ParquetWriter(path.with_name(path.name + ".tmp"), SCHEMA, compression="zstd",
                                          compression_level=level)
            room = part_rows - written
            take, buf[:] = buf[:room], buf[room:]
            cols = list(zip(*take))
            writer.write_table(pa.table({"text": list(cols[1]), "source": list(cols[0]), "id": list(cols[2]),
                                         "prompt": list(cols[3]), "tokens": list(cols[4])}, schema=SCHEMA))
            written += len(take)
            if written >= part_rows:
                close()

    def close() -> None:
        nonlocal writer, written
        if writer is not None:
            writer.close()
            replace_synced(path.with_name(path.name + ".tmp"), path)
            parts.append(path.name)
            writer, written = None, 0

    buf: list = []
    for source, row, n in items:
        buf.append((source, row.text, row.id, row.prompt, n))
        stats[source]["rows"] += 1
        stats[source]["tokens"] += n
        if len(buf) >= shuffle_window:
            flush(buf)
    flush(buf)
    close()
    return {"parts": parts, "sources": stats}


RECORD = "_mix.json"


def _ours(name: str) -> bool:
    """What a mix writes in OUT (`--overwrite` replaces only that: OUT may hold other files)."""
    return name == RECORD or (name.startswith("part-") and name.endswith((".parquet", ".parquet.tmp")))


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SourceError(f"{out} is a file, not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SourceError(f"{out} is not empty; choose another --out or pass --overwrite")
    clear(out, _ours)  # --overwrite: the earlier mix goes now (a refused or failed mix leaves neither)


def run_mix(spec: MixSpec, say: Callable[[str], object] = print) -> dict:
    """Write the mix `spec` asks for; returns the summary also written to OUT/_mix.json."""
    src, out = spec.sources, spec.out
    _check_out(out, spec.overwrite)
    prompts = src.checked_prompts()
    progress = src.progress(say)
    tokenizer, tokenizer_name = load_tokenizer(spec.tokenizer)
    skipped = {GENERATED: Skipped(), MIX_IN: Skipped()}
    say(f"counting tokens ({tokenizer_name}) ...")
    tokens = {name: count_tokens(rows, tokenizer) for name, rows in read_sources(src, prompts, skipped).items()}
    plan = plan_mix(tokens, spec.ratio, spec.seed)
    again = read_sources(src, prompts, {GENERATED: Skipped(), MIX_IN: Skipped()})  # counted in the first pass
    streams = {name: _selected(rows, plan.keep[name], tokens[name]) for name, rows in again.items()}
    say(f"writing the mix (into {work_folder(out).name}, renamed to {out} when whole) ...")
    # a bad mix-in row mid-way, Ctrl-C, a full disk, a kill: no partial mix in OUT that looks usable
    with staged(out, _ours, last=(RECORD,)) as work:
        result = write_mix(work, interleave(streams, plan.target), spec.seed, spec.shuffle_window, spec.part_rows)
        total = sum(s["tokens"] for s in result["sources"].values())
        summary = {
            "output_dir": str(src.output_dir), "mix_in": src.mix_in, "prompts": prompts, "out": str(out),
            "ratio_requested": spec.ratio, "ratio_achieved": round(result["sources"][GENERATED]["tokens"] / total, 4),
            "seed": spec.seed, "tokenizer": tokenizer_name, "keep_truncated": src.keep_truncated,
            "run": progress.to_dict(), "parts": result["parts"], "sources": result["sources"],
            "available": {s: {"rows": int(len(t)), "tokens": int(t.sum())} for s, t in tokens.items()},
            "skipped": {name: sk.counts for name, sk in skipped.items()},
        }
        (work / RECORD).write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return summary
