"""`engine run CONFIG --dry-run`: what a run would do and cost, before it spends anything; it writes nothing.

    checks     every check a run makes before start-up (engine/preflight.py, the input's own preflight, and
               for an existing output.dir the run fingerprint: a run that would be refused with 2 is refused)
    counts     input rows (the whole input, and this shard's), requests (rows x prompts)
    prompts    one rendered prompt per prompt (the first document of the shard, through the chat template)
    tokens     prompt tokens (from up to SAMPLE_DOCS documents, scaled to the shard) and the most output tokens
               (requests x each prompt's max_new_tokens: rows that stop earlier generate fewer)
    time       time and GPU-hours at the output tok/s per GPU of every figure that applies, each with its
               source: --throughput TOK_S (yours), `engine bench` results for this model (RESULTS/results.jsonl
               of a sweep: --bench PATH, and runs/out/bench/*/ under the current directory), and the published
               vLLM figures on one H100 (PUBLISHED). No figure: the plan says so and how to get one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from engine.backends import context_reserve
from engine.config.run_config import DOCUMENT_FIRST, DOCUMENT_LAST, RunConfig
from engine.fingerprint import run_fingerprint
from engine.input.reader import Reader
from engine.model.locate import EMBEDDED, EMBEDDED_NAME, TINY, TINY_NAME
from engine.model.setup import ModelSetup
from engine.output.layout import read_fingerprint, shard_tag
from engine.preflight import preflight
from engine.render.prompts import load_prompts
from engine.render.renderer import Renderer
from engine.stores import is_remote

log = logging.getLogger(__name__)

GPU_ENGINES = ("vllm", "sglang", "http")  # the backends the published figures can stand for
SAMPLE_DOCS = 1000  # documents tokenised for the prompt-token estimate
SAMPLE_CHARS = 1600  # a rendered prompt longer than this is shown as its start and end

# Output tokens/s per GPU on one H100 80GB, vLLM 0.15, FineWeb-Edu rewritten as tutorials, context 8192, up to
# 4096 new tokens: (vLLM's defaults, best tuned), as published (README "Performance"; the sweep
# runs/bench/h100_18models_vllm.toml carries the same figures as its `reference`, and a test keeps them equal).
PUBLISHED_SOURCE = "published, one H100 80GB, vLLM 0.15, tutorial rewrite of FineWeb-Edu, context 8192"
PUBLISHED: dict[str, tuple[int, int]] = {
    "smollm2-135m": (28391, 45540), "smollm2-360m": (17887, 23996), "smollm2-1.7b": (5255, 9220),
    "gemma-3-270m": (22996, 23585), "gemma-3-1b": (14838, 16762), "gemma-3-4b": (8501, 9253),
    "gemma-3-12b": (2999, 3046), "gemma-3-27b": (1724, 1724), "qwen3-0.6b": (13527, 14069),
    "qwen3-1.7b": (11710, 12313), "qwen3-4b": (7919, 8086), "qwen3-8b": (6338, 6443), "qwen3-14b": (4414, 4549),
    "qwen3-32b": (1987, 2078), "qwen3-30b-a3b": (2977, 5310), "qwen3-next-80b-a3b": (2034, 2678),
    "gpt-oss-20b": (12432, 14671), "gpt-oss-120b": (3138, 6117),
}


def model_key(name: str) -> str:
    """'HuggingFaceTB/SmolLM2-1.7B-Instruct', '/models/SmolLM2-1.7B-Instruct', 'embedded' -> 'smollm2-1.7b'."""
    name = {EMBEDDED: EMBEDDED_NAME, TINY: TINY_NAME}.get(name, name)
    key = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix in ("-instruct", "-it"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    return key


@dataclass
class Throughput:
    tok_s: float  # output tokens/s per GPU
    source: str  # where the figure comes from


@dataclass
class PromptPlan:
    name: str
    max_new_tokens: int
    prompt_tokens: int  # over the shard (exact when every document was sampled, else scaled from the sample)
    output_tokens_max: int  # requests x max_new_tokens
    truncated: int  # sampled documents cut to fit the context
    sample: str  # one rendered prompt


@dataclass
class Plan:
    model: str
    backend: str
    output_dir: str
    shard: str
    shard_count: int
    input_rows: int  # the whole input
    rows: int  # this shard's
    sampled: int  # documents tokenised for the estimate
    exact: bool  # every document of the shard was sampled
    resumes: bool  # output.dir holds results of this configuration (a run would resume them)
    prompts: list[PromptPlan] = field(default_factory=list)
    throughputs: list[Throughput] = field(default_factory=list)
    layout: str = DOCUMENT_LAST
    computed_at_best: int = 0  # prompt tokens left to compute when every shared prefix is computed once
    unit_rows: int = 0  # input.unit_rows: workers claim units of this many rows (0: none)
    units: int = 0

    @property
    def requests(self) -> int:
        return self.rows * len(self.prompts)

    @property
    def output_tokens_max(self) -> int:
        return sum(p.output_tokens_max for p in self.prompts)


def make_plan(cfg: RunConfig, bench: list[str] = (), throughput: float | None = None, overwrite: bool = False,
              extend_input: bool = False) -> Plan:
    """Check everything a run checks before start-up, then count, render and estimate; nothing is written.
    `overwrite` / `extend_input`: as `engine run` would be given them (the resume check follows them)."""
    preflight(cfg)
    prompts = load_prompts(cfg.prompts, cfg.render.layout)
    i, s = cfg.input, cfg.shard
    reader = Reader(i.paths, i.text_column, i.id_column, i.batch_rows, i.max_doc_chars, s.index, s.count)
    reader.preflight()
    whole = reader
    if s.count > 1:
        whole = Reader(i.paths, i.text_column, i.id_column, i.batch_rows, i.max_doc_chars)
        whole.preflight()
    setup = ModelSetup.load(cfg)  # tokenizer and config: no weights
    renderer = Renderer(setup.tokenizer, prompts, setup.context, cfg.sampling.max_new_tokens,
                        cfg.model.system_prompt, reserve=context_reserve(cfg.backend))
    resumes = not overwrite and _check_resume(cfg, prompts, setup, renderer, reader, extend_input)
    docs = []
    for batch in reader.batches():  # whole batches, so that rows_read and the documents agree
        docs += batch.docs
        if len(docs) >= SAMPLE_DOCS:
            break
    rows = reader.total_rows or 0
    exact = reader.rows_read >= rows
    scale = 1.0 if exact else rows / max(reader.rows_read, 1)  # per input row read (rejected rows included)
    encoded = renderer.encode_documents([d.text for d in docs])
    plan = Plan(setup.model_name, cfg.backend, cfg.output.dir, shard_tag(s.index, s.count), s.count,
                whole.total_rows or 0, rows, len(docs), exact, resumes)
    plan.layout = cfg.render.layout
    if i.unit_rows > 0:
        plan.unit_rows, plan.units = i.unit_rows, whole.unit_count(i.unit_rows)
    shared: set[tuple] = set()  # the distinct shared prefixes: one per prompt, or one per document (document_first)
    for p in prompts:
        r = renderer.rendered[p.name]
        lengths, cut = [], 0
        for i, (d, ids) in enumerate(zip(docs, encoded)):
            full, truncated = renderer.request_ids(p.name, d.text, ids)
            lengths.append(len(full))
            cut += truncated
            plen = renderer.prefix_len(p.name, full)
            plan.computed_at_best += len(full) - plen
            shared.add((i, plen) if plan.layout == DOCUMENT_FIRST else (p.name, plen))
        sample = _shorten(setup.tokenizer.decode(renderer.request_ids(p.name, docs[0].text, encoded[0])[0])) \
            if docs else "(no document in this shard)"
        plan.prompts.append(PromptPlan(p.name, r.max_new_tokens, round(sum(lengths) * scale),
                                       rows * r.max_new_tokens, cut, sample))
    plan.computed_at_best = round((plan.computed_at_best + sum(n for _, n in shared)) * scale)
    plan.throughputs = figures(setup.model_name, cfg.model.name, bench, throughput)
    return plan


def _check_resume(cfg: RunConfig, prompts, setup, renderer, reader, extend_input: bool) -> bool:
    """An output.dir that holds results: would this configuration resume them, or be refused (ResumeError)?"""
    if is_remote(cfg.output.dir):
        return False  # a store's fingerprint is checked when the run fetches it
    out = Path(cfg.output.dir)
    old = read_fingerprint(out)
    if old is None:
        return False
    from engine.output.layout import check_fingerprint

    new = run_fingerprint(cfg, prompts, setup, renderer, reader)  # the one definition of what results depend on
    if extend_input or old.get("input", {}).get("files") is None:  # files that joined / an earlier version's
        # output: the run records the input then; here only the rest is compared (nothing is written)
        new = {**new, "input": {k: v for k, v in new["input"].items() if k != "files"}}
    check_fingerprint(out, new, overwrite=False)  # raises ResumeError (status 2); writes nothing when they agree
    return True


def _shorten(text: str) -> str:
    if len(text) <= SAMPLE_CHARS:
        return text
    half = SAMPLE_CHARS // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half:,} characters ...]\n{text[-half:]}"


def figures(model_name: str, config_name: str, bench: list[str], throughput: float | None) -> list[Throughput]:
    """Every output tok/s per GPU figure that applies to this model, yours first."""
    found = []
    if throughput:
        found.append(Throughput(throughput, "--throughput (yours)"))
    keys = {model_key(model_name), model_key(config_name)}
    found += bench_figures(keys, bench)
    for key in keys & set(PUBLISHED):
        default, tuned = PUBLISHED[key]
        found.append(Throughput(default, f"{PUBLISHED_SOURCE}; vLLM's defaults"))
        found.append(Throughput(tuned, f"{PUBLISHED_SOURCE}; best tuned settings"))
    return found


def bench_files(paths: list[str]) -> list[Path]:
    """results.jsonl of each --bench PATH (the file or its sweep's results directory), then runs/out/bench/*/."""
    files = []
    for p in paths:
        path = Path(p).expanduser()
        files.append(path / "results.jsonl" if path.is_dir() else path)
    files += sorted(Path("runs/out/bench").glob("*/results.jsonl"))
    return list(dict.fromkeys(f.resolve() for f in files if f.is_file()))


def bench_figures(keys: set[str], paths: list[str]) -> list[Throughput]:
    """The best `ok` record per (results file, device) of an `engine bench` sweep whose model is this one."""
    best: dict[tuple[Path, str], dict] = {}
    for path in bench_files(paths):
        for line in path.read_bytes().splitlines():
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line cut by a killed sweep
            if not isinstance(rec, dict) or rec.get("outcome") != "ok" or not rec.get("output_tok_s_gpu"):
                continue
            if not keys & {model_key(str(rec.get("model_name", ""))), model_key(str(rec.get("model", "")))}:
                continue
            k = (path, str(rec.get("device", "?")))
            if k not in best or rec["output_tok_s_gpu"] > best[k]["output_tok_s_gpu"]:
                best[k] = rec
    return [Throughput(float(r["output_tok_s_gpu"]), f"engine bench {path.parent.name}: {device}, tier "
                       f"{r.get('tier', '?')} {r.get('knobs') or ''}".rstrip() + f" ({path})")
            for (path, device), r in best.items()]


def _hours(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.0f} min"
    return f"{seconds / 3600:,.1f} h"


def render_plan(plan: Plan) -> str:
    """The plan as `engine run --dry-run` prints it."""
    out = [f"dry run: every check passed; nothing was written (output.dir {plan.output_dir} "
           + ("holds results of this configuration: a run resumes them)" if plan.resumes else "is not created)"),
           f"  model      {plan.model} (backend {plan.backend})",
           f"  input      {plan.input_rows:,} rows" + (f"; shard {plan.shard}: {plan.rows:,} rows"
                                                      if plan.shard_count > 1 else ""),
           f"  requests   {plan.requests:,} ({plan.rows:,} rows x {len(plan.prompts)} prompt(s); rows rejected "
           "or already stored generate none)"]
    if plan.unit_rows:
        out.append(f"  units      {plan.units:,} of {plan.unit_rows:,} rows (input.unit_rows): every `engine run` of "
                   f"this config is a worker that claims them; start one per GPU, or `engine launch slurm|ray "
                   f"CONFIG --workers N`")
    how = "every document" if plan.exact else f"the first {plan.sampled:,} documents, scaled to {plan.rows:,}"
    for p in plan.prompts:
        out.append(f"  {p.name:<10} prompt tokens ~{p.prompt_tokens:,} (from {how}; {p.truncated:,} of "
                   f"{plan.sampled:,} sampled cut to fit the context); output tokens at most {p.output_tokens_max:,} "
                   f"(max_new_tokens {p.max_new_tokens:,})")
    total_out = plan.output_tokens_max
    out.append(f"  tokens     prompt ~{sum(p.prompt_tokens for p in plan.prompts):,}, output at most {total_out:,} "
               "(every request generating max_new_tokens; rows that stop earlier generate fewer)")
    shares = ("the chat header and the document: one prefill per document" if plan.layout == DOCUMENT_FIRST
              else "the chat header and the instruction: each document prefilled once per prompt")
    out.append(f"  layout     {plan.layout} (render.layout; the prompts share {shares}); prompt tokens to compute "
               f"at best ~{plan.computed_at_best:,}, the rest served from the prefix cache")
    if plan.throughputs and total_out:
        out.append("  time       at most, at each figure's output tok/s per GPU (measured at its own settings; "
                   "yours differ):")
        if plan.backend not in GPU_ENGINES:
            out.append(f"    (backend {plan.backend}: the published figures are vLLM's on a GPU and do not apply to "
                       "it; measure this backend with `engine bench`, or give --throughput)")
        for t in plan.throughputs:
            seconds = total_out / t.tok_s
            line = f"    {t.tok_s:>9,.0f} tok/s/GPU: {_hours(seconds)} on one GPU, {seconds / 3600:,.2f} GPU-hours"
            if plan.shard_count > 1 and plan.rows:
                whole = seconds / 3600 * plan.input_rows / plan.rows
                line += f" (whole run of {plan.shard_count} shards: ~{whole:,.1f} GPU-hours)"
            out.append(f"{line}  [{t.source}]")
    elif total_out:
        out.append(f"  time       no throughput figure for {plan.model}: measure one with `engine bench` (then "
                   "--bench RESULTS), or give yours with --throughput TOK_S (output tok/s per GPU)")
    for p in plan.prompts:
        out += [f"--- sample prompt: {p.name} ---", p.sample]
    return "\n".join(out)
