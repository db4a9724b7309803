"""Microbenchmarks of the engine's host-side hot paths (pytest-benchmark).

    .venv/bin/python -m pytest kernels_bench --benchmark-enable --benchmark-autosave      # save a baseline
    .venv/bin/python -m pytest kernels_bench --benchmark-enable --benchmark-compare \\
        --benchmark-compare-fail=mean:20%                                                 # compare with it
Saved runs are JSON files under .benchmarks/. In the normal test suite these run once each, untimed.
"""
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.output.layout import result_schema
from engine.output.parts import PartSink, PartSpec
from engine.render.prompts import load_prompts
from engine.render.renderer import Renderer
from engine.schedule.buckets import length_buckets
from engine.types import Request


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from engine.model.locate import resolve_model
    return AutoTokenizer.from_pretrained(resolve_model("embedded")[0])


@pytest.fixture(scope="module")
def documents():
    from benchmarks.corpus import make_documents
    return make_documents(512, seed=3)


def test_render_and_tokenise(benchmark, tokenizer, documents):
    renderer = Renderer(tokenizer, load_prompts(["faq", "tutorial"]), 8192, 512)
    texts = [d["text"] for d in documents]

    def render():
        out = 0
        for text, ids in zip(texts, renderer.encode_documents(texts)):
            for p in ("faq", "tutorial"):
                out += len(renderer.request_ids(p, text, ids)[0])
        return out

    assert benchmark(render) > 0


def test_length_buckets(benchmark):
    rng = random.Random(0)
    window = [Request(i, rng.choice(["faq", "math"]), [0] * rng.randint(50, 4000), 100, 256) for i in range(2048)]
    assert len(benchmark(length_buckets, window)) == 2048


def _rows(documents, n=256):
    return {
        "id": [d["id"] for d in documents[:n]], "prompt": ["faq"] * n, "model": ["m"] * n,
        "generation": [d["text"][:1600] for d in documents[:n]], "finish_reason": ["stop"] * n,
        "prompt_tokens": [700] * n, "completion_tokens": [400] * n, "cached_tokens": [130] * n,
        "truncated": [False] * n, "error": [None] * n, "doc_ref": [f"f:{i}" for i in range(n)],
        "text": [d["text"] for d in documents[:n]],
    }


def test_journal_append(benchmark, tmp_path, documents):
    schema = result_schema(None)
    batch = pa.RecordBatch.from_pydict(_rows(documents), schema=schema)
    sink = PartSink(PartSpec(tmp_path, "faq", "s00000-of-00001", schema, "id", 10**9, 10**12, 3))
    sink.recover()

    def append():
        sink.add(batch)
        sink.flush()
        sink.buffer, sink.buffered = [], 0  # journal only: no Parquet row group in this measurement

    benchmark(append)
    assert sink.rows_total > 0


@pytest.mark.parametrize("level", [1, 3, 9])
def test_parquet_zstd_write(benchmark, tmp_path, documents, level):
    table = pa.Table.from_pydict(_rows(documents, 512), schema=result_schema(None))

    def write():
        pq.write_table(table, tmp_path / f"z{level}.parquet", compression="zstd", compression_level=level)
        return (tmp_path / f"z{level}.parquet").stat().st_size

    assert benchmark(write) > 0
