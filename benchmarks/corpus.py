"""A deterministic corpus of realistic web-like documents for benchmarks (no download needed).

Sentences are drawn from the shipped demo documents (real English with the noise of web pages:
navigation, numbers, lists, code) and joined into documents whose lengths follow a log-normal
distribution clipped to [min_chars, max_chars]: by default mean ~3,000 characters, 200 to 20,000.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

DEMO = Path(__file__).resolve().parents[1] / "runs" / "data" / "demo_docs.jsonl"


def _pieces() -> list[str]:
    out = []
    for line in DEMO.read_bytes().splitlines():
        text = orjson.loads(line)["text"]
        out += [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n", text) if p.strip()]
    return out


def make_documents(n: int, seed: int = 0, mean_chars: int = 3000, min_chars: int = 200,
                   max_chars: int = 20000) -> list[dict]:
    rng = random.Random(seed)
    pieces = _pieces()
    docs = []
    import math
    sigma = 0.9
    mu = math.log(mean_chars) - sigma ** 2 / 2
    for i in range(n):
        target = int(min(max(rng.lognormvariate(mu, sigma), min_chars), max_chars))
        parts, size = [], 0
        while size < target:
            p = rng.choice(pieces)
            parts.append(p)
            size += len(p) + 1
            if rng.random() < 0.2:
                parts.append("\n")
        text = " ".join(parts).replace(" \n ", "\n")[:max_chars]
        docs.append({"id": f"bench-{i:07d}", "url": f"https://example.org/page/{i}", "text": text})
    return docs


def write_corpus(path: Path, n: int, seed: int = 0) -> Path:
    docs = make_documents(n, seed)
    pq.write_table(pa.Table.from_pylist(docs), path, compression="zstd", row_group_size=5000)
    return path
