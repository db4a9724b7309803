"""The repetition stop measured: `engine run` with the stop on and off, side by side in one run.

    .venv/bin/python -m benchmarks.repetition --docs 32 --max-new-tokens 1024 --backends vllm,torch \
        --prompts faq,table,math --out runs/bench/repetition

Documents: real text shipped inside installed packages (no download): the README pages of the installed
distributions (their METADATA descriptions: markdown with lists, tables and code, as on the web) and
Python's own documentation topics (`pydoc_data.topics`), cut to `--max-chars`. Every configuration
(backend x stop on/off) is one `engine run` subprocess on the same documents, prompts and sampling,
one after the other. Reported from each run's summary.json and its stored rows: raw and useful output
tok/s (over generation time: start-up excluded), seconds per 1k useful tokens, the share of rows
stopped for repetition, per prompt; and the loop check: stored rows NOT marked "repetition" whose
generation, re-tokenised, ends in a loop by the issue's definition (one n-gram of up to 32 tokens
repeated >= 4 times to the end), with and without a minimum span of 32 tokens. The stopped rows'
loops are listed (`loops.md`) so a reader can judge them. For a run without the stop, the rows the stop
would have ended are counted, and among them those the model then finished itself (`stop`): the useful
rows the stop costs.

The torch runs set `sampling.seed`: each request has its own generator, so with the stop on and off a
row draws the same tokens until the stop fires (a paired comparison: the useful rows differ only where
the stop ended a row). vLLM's CPU engine refuses per-request seeds, so its two runs are independent
samples and their useful counts differ by chance as well.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def documents(n: int, max_chars: int) -> list[dict]:
    """`n` documents: package READMEs (two thirds) and Python documentation topics, interleaved."""
    import importlib.metadata as md
    from pydoc_data.topics import topics

    readmes, seen = [], set()
    for d in sorted(md.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower()):
        name = (d.metadata.get("Name") or "").lower()
        body = d.metadata.get_payload() if hasattr(d.metadata, "get_payload") else ""
        text = (d.metadata.get("Description") or body or "").strip()
        if name and name not in seen and 1500 <= len(text):
            seen.add(name)
            readmes.append({"id": f"readme-{name}", "text": text[:max_chars], "source": "package README"})
    docs = [{"id": f"pydoc-{k}", "text": v.strip()[:max_chars], "source": "Python docs"}
            for k, v in sorted(topics.items()) if len(v) >= 1500]
    want = n - n // 3  # two READMEs for one documentation topic, each set spread over its whole range
    readmes = [readmes[int(i * len(readmes) / want)] for i in range(min(want, len(readmes)))]
    docs = [docs[int(i * len(docs) / (n - len(readmes)))] for i in range(min(n - len(readmes), len(docs)))]
    out = []
    for i in range(max(len(readmes), len(docs))):
        out += ([readmes[i]] if i < len(readmes) else []) + ([docs[i]] if i < len(docs) else [])
    return out[:n]


def loop_span(ids: list[int], max_n: int = 32, count: int = 4) -> int:
    """Tokens of the loop `ids` end in (the issue's definition: an n-gram of up to `max_n` tokens repeated
    >= `count` times to the end, followed back as far as it goes); 0 when none. With max_n = 160 and
    count = 3: the paragraph-sized loops (a question and its answer, repeated)."""
    for n in range(1, max_n + 1):
        if n * count > len(ids):
            return 0
        tail = ids[-n * count:]
        if tail[n:] == tail[:-n]:
            start = len(ids) - n
            while start > 0 and ids[start - 1] == ids[start - 1 + n]:
                start -= 1
            return len(ids) - start
    return 0


def first_stop(ids: list[int], rs) -> int:
    """Where the stop would have fired on `ids` (the first prefix that ends in a loop), else -1."""
    from engine.backends.repetition import loop_period

    for end in range(rs.min_pattern * rs.min_count, len(ids) + 1):
        if loop_period(ids[:end], rs):
            return end
    return -1


def parse_candidates(text: str):
    """"8-32x4,8-128x3" -> RepetitionStop(8, 32, 4), RepetitionStop(8, 128, 3)."""
    from engine.types import RepetitionStop

    out = []
    for item in filter(None, text.split(",")):
        span, count = item.split("x")
        lo, hi = span.split("-")
        out.append(RepetitionStop(min_pattern=int(lo), max_pattern=int(hi), min_count=int(count)))
    return out


def paragraph_loop(ids: list[int]) -> int:
    """Tokens of a paragraph-sized loop `ids` end in (an n-gram of up to 160 tokens, >= 3 copies, >= 64
    tokens in all), else 0."""
    span = loop_span(ids, max_n=160, count=3)
    return span if span >= 64 else 0


def weigh(rows: list[dict], candidates, tokenizer) -> list[dict]:
    """Each candidate setting on the rows of a run without the stop: rows it would end, of them those the
    model ended itself afterwards (what it costs), tokens it saves, and the loops it leaves (those ending a
    row it does not stop: by the issue's definition, and paragraph-sized)."""
    out = []
    tokenised = [tokenizer(r["generation"] or "", add_special_tokens=False)["input_ids"] for r in rows]
    for rs in candidates:
        c = {"setting": f"{rs.min_pattern}-{rs.max_pattern} x{rs.min_count}", "would_stop": 0,
             "model_ended": 0, "tokens_saved": 0, "loops_left": 0, "paragraph_loops_left": 0, "per_prompt": {},
             "model_ended_rows": []}
        for row, ids in zip(rows, tokenised):
            q = c["per_prompt"].setdefault(row["prompt"], {"rows": 0, "would_stop": 0, "model_ended": 0})
            q["rows"] += 1
            if row["finish_reason"] == "error":
                continue
            at = first_stop(ids, rs)
            if at >= 0:
                c["would_stop"] += 1
                q["would_stop"] += 1
                c["tokens_saved"] += len(ids) - at
                if row["finish_reason"] == "stop":
                    c["model_ended"] += 1
                    q["model_ended"] += 1
                    c["model_ended_rows"].append((row["prompt"], tokenizer.decode(ids[max(0, at - 160):at])))
            else:
                c["loops_left"] += bool(loop_span(ids))
                c["paragraph_loops_left"] += bool(paragraph_loop(ids))
        out.append(c)
    return out


def run_one(cfg_dir: Path, docs: Path, backend: str, stop: bool, a) -> dict:
    out = cfg_dir / f"out-{backend}-{'on' if stop else 'off'}"
    cfg = cfg_dir / f"{backend}-{'on' if stop else 'off'}.toml"
    write_config(cfg, backend, a.prompts.split(","), docs, out, f"""[sampling]
max_new_tokens = {a.max_new_tokens}
temperature = {a.temperature}
top_p = 0.95
{"seed = 1" if backend == "torch" else ""}
[repetition]
enabled = {"true" if stop else "false"}
[torch]
batch_size = {a.batch_size}
[report]
enabled = false
""")
    summary, wall = engine_run(cfg, out, f"{backend} stop={stop}", a.timeout)
    return {"backend": backend, "stop": stop, "wall_s": round(wall, 1), "out": str(out), "summary": summary}


def write_config(cfg: Path, backend: str, prompts: list[str], docs: Path, out: Path, rest: str) -> None:
    """A run config of the embedded model over `docs` into `out`; `rest`: its other sections, as TOML."""
    cfg.write_text(f"""backend = "{backend}"
prompts = {json.dumps(prompts)}
[input]
paths = ["{docs}"]
[output]
dir = "{out}"
[model]
name = "embedded"
""" + rest)


def engine_run(cfg: Path, out: Path, what: str, timeout: float) -> tuple[dict, float]:
    """`engine run CFG --overwrite` in its own process: its summary.json and the wall time; a failure stops the
    benchmark, naming `what` and the end of its stderr."""
    t = time.perf_counter()
    proc = subprocess.run([str(ROOT / ".venv/bin/engine"), "run", str(cfg), "--overwrite"], capture_output=True,
                          text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{what}: engine run exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text()), wall


def analyse(r: dict, tokenizer) -> dict:
    import pyarrow.parquet as pq

    s = r["summary"]
    gen, useful, raw = s["generation_s"], s["useful_output_tokens"], s["output_tokens"]
    rows, per_prompt, loops = [], {}, []
    for part in sorted(Path(r["out"]).glob("*/*.parquet")):
        if part.parent.name.startswith(("_", "rejected")):
            continue
        rows += pq.read_table(part, columns=["prompt", "generation", "finish_reason", "completion_tokens"]).to_pylist()
    from engine.types import RepetitionStop
    rs = RepetitionStop()  # the defaults: where would they have stopped the rows of a run without the stop?
    unmarked = unmarked_32 = paragraphs = 0
    would = []
    for row in rows:
        q = per_prompt.setdefault(row["prompt"], {"rows": 0, "repetition": 0, "length": 0, "unmarked_loops": 0,
                                                  "would_stop": 0, "would_stop_finished": 0})
        q["rows"] += 1
        q[row["finish_reason"]] = q.get(row["finish_reason"], 0) + 1
        ids = tokenizer(row["generation"] or "", add_special_tokens=False)["input_ids"]
        paragraphs += row["finish_reason"] not in ("repetition", "error") and bool(paragraph_loop(ids))
        if row["finish_reason"] == "repetition":
            loops.append((row["prompt"], row["generation"][-300:], row["completion_tokens"], len(ids)))
        elif (span := loop_span(ids)) and row["finish_reason"] != "error":
            unmarked += 1
            unmarked_32 += span >= 32
            q["unmarked_loops"] += 1
        if not r["stop"] and (at := first_stop(ids, rs)) >= 0:
            q["would_stop"] += 1
            q["would_stop_finished"] += row["finish_reason"] == "stop"  # the model ended it after the loop
            would.append((row["prompt"], tokenizer.decode(ids[max(0, at - 120):at]), row["finish_reason"], at))
    n = len(rows) or 1
    candidates = weigh(rows, r["candidates"], tokenizer) if not r["stop"] and r.get("candidates") else []
    return {"backend": r["backend"], "stop": r["stop"], "rows": len(rows), "generation_s": gen,
            "candidates": candidates, "paragraph_loops": paragraphs,
            "startup_s": s["startup_s"], "output_tokens": raw, "useful_output_tokens": useful,
            "raw_tok_s": round(raw / gen, 1) if gen else 0.0, "useful_tok_s": round(useful / gen, 1) if gen else 0.0,
            "s_per_1k_useful": round(gen / useful * 1000, 1) if useful else None,
            "stopped_share": round(sum(x["repetition"] for x in per_prompt.values()) / n, 3),
            "length_share": round(sum(x["length"] for x in per_prompt.values()) / n, 3),
            "unmarked_loops": unmarked, "unmarked_loops_32": unmarked_32, "per_prompt": per_prompt, "loops": loops,
            "would_stop": would}


def markdown(results: list[dict], cpu: str, load: str) -> str:
    lines = [f"CPU: {cpu}; {load}", "",
             "| backend | stop | rows | gen s | out tok | useful tok | raw tok/s | useful tok/s | s / 1k useful "
             "| stopped | length | unmarked loops (any / >= 32 tok) | unmarked paragraph loops |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in results:
        lines.append(f"| {x['backend']} | {'on' if x['stop'] else 'off'} | {x['rows']} | {x['generation_s']:.0f} | "
                     f"{x['output_tokens']:,} | {x['useful_output_tokens']:,} | {x['raw_tok_s']} | {x['useful_tok_s']} "
                     f"| {x['s_per_1k_useful']} | {x['stopped_share']:.1%} | {x['length_share']:.1%} | "
                     f"{x['unmarked_loops']} / {x['unmarked_loops_32']} | {x['paragraph_loops']} |")
    lines += ["", "| backend | stop | prompt | rows | stopped (repetition) | length | unmarked loops "
              "| stop off: rows the stop would have ended (of them finished by the model) |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for x in results:
        for prompt, q in sorted(x["per_prompt"].items()):
            lines.append(f"| {x['backend']} | {'on' if x['stop'] else 'off'} | {prompt} | {q['rows']} | "
                         f"{q['repetition']} | {q['length']} | {q['unmarked_loops']} | "
                         f"{q['would_stop'] if not x['stop'] else '-'}"
                         f"{'' if x['stop'] else ' (' + str(q['would_stop_finished']) + ')'} |")
    if any(x.get("candidates") for x in results):
        lines += ["", "Detector settings weighed on the rows of the runs without the stop (min-max pattern x copies):",
                  "", "| backend | setting | rows it would end | of them ended by the model | tokens saved "
                  "| loops left (issue's definition) | paragraph loops left | per prompt: would end (model ended) |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for x in results:
            for c in x.get("candidates", []):
                per = ", ".join(f"{p} {q['would_stop']} ({q['model_ended']})"
                                for p, q in sorted(c["per_prompt"].items()))
                lines.append(f"| {x['backend']} | {c['setting']} | {c['would_stop']} of {x['rows']} | "
                             f"{c['model_ended']} | {c['tokens_saved']:,} | {c['loops_left']} | "
                             f"{c['paragraph_loops_left']} | {per} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.repetition", description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--max-chars", type=int, default=3000)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--backends", default="vllm,torch")
    ap.add_argument("--prompts", default="faq,table,math")
    ap.add_argument("--stops", default="on,off", help="the repetition stop settings to run (on, off or both)")
    ap.add_argument("--batch-size", type=int, default=16, help="torch.batch_size")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--candidates", default="8-32x4,8-128x3,12-128x3,16-128x3,16-128x4",
                    help="detector settings weighed on the rows of the runs without the stop: min-max pattern x copies")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "repetition"))
    a = ap.parse_args(argv)
    from engine.machine import cpu_label
    from engine.model.locate import resolve_model

    out = Path(a.out).resolve()  # the config it writes resolves paths against its own folder
    out.mkdir(parents=True, exist_ok=True)
    docs = documents(a.docs, a.max_chars)
    if len(docs) < a.docs:
        print(f"only {len(docs)} documents found in the installed packages", file=sys.stderr)
    src = out / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in docs))
    cpu = cpu_label()
    load = f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded")[0])
    results = []
    for backend in a.backends.split(","):
        for stop in [s == "on" for s in a.stops.split(",")]:
            print(f"{backend} stop={'on' if stop else 'off'} ...", file=sys.stderr, flush=True)
            r = analyse({**run_one(out, src, backend, stop, a), "candidates": parse_candidates(a.candidates)},
                        tokenizer)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("loops", "per_prompt")}), file=sys.stderr,
                  flush=True)
            (out / "results.json").write_text(json.dumps({"cpu": cpu, "load": load, "args": vars(a),
                                                          "results": results}, indent=1))
    table = markdown(results, cpu, f"{load}; {len(docs)} documents x {a.prompts}, max_new_tokens {a.max_new_tokens}")
    (out / "table.md").write_text(table)
    with open(out / "loops.md", "w") as fh:
        for x in results:
            for prompt, tail, generated, kept in x["loops"]:
                fh.write(f"## {x['backend']} {prompt}: {generated} generated, {kept} kept\n\n```\n{tail}\n```\n\n")
            for prompt, before, reason, at in x["would_stop"]:
                fh.write(f"## stop off, {x['backend']} {prompt} ({reason}): would stop at token {at}, "
                         f"after\n\n```\n{before}\n```\n\n")
            for c in x.get("candidates", []):
                for prompt, before in c["model_ended_rows"]:
                    fh.write(f"## setting {c['setting']}, {x['backend']} {prompt}: would end a row the model ended "
                             f"itself, after\n\n```\n{before}\n```\n\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
