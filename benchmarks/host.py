"""Host-overhead benchmark: can the engine's host side keep a GPU fed?

Measured side by side in one process on the same documents (ratios are what count; absolute rates
are context for this machine):
  1. tokenizer alone: the model's tokenizer batch-encodes the texts, already in memory;
  2. Parquet I/O alone: read the input Parquet and write the texts plus completion-sized strings as
     zstd Parquet, with no engine;
  3. the engine: `engine run` (in process) with the instant backend producing `--completion-tokens`
     tokens per document, zstd Parquet output, journal (checkpointing) on. The diversity report that
     follows a run is an analysis of the finished output, not the data path: it is timed apart
     (`report_seconds`, a bounded cost: it samples 5,000 outputs).
Target: engine documents/s >= 75% of the tokenizer's documents/s.

    .venv/bin/python -m benchmarks.host --docs 20000
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.corpus import write_corpus
from engine.config.run_config import load_config
from engine.model.locate import resolve_model
from engine.run import Run


def tokenizer_alone(tok, texts: list[str], batch: int) -> float:
    fast = tok.backend_tokenizer
    t = time.perf_counter()
    n_tokens = 0
    for i in range(0, len(texts), batch):
        n_tokens += sum(len(e.ids) for e in fast.encode_batch_fast(texts[i:i + batch], add_special_tokens=False))
    return time.perf_counter() - t, n_tokens


def parquet_alone(src: Path, dst: Path, completion_chars: int, level: int, batch: int) -> float:
    t = time.perf_counter()
    pf = pq.ParquetFile(src)
    writer = None
    for rb in pf.iter_batches(batch_size=batch):
        texts = rb.column("text").to_pylist()
        gen = [tx[:completion_chars] for tx in texts]
        table = pa.Table.from_pydict({"id": rb.column("id"), "generation": gen, "text": texts, "url": rb.column("url")})
        if writer is None:
            writer = pq.ParquetWriter(dst, table.schema, compression="zstd", compression_level=level)
        writer.write_table(table)
    writer.close()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--completion-tokens", type=int, default=400)
    ap.add_argument("--model", default="embedded", help="whose tokenizer and chat template")
    ap.add_argument("--out", default="runs/out/bench", help="where the JSON result goes")
    ap.add_argument("--set", action="append", default=[], help="extra engine config overrides")
    args = ap.parse_args(argv)
    # Imports are a per-process constant, not throughput: load the libraries before timing anything.
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401
    from transformers.models.llama import configuration_llama  # noqa: F401

    work = Path(tempfile.mkdtemp(prefix="bench-host-"))
    try:
        src = write_corpus(work / "input.parquet", args.docs)
        texts = pq.read_table(src, columns=["text"]).column(0).to_pylist()
        model_dir, _ = resolve_model(args.model)
        tok = AutoTokenizer.from_pretrained(model_dir)
        chars = sum(map(len, texts))
        t_tok, n_tok = tokenizer_alone(tok, texts, 512)
        t_io = parquet_alone(src, work / "io.parquet", 4 * args.completion_tokens, 3, 512)
        overrides = [f"input.paths=['{src}']", f"output.dir={work / 'out'}", "backend=instant",
                     f"instant.completion_tokens={args.completion_tokens}", f"model.name={args.model}",
                     f"sampling.max_new_tokens={args.completion_tokens}", "prompts=['tutorial']",
                     "report.enabled=false", *args.set]
        cfg = load_config(None, overrides)
        t = time.perf_counter()
        code, summary = Run(cfg).execute()
        summary = summary.to_dict()  # the figures as summary.json has them
        t_engine = time.perf_counter() - t
        assert code == 0 and summary["documents_stored"]["tutorial"] == args.docs, summary
        from engine.output.report import write_report
        t = time.perf_counter()
        write_report(work / "out")
        t_report = time.perf_counter() - t
        n = args.docs
        result = {
            "documents": n, "mean_chars": round(chars / n), "input_tokens": n_tok,
            "completion_tokens_per_doc": args.completion_tokens,
            "tokenizer_docs_per_s": round(n / t_tok, 1), "tokenizer_tokens_per_s": round(n_tok / t_tok),
            "parquet_io_docs_per_s": round(n / t_io, 1),
            "engine_docs_per_s": round(n / t_engine, 1),
            "engine_output_tokens_per_s": round(summary["output_tokens"] / t_engine),
            "engine_vs_tokenizer": round(t_tok / t_engine, 3),
            "engine_vs_parquet_io": round(t_io / t_engine, 3),
            "report_seconds": round(t_report, 2),
            "target_engine_vs_tokenizer": 0.75,
        }
        result["meets_target"] = result["engine_vs_tokenizer"] >= 0.75
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "host.json").write_text(json.dumps(result, indent=2))
        width = max(map(len, result))
        for k, v in result.items():
            print(f"{k:<{width}}  {v}")
        return 0 if result["meets_target"] else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
