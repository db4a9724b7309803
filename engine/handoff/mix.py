"""`engine mix`: generated rows + original ("mix-in") rows at a target share of tokens, deterministic.

Synthetic-only training data fails; the field mixes 50/50 by tokens by default and found 60-80 %
synthetic best for structured prompts (math 80 %, table 70 %, FAQ and tutorial 60 %): the presets.

Output: OUT/part-NNNNN.parquet and OUT/_mix.json (what was taken; "_" keeps it out of Parquet readers).

1. Count tokens of every usable row of both sources with one tokenizer (the training tokenizer).
2. Keep all of the scarcer side and as much of the other as the ratio asks: rows are taken in a
   seeded random order until the token target is reached.
3. Stream both sources again and interleave the kept rows in proportion, shuffled (seeded) within
   windows of `shuffle_window` rows, into zstd Parquet parts with a `source` column. Memory stays
   bounded by the window; a global shuffle is the trainer's loader's job.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from engine.atomic import replace_synced
from engine.errors import SourceError
from engine.handoff.sources import GENERATED, MIX_IN, Row, Skipped

SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string()), ("id", pa.string()), ("prompt", pa.string()),
                    ("tokens", pa.int32())])


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
    if not 0 < ratio < 1:
        raise SourceError(f"--ratio {ratio}: the synthetic share must be between 0 and 1 (exclusive)")
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


def run_mix(output_dir: Path, mix_in: list[str], out: Path, ratio: float, seed: int, tokenizer, tokenizer_name: str,
            prompts: list[str], text_column: str, shuffle_window: int = 100_000, part_rows: int = 500_000,
            overwrite: bool = False, say=print, keep_truncated: bool = False) -> dict:
    from engine.handoff.sources import generated_rows, mix_in_rows

    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SourceError(f"{out} is not empty; choose another --out or pass --overwrite")
        for old in [*out.glob("part-*.parquet"), *out.glob("part-*.parquet.tmp"), out / "_mix.json"]:
            old.unlink(missing_ok=True)  # only what a mix writes: --out may hold other files
    skipped_g, skipped_o = Skipped(), Skipped()
    say(f"counting tokens ({tokenizer_name}) ...")
    tokens = {GENERATED: count_tokens(generated_rows(output_dir, prompts, skipped_g, keep_truncated), tokenizer),
              MIX_IN: count_tokens(mix_in_rows(mix_in, text_column, skipped_o), tokenizer)}
    plan = plan_mix(tokens, ratio, seed)
    out.mkdir(parents=True, exist_ok=True)
    streams = {GENERATED: _selected(generated_rows(output_dir, prompts, Skipped(), keep_truncated),
                                    plan.keep[GENERATED],
                                    tokens[GENERATED]),
               MIX_IN: _selected(mix_in_rows(mix_in, text_column, Skipped()), plan.keep[MIX_IN], tokens[MIX_IN])}
    try:
        result = write_mix(out, interleave(streams, plan.target), seed, shuffle_window, part_rows)
    except BaseException:  # a bad mix-in row mid-way, Ctrl-C, a full disk: no partial mix that looks usable
        for part in [*out.glob("part-*.parquet"), *out.glob("part-*.parquet.tmp")]:
            part.unlink(missing_ok=True)
        raise
    total = sum(s["tokens"] for s in result["sources"].values())
    summary = {
        "output_dir": str(output_dir), "mix_in": mix_in, "prompts": prompts, "out": str(out),
        "ratio_requested": ratio, "ratio_achieved": round(result["sources"][GENERATED]["tokens"] / total, 4),
        "seed": seed, "tokenizer": tokenizer_name, "keep_truncated": keep_truncated, "parts": result["parts"],
        "sources": result["sources"],
        "available": {s: {"rows": int(len(t)), "tokens": int(t.sum())} for s, t in tokens.items()},
        "skipped": {GENERATED: skipped_g.counts, MIX_IN: skipped_o.counts},
    }
    (out / "_mix.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return summary
