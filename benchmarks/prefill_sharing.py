"""One prefill per document, measured: render.layout = "document_last" vs "document_first", side by side.

    .venv/bin/python -m benchmarks.prefill_sharing --docs 16 --max-new-tokens 256 --backends torch,vllm \
        --out runs/bench/prefill-sharing

The same real-text documents (package READMEs and Python documentation topics, as benchmarks/repetition.py,
cut to `--max-chars`), the same four prompts (faq, math, table, tutorial), the embedded SmolLM2-135M-Instruct,
the same sampling; each configuration is one `engine run` subprocess, one after the other.

- **order**: no model runs. The requests of both layouts for `--order-docs` documents of benchmarks/corpus.py
  (web-like text, log-normal lengths), rendered by the engine's Renderer (real tokenizer), ordered by the
  scheduler's length_buckets window by window (`scheduler.lookahead`; document_last: by prompt and length;
  document_first: document-major), cut into consecutive batches of `--batch-size`: the padding share of the
  batches (what length bucketing saves) and the documents whose four prompts land in more than one batch.
  Unbucketed arrival order for reference.
- **throughput** (`sampling.ignore_eos` and the repetition stop off: every row generates exactly
  `--max-new-tokens`, so both layouts do the same decode work): prompt tokens computed per document (the
  backend's own cached-token counts), output tok/s over generation time (start-up reported apart), wall time.
- **quality** (the model's own endings): finish reasons, useful share, output length distribution, and the
  diversity report's figures per prompt. The layout changes what the model reads; this says how the outputs
  differ on this model, not how a model trained on them would.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from benchmarks.repetition import documents, engine_run, write_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["faq", "math", "table", "tutorial"]
LAYOUTS = ["document_last", "document_first"]


def order_figures(docs: list[dict], batch_size: int, lookahead: int) -> list[dict]:
    """Padding share and documents kept together, per layout and order (module doc): the requests in arrival
    order (a document's prompts together), sorted window by window of `lookahead` requests as the producer
    does, cut into batches of `batch_size`."""
    from engine.config.run_config import RunConfig
    from engine.model.setup import ModelSetup
    from engine.render.prompts import load_prompts
    from engine.render.renderer import Renderer
    from engine.schedule.buckets import length_buckets
    from engine.types import Request

    cfg = RunConfig()
    setup = ModelSetup.load(cfg)
    out = []
    for layout in LAYOUTS:
        renderer = Renderer(setup.tokenizer, load_prompts(PROMPTS, layout), setup.context, 256)
        encoded = renderer.encode_documents([d["text"] for d in docs])
        reqs, doc_of = [], {}
        for d, (doc, ids) in enumerate(zip(docs, encoded)):
            for p in PROMPTS:
                full, _ = renderer.request_ids(p, doc["text"], ids)
                reqs.append(Request(len(reqs), p, full, renderer.prefix_len(p, full), 256))
                doc_of[reqs[-1].key] = d
        bucketed = [r for i in range(0, len(reqs), lookahead)
                    for r in length_buckets(reqs[i:i + lookahead], True, None, layout == "document_first")]
        orders = {"arrival (no buckets)": reqs, "length_buckets": bucketed}
        for name, order in orders.items():
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            padded = sum(max(len(r.input_ids) for r in b) * len(b) for b in batches)
            real = sum(len(r.input_ids) for r in order)
            together = sum(len({doc_of[r.key] for r in b}) for b in batches)  # documents touched per batch
            split = together - len(docs)  # a document split over k batches counts k - 1
            out.append({"layout": layout, "order": name, "padding_share": round(1 - real / padded, 4),
                        "documents_split_across_batches": split, "prompt_tokens": real,
                        "shared_prefix_tokens": sum(r.prefix_len for r in order)})
    return out


def run_one(work: Path, docs: Path, backend: str, layout: str, ignore_eos: bool, a) -> dict:
    tag = f"{backend}-{layout}-{'fixed' if ignore_eos else 'natural'}{a.tag}"
    out, cfg = work / f"out-{tag}", work / f"{tag}.toml"
    write_config(cfg, backend, PROMPTS, docs, out, f"""[render]
layout = "{layout}"
[sampling]
max_new_tokens = {a.max_new_tokens}
temperature = 0.7
top_p = 0.95
ignore_eos = {"true" if ignore_eos else "false"}
[repetition]
enabled = {"false" if ignore_eos else "true"}
[torch]
batch_size = {a.batch_size}
[vllm]
engine_args = {a.vllm_engine_args}
[report]
enabled = {"false" if ignore_eos else "true"}
""")
    s, wall = engine_run(cfg, out, tag, a.timeout)
    row = {"backend": backend + a.tag, "layout": layout, "pass": "fixed length" if ignore_eos else "natural endings",
           "wall_s": round(wall, 1), "startup_s": s.get("process_startup_s") or s["startup_s"],
           "generation_s": s["generation_s"], "output_tokens": s["output_tokens"],
           "output_tokens_per_s": s["output_tokens_per_s"], "prompt_tokens": s["input_tokens"],
           "cached_prompt_tokens": s["cached_tokens"], "computed_prompt_tokens": s["computed_prompt_tokens"],
           "documents": a.docs, "computed_per_document": round(s["computed_prompt_tokens"] / a.docs, 1),
           "finish_reasons": s["finish_reasons"], "useful_share": s["useful_share"],
           "per_prompt": s["per_prompt"]}
    if not ignore_eos:
        import pyarrow.parquet as pq

        lengths = {}
        for p in PROMPTS:
            lengths[p] = sorted(t for f in (out / p).glob("*.parquet")
                                for t in pq.read_table(f, columns=["completion_tokens"]).column(0).to_pylist())
        row["length_p10_p50_p90"] = {p: _quantiles(v) for p, v in lengths.items()}
        report = json.loads((out / "report" / "report.json").read_text()) if (out / "report" / "report.json").exists() \
            else {"groups": []}
        row["diversity"] = {g["prompt"]: {"distinct_4grams": round(g.get("distinct_ngrams", {}).get("4", 0), 3),
                                          "repeated_line_rate": round(g.get("repeated_line_rate", 0), 4),
                                          "warnings": g.get("warnings", [])} for g in report["groups"]}
    return row


def _quantiles(v: list[int]) -> list[int]:
    if not v:
        return []
    q = statistics.quantiles(v, n=10, method="inclusive") if len(v) > 1 else [v[0]] * 9
    return [round(q[0]), round(statistics.median(v)), round(q[-1])]


def table(order: list[dict], runs: list[dict], a) -> str:
    lines = [f"# Prefill sharing: document_last vs document_first ({a.docs} documents x {len(PROMPTS)} prompts, "
             f"max_new_tokens {a.max_new_tokens})", "",
             f"Machine: {platform.processor() or platform.machine()}, {_cpu()}; date {time.strftime('%Y-%m-%d')}.",
             "", f"## Order (no model): {a.order_docs} web-like documents x {len(PROMPTS)} prompts, windows of "
             f"{a.lookahead} requests, batches of {a.batch_size}: padding, and documents split across batches", "",
             "| layout | order | padding share | documents split | prompt tokens | shared-prefix tokens |",
             "|---|---|---:|---:|---:|---:|"]
    for o in order:
        lines.append(f"| {o['layout']} | {o['order']} | {o['padding_share']:.1%} | "
                     f"{o['documents_split_across_batches']} | {o['prompt_tokens']:,} | "
                     f"{o['shared_prefix_tokens']:,} |")
    lines += ["", "## Throughput (ignore_eos: the same decode work in both layouts)", "",
              "| backend | layout | computed prompt tokens / document | cached share | output tok/s | generation s "
              "| start-up s | wall s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    fixed = [r for r in runs if r["pass"] == "fixed length"]
    for r in fixed:
        lines.append(f"| {r['backend']} | {r['layout']} | {r['computed_per_document']:,.0f} | "
                     f"{r['cached_prompt_tokens'] / max(r['prompt_tokens'], 1):.0%} | {r['output_tokens_per_s']:,.1f} "
                     f"| {r['generation_s']:.1f} | {r['startup_s']:.1f} | {r['wall_s']:.1f} |")
    for b in sorted({r["backend"] for r in fixed}):
        pair = {r["layout"]: r for r in fixed if r["backend"] == b}
        if len(pair) == 2:
            last, first = pair["document_last"], pair["document_first"]
            computed = first["computed_per_document"] / max(last["computed_per_document"], 1)
            speed = first["output_tokens_per_s"] / max(last["output_tokens_per_s"], 1e-9)
            lines.append(f"\n{b}: computed prompt tokens per document {computed:.2f}x of document_last; "
                         f"output tok/s {speed:.2f}x.")
    natural = [r for r in runs if r["pass"] == "natural endings"]
    if natural:
        lines += ["", "## Quality signals (the model's own endings)", "",
                  "| backend | layout | prompt | finish reasons | useful share | output tokens p10/p50/p90 "
                  "| distinct 4-grams | repeated lines |", "|---|---|---|---|---:|---|---:|---:|"]
        for r in natural:
            for p in PROMPTS:
                q = r["per_prompt"].get(p, {})
                div = r.get("diversity", {}).get(p, {})
                useful = q.get("useful_output_tokens", 0) / max(q.get("output_tokens", 0), 1)
                reasons = ", ".join(f"{k} {v}" for k, v in sorted(q.get("finish_reasons", {}).items()))
                lens = "/".join(map(str, r["length_p10_p50_p90"].get(p, [])))
                lines.append(f"| {r['backend']} | {r['layout']} | {p} | {reasons} | {useful:.0%} | {lens} | "
                             f"{div.get('distinct_4grams', '')} | {div.get('repeated_line_rate', 0):.1%} |")
            lines.append(f"| {r['backend']} | {r['layout']} | all | "
                         + ", ".join(f"{k} {v}" for k, v in sorted(r["finish_reasons"].items()))
                         + f" | {r['useful_share']:.0%} | | | |")
    return "\n".join(lines) + "\n"


def _cpu() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    model = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")), "?")
    isa = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "AVX2"
    import os
    return f"{model}, {os.cpu_count()} cores, {isa}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--max-chars", type=int, default=4000)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--backends", default="torch,vllm")
    ap.add_argument("--batch-size", type=int, default=16, help="torch.batch_size, and the batches of the order figures")
    ap.add_argument("--passes", default="fixed,natural",
                    help="fixed (ignore_eos: throughput), natural (quality); empty: the order figures alone, "
                         "kept with the runs already in --out")
    ap.add_argument("--order-docs", type=int, default=1024)
    ap.add_argument("--vllm-engine-args", default="{}", help='[vllm] engine_args as TOML, e.g. "{ block_size = 32 }"')
    ap.add_argument("--tag", default="", help="appended to the backend's name in the results (a variant)")
    ap.add_argument("--lookahead", type=int, default=2048, help="scheduler.lookahead of the order figures")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "prefill-sharing")
    a = ap.parse_args()
    a.out = a.out.resolve()  # the configs name their paths absolutely: a run's paths are its config's
    a.out.mkdir(parents=True, exist_ok=True)
    docs = documents(a.docs, a.max_chars)
    a.docs = len(docs)
    path = a.out / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in docs))
    from benchmarks.corpus import make_documents

    order = order_figures(make_documents(a.order_docs), a.batch_size, a.lookahead)
    print(json.dumps(order, indent=1), flush=True)
    runs = []  # the runs of earlier invocations in --out are kept, unless this one measures them again
    earlier = json.loads((a.out / "results.json").read_text())["runs"] if (a.out / "results.json").exists() else []
    for pass_ in filter(None, a.passes.split(",")):
        for backend in a.backends.split(","):
            for layout in LAYOUTS:
                r = run_one(a.out, path, backend, layout, pass_ == "fixed", a)
                print(f"{backend} {layout} {pass_}: {r['output_tokens_per_s']} tok/s, computed/doc "
                      f"{r['computed_per_document']}, generation {r['generation_s']} s", flush=True)
                runs.append(r)
    again = {(r["backend"], r["layout"], r["pass"]) for r in runs}
    runs = [r for r in earlier if (r["backend"], r["layout"], r["pass"]) not in again] + runs
    (a.out / "results.json").write_text(json.dumps({"order": order, "runs": runs}, indent=1))
    (a.out / "table.md").write_text(table(order, runs, a))
    print((a.out / "table.md").read_text())


if __name__ == "__main__":
    main()
