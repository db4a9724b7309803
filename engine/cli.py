"""The `engine` command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


def _shard(value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects i/N (e.g. 3/16), got {value!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {value}: need 0 <= i < N")
    return i, n


def cmd_run(args) -> int:
    logging.getLogger("engine.cli").info("engine run %s: reading the config", args.config)
    from .config import ConfigError, load_config
    from .runner import EXIT_INTERRUPTED, EXIT_OK, EXIT_TOO_MANY_ERRORS, Run, RunFailed

    overrides = list(args.set or [])
    if args.shard:
        overrides += [f"shard.index={args.shard[0]}", f"shard.count={args.shard[1]}"]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .prompts import PromptError
    from .renderer import RenderError
    from .storage import StoreError
    try:
        code, summary = Run(cfg, overwrite=args.overwrite, retry_errors=args.retry_errors).execute()
    except (PromptError, RenderError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as exc:
        print_summary(exc.summary)
        if exc.code == EXIT_USAGE:
            print(f"error: {exc.cause}\nNothing was generated; fix the configuration and run again.", file=sys.stderr)
        elif exc.code == EXIT_TOO_MANY_ERRORS:
            print(f"error: {exc.cause}\nThe run is not complete.", file=sys.stderr)
        else:
            print(f"error: {exc.cause}\nThe run stopped; what finished is saved. Run the same command again to "
                  f"resume.", file=sys.stderr)
        return exc.code
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.gave_up:
            print("The store did not answer; nothing is lost: run the same command again to resume.", file=sys.stderr)
            return 4
        return EXIT_USAGE
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    if code == EXIT_INTERRUPTED:
        print("interrupted: everything finished so far is saved; run the same command again to resume.",
              file=sys.stderr)
    return code if code != EXIT_OK else 0


def print_summary(s: dict) -> None:
    stored = ", ".join(f"{k} {v:,}" for k, v in s["documents_stored"].items())
    rows = s["input_rows"]
    lines = [
        f"{'complete' if s['complete'] else 'incomplete'}: {s['output_dir']}  (shard {s['shard']}, model {s['model']}, "
        f"backend {s['backend']})",
        f"  documents  input rows {rows if rows is not None else '?'}; stored per prompt: {stored}; "
        f"rejected rows {s['rejected_rows']:,}; failed {s['failed']:,}"
        f"{f' ({n:,} in this process)' if (n := s.get('failed_this_process', s['failed'])) != s['failed'] else ''}; "
        f"truncated {s['truncated']:,}",
        f"  generated  {s['requests_generated']:,} requests in {s['wall_seconds']:.1f} s "
        f"({s['requests_per_s']:.2f} req/s); skipped (done before or rejected) {s['requests_skipped']:,}",
        f"  tokens     input {s['input_tokens']:,}  output {s['output_tokens']:,}  "
        f"output {s['output_tokens_per_s']:,.1f} tok/s  prefix-cache hit {s['prefix_cache_hit_rate']:.1%}",
    ]
    for w in s.get("input_warnings", []):
        lines.append(f"  warning    {w}")
    if s.get("report"):
        lines.append(f"  report     {s['report']}")
    for w in s.get("report_warnings", []):
        lines.append(f"  WARNING    {w}")
    print("\n".join(lines))


def cmd_status(args) -> int:
    from .status import render_status
    from .storage import StoreError, is_remote
    try:
        text, complete = render_status(args.output_dir if is_remote(args.output_dir) else Path(args.output_dir))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    print(text)
    return 0 if complete else 1 if args.check else 0


def cmd_report(args) -> int:
    from .report import Thresholds, write_report

    out = Path(args.output_dir)
    if not out.is_dir():
        print(f"error: {out} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    report = write_report(out, args.sample, args.seed, Thresholds(args.top_opening_share, args.distinct_prefix20))
    if not report["groups"]:
        print(f"error: {out} holds no result parts (<prompt>/*.parquet)", file=sys.stderr)
        return 1
    print((out / "report" / "report.md").read_text())
    return 0


def cmd_launch(args) -> int:
    from .config import ConfigError
    from .launch import SlurmOptions, launch_ray, launch_slurm

    try:
        if args.scheduler == "slurm":
            opts = SlurmOptions(gpus_per_shard=int(args.gpus_per_shard if args.gpus_per_shard is not None else 1),
                                cpus_per_shard=int(args.cpus_per_shard), max_concurrent=args.max_concurrent,
                                partition=args.partition, account=args.account, qos=args.qos, time=args.time,
                                signal_seconds=args.signal_seconds, job_name=args.job_name,
                                extra=tuple(args.sbatch or ()))
            return launch_slurm(Path(args.config), args.shards, opts, list(args.set or []), args.submit, args.dry_run)
        return launch_ray(Path(args.config), args.shards, args.address, args.gpus_per_shard, args.cpus_per_shard,
                          args.max_retries, list(args.set or []))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cmd_serve(args) -> int:
    from .serve import serve
    serve(args.host, args.port, args.backend, args.model, args.completion_tokens, args.delay_ms, args.fail_rate,
          args.temperature, served_name=args.served_model_name)
    return 0


def _ratio(args) -> float:
    """The synthetic share, checked before any token is counted (that can take hours on real data)."""
    from .handoff import PRESETS
    from .handoff.sources import SourceError
    ratio = args.ratio if args.ratio is not None else PRESETS[args.preset]
    if not 0 < ratio < 1:
        raise SourceError(f"--ratio {ratio}: the synthetic share must be between 0 and 1 (exclusive)")
    return ratio


def cmd_mix(args) -> int:
    from .handoff.mix import run_mix
    from .handoff.sources import SourceError, generated_prompts, load_tokenizer
    from .reader import InputError

    if not args.output_dir or not args.mix_in:
        print("error: engine mix needs OUTPUT_DIR and --mix-in PATH", file=sys.stderr)
        return EXIT_USAGE
    try:
        ratio = _ratio(args)
        prompts = generated_prompts(Path(args.output_dir), _prompts_for_preset(args))
        tokenizer, name = load_tokenizer(args.tokenizer)
        s = run_mix(Path(args.output_dir).resolve(), args.mix_in, Path(args.out).resolve(), ratio, args.seed,
                    tokenizer, name,
                    prompts, args.text_column, args.shuffle_window, args.part_rows, args.overwrite,
                    say=lambda m: print(m, file=sys.stderr), keep_truncated=args.keep_truncated)
    except (SourceError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    g, o = s["sources"]["generated"], s["sources"]["mix-in"]
    print(f"mix written to {s['out']} ({len(s['parts'])} part(s), zstd Parquet, column `source`)\n"
          f"  generated  {g['rows']:,} rows  {g['tokens']:,} tokens   (of {s['available']['generated']['tokens']:,})\n"
          f"  mix-in     {o['rows']:,} rows  {o['tokens']:,} tokens   (of {s['available']['mix-in']['tokens']:,})\n"
          f"  synthetic share {s['ratio_achieved']:.1%} of tokens (asked {s['ratio_requested']:.0%}), "
          f"seed {s['seed']}, "
          f"tokens counted with {s['tokenizer']}\n"
          f"  prompts    {', '.join(s['prompts'])}")
    for source, counts in s["skipped"].items():
        for reason, n in counts.items():
            print(f"  left out   {source}: {n:,} x {reason}")
    return 0


def _split(value: str | None) -> list[str] | None:
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


def cmd_export(args) -> int:
    if args.target == "lighteval":
        from .handoff.lighteval_export import export_lighteval
        try:
            r = export_lighteval(Path(args.out).resolve(), _split(args.tasks), args.checkpoint, args.max_samples,
                                 Path(args.results).resolve() if args.results else None)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"tasks file  {r['tasks_file']}\ntask list   {r['task_list']} ({', '.join(r['tasks'])})\n"
              f"1. convert the nanotron checkpoint to transformers format (the command `engine export nanotron` "
              f"printed; in the nanotron checkout)\n"
              f"2. evaluate it (in the lighteval environment, lighteval 0.13):\n  {r['command']}\n"
              f"3. compare runs:\n  engine compare {r['results']} OTHER_RESULTS_DIR ... [--baseline NAME]")
        return 0
    from .handoff.nanotron import CoverageError, TrainPlan, export_nanotron
    from .handoff.sources import SourceError
    from .handoff.token_files import TokenFileError
    from .reader import InputError

    plan = TrainPlan(args.seq_len, args.micro_batch_size, args.grad_accum, args.gpus, args.train_steps)
    try:
        ratio = _ratio(args)
        prompts = _prompts_for_preset(args)
        r = export_nanotron(Path(args.output_dir), args.mix_in, args.tokenizer, Path(args.out).resolve(), ratio,
                            args.seed, plan, prompts, args.text_column, say=lambda m: print(m, file=sys.stderr),
                            eos_token=args.eos_token, keep_truncated=args.keep_truncated,
                            allow_repeat=args.allow_repeat, overwrite=args.overwrite)
        error = None
    except CoverageError as exc:
        error, r = exc.args[0], exc.args[1]
    except (SourceError, TokenFileError, InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    tok = (f"{Path(args.out).resolve() / 'tokenizer'} (recorded as 'tokenizer', relative to the export)"
           if r["tokenizer"] == "tokenizer" else r["tokenizer"])
    print(f"token folders (datatrove format; tokenizer {tok}, vocabulary {r['vocab_size']:,}, "
          f"document separator id {r['eos_id']}; prompts {', '.join(r['prompts'])}):")
    for c, f in zip(r["coverage"], r["folders"]):
        mark = "ok" if c.ok else ("REPEATED" if r["repeat"] else "TOO SMALL")
        print(f"  {f.folder}  weight {c.weight:.2f}  {f.documents:,} documents  {f.tokens:,} tokens = "
              f"{c.samples:,} samples of {plan.sequence_length + 1:,} tokens; training draws {c.needed:,}  [{mark}]")
    print(f"plan: {plan.train_steps:,} steps x {plan.global_batch} sequences x {plan.sequence_length:,} tokens = "
          f"{plan.tokens / 1e9:,.2f} B tokens ({plan.gpus} GPUs x micro-batch {plan.micro_batch_size} x "
          f"accumulation {plan.grad_accum})")
    for source, counts in r["skipped"].items():
        for reason, n in counts.items():
            print(f"left out {source}: {n:,} x {reason}")
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"config: {r['config']} (paths relative to its directory)\n"
          f"install (an environment of its own): {r['install']}\n"
          f"train:\n  {r['launch']}\n"
          f"convert the final checkpoint for lighteval:\n  {r['convert']}")
    if r["repeat"] and any(not c.ok for c in r["coverage"]):
        print("WARNING: --allow-repeat: nanotron's older loader repeats the small folders and returns no positions "
              "(document masking off)", file=sys.stderr)
    return 0


def _prompts_for_preset(args) -> list[str] | None:
    """--prompts, else the preset's prompt when the run has it (--preset faq mixes faq rows, not math ones)."""
    from .handoff.sources import generated_prompts

    chosen = _split(args.prompts)
    if chosen or args.preset == "default" or args.ratio is not None:
        return chosen
    found = generated_prompts(Path(args.output_dir))
    if args.preset in found:
        if len(found) > 1:
            print(f"--preset {args.preset}: using the run's {args.preset} rows only (of {', '.join(found)}; "
                  f"--prompts to choose)", file=sys.stderr)
        return [args.preset]
    return None


def cmd_compare(args) -> int:
    from .handoff.compare import CompareError, compare, markdown
    try:
        runs = compare(args.results, args.label, args.allow_different_settings,
                       warn=lambda m: print(m, file=sys.stderr))
        print(markdown(runs, args.baseline))
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_prompts(args) -> int:
    from . import prompts as P

    if args.action == "list":
        for name in P.available():
            p = P.load_prompt(name)
            mark = "*" if p.recommended else " "
            print(f"{mark} {p.name:<14} {p.intent}")
        print("(* recommended default)")
        return 0
    if not args.name:
        print(f"error: 'engine prompts {args.action}' needs a prompt name or file", file=sys.stderr)
        return EXIT_USAGE
    p = P.load_prompt(args.name)
    if args.action == "show":
        print(f"name: {p.name}\norigin: {p.origin}\nintent: {p.intent}\nmax_new_tokens: {p.max_new_tokens}\n"
              f"file: {p.path}\n\n{p.template}\n\nnotes: {p.notes}")
        return 0
    if not args.file:
        print("error: 'engine prompts render NAME FILE' needs a document file", file=sys.stderr)
        return EXIT_USAGE
    from transformers import AutoTokenizer

    from .model_store import resolve_model
    from .renderer import Renderer

    model_dir, _ = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    doc = Path(args.file).read_text(encoding="utf-8")
    r = Renderer(tok, [p], context=args.context, max_new_tokens=None)
    ids, truncated = r.request_ids(p.name, doc, r.encode_documents([doc])[0])
    print(tok.decode(ids))
    rp = r.rendered[p.name]
    print(f"--- {len(ids)} prompt tokens (shared prefix {len(rp.prefix_ids)}, suffix {len(rp.suffix_ids)}); "
          f"document {'truncated' if truncated else 'whole'}; max_new_tokens {rp.max_new_tokens}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="engine", description="Synthetic pretraining data: rewrite documents with LLMs.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate: rewrite every input document with every prompt")
    run.add_argument("config", help="run config (TOML), e.g. runs/demo.toml")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--shard", type=_shard, metavar="I/N", help="run shard I of N (same as shard.index/count)")
    run.add_argument("--overwrite", action="store_true",
                     help="delete earlier results in output.dir instead of resuming (needed after a config change)")
    run.add_argument("--retry-errors", action="store_true",
                     help="remove the stored error rows (finish_reason = error) and generate those documents again")
    run.set_defaults(fn=cmd_run)

    st = sub.add_parser("status", help="progress of a run's output directory, per shard and prompt")
    st.add_argument("output_dir")
    st.add_argument("--check", action="store_true", help="exit 1 unless the run is complete")
    st.set_defaults(fn=cmd_status)

    rp = sub.add_parser("report", help="diversity report of a run's outputs (template collapse, n-grams, lengths)")
    rp.add_argument("output_dir")
    rp.add_argument("--sample", type=int, default=5000, help="outputs per prompt and model for text statistics")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--top-opening-share", type=float, default=0.05,
                    help="warn when more outputs than this share open with the same sentence")
    rp.add_argument("--distinct-prefix20", type=float, default=0.5,
                    help="warn when fewer than this share of 20-character openings are distinct")
    rp.set_defaults(fn=cmd_report)

    la = sub.add_parser("launch", help="run the shards of a config on Slurm (job array) or Ray")
    la.add_argument("scheduler", choices=["slurm", "ray"])
    la.add_argument("config")
    la.add_argument("--shards", type=int, required=True, help="number of shards (tasks)")
    la.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every shard")
    la.add_argument("--gpus-per-shard", type=float, default=None,
                    help="GPUs per task (slurm default 1; ray default 1 when the cluster has GPUs, else 0)")
    la.add_argument("--cpus-per-shard", type=float, default=1, help="CPUs per task")
    la.add_argument("--max-concurrent", type=int, default=0, help="slurm: at most this many tasks at once")
    la.add_argument("--partition", default="")
    la.add_argument("--account", default="")
    la.add_argument("--qos", default="")
    la.add_argument("--time", default="24:00:00", help="slurm time limit per task")
    la.add_argument("--signal-seconds", type=int, default=300,
                    help="slurm: SIGTERM this many seconds before the time limit (flush, requeue)")
    la.add_argument("--job-name", default="engine")
    la.add_argument("--sbatch", action="append", metavar="OPTION", help="extra #SBATCH option, e.g. --mem=64G")
    la.add_argument("--submit", action="store_true", help="slurm: submit with sbatch (else only write the script)")
    la.add_argument("--dry-run", action="store_true", help="slurm: print the script, write nothing")
    la.add_argument("--address", default=None, help="ray: cluster address (default: start a local Ray)")
    la.add_argument("--max-retries", type=int, default=3, help="ray: reruns of an interrupted shard")
    la.set_defaults(fn=cmd_launch)

    sv = sub.add_parser("serve", help="a GPU-free test server with SGLang's /generate and OpenAI /v1/completions")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=30000)
    sv.add_argument("--backend", choices=["instant", "torch"], default="instant")
    sv.add_argument("--model", default="embedded", help="tokenizer (and model, for --backend torch)")
    sv.add_argument("--completion-tokens", type=int, default=64, help="instant backend: tokens per answer")
    sv.add_argument("--delay-ms", type=float, default=0.0, help="simulated latency per request")
    sv.add_argument("--fail-rate", type=float, default=0.0, help="share of requests answered with HTTP 500")
    sv.add_argument("--temperature", type=float, default=0.0)
    sv.add_argument("--served-model-name", default="engine-serve",
                    help="the one model name /v1/completions accepts (others: HTTP 404, as vLLM)")
    sv.set_defaults(fn=cmd_serve)

    def mix_args(p, out_help: str) -> None:
        p.add_argument("output_dir", help="output.dir of an `engine run` (the generated rows)")
        p.add_argument("--mix-in", nargs="+", metavar="PATH", required=True,
                       help="original data: files or globs (.parquet, .jsonl, .jsonl.zst)")
        p.add_argument("--out", required=True, help=out_help)
        p.add_argument("--ratio", type=float, help="synthetic share of tokens, e.g. 0.6 (overrides --preset)")
        p.add_argument("--preset", choices=sorted(PRESET_HELP), default="default",
                       help="; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items())
                       + " (a preset named after a prompt of the run takes that prompt's rows only)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--prompts", help="comma-separated prompts of the run to use (default: the preset's, else all)")
        p.add_argument("--text-column", default="text", help="text column of the mix-in files")
        p.add_argument("--keep-truncated", action="store_true",
                       help="keep generations cut at max_new_tokens (finish_reason=length; left out by default)")
        p.add_argument("--overwrite", action="store_true", help="replace what an earlier mix/export wrote in --out")

    from .handoff import PRESETS
    PRESET_HELP = {k: f"{v * 100:.0f}%% synthetic" for k, v in PRESETS.items()}
    mx = sub.add_parser("mix", help="mix generated rows with original data at a token ratio (zstd Parquet)")
    mix_args(mx, "directory for the mixed Parquet parts and _mix.json (summary)")
    mx.add_argument("--tokenizer", default="embedded", help="tokenizer the tokens are counted with")
    mx.add_argument("--shuffle-window", type=int, default=100_000, help="rows shuffled together (bounded memory)")
    mx.add_argument("--part-rows", type=int, default=500_000, help="rows per Parquet part")
    mx.set_defaults(fn=cmd_mix)

    ex = sub.add_parser("export", help="hand-off: nanotron token folders + config, or the lighteval task suite")
    targets = ex.add_subparsers(dest="target", required=True, metavar="{nanotron,lighteval}")
    nt = targets.add_parser("nanotron", help="token folders + nanotron.yaml (nanotron 1dfee7f5 + datatrove 2c895af7)")
    mix_args(nt, "directory for token folders + nanotron.yaml (self-contained: paths are relative to it)")
    nt.add_argument("--tokenizer", default="embedded",
                    help="training tokenizer: embedded (SmolLM2's vocabulary, as a base tokenizer), a local directory "
                         "or a hub id; a hub id is recorded as is when its EOS is the separator, anything else is "
                         "saved into OUT/tokenizer")
    nt.add_argument("--eos-token", help="document separator (default: <|endoftext|> when the vocabulary has it)")
    nt.add_argument("--seq-len", type=int, default=4096)
    nt.add_argument("--micro-batch-size", type=int, default=4)
    nt.add_argument("--grad-accum", type=int, default=4)
    nt.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs of the training run")
    nt.add_argument("--train-steps", type=int, default=40_000, help="default: ~21 B tokens, the field's ablation")
    nt.add_argument("--allow-repeat", action="store_true",
                    help="a plan larger than the folders: let nanotron repeat them (its older loader; no document "
                         "masking) instead of an error")
    nt.set_defaults(fn=cmd_export)
    le = targets.add_parser("lighteval", help="the early-signal cloze suite for lighteval 0.13 and its command")
    le.add_argument("--out", required=True, help="directory for the tasks file and the task list")
    le.add_argument("--tasks", help="comma-separated tasks of the suite (default: all)")
    le.add_argument("--checkpoint", default="CHECKPOINT_DIR", help="the model (transformers format)")
    le.add_argument("--max-samples", type=int, default=1000, help="documents per task (0: all)")
    le.add_argument("--results", help="lighteval's --output-dir (default: OUT/results); one per run to compare")
    le.set_defaults(fn=cmd_export)

    cp = sub.add_parser("compare", help="lighteval results of several runs in one table (per task, macro average)")
    cp.add_argument("results", nargs="+", help="results_*.json files or lighteval output directories (one per run)")
    cp.add_argument("--label", action="append", help="a column label per results argument, in order "
                                                       "(default: the directory's name)")
    cp.add_argument("--baseline", help="a run's label: adds a delta column per other run against it")
    cp.add_argument("--allow-different-settings", action="store_true",
                    help="compare runs evaluated with different settings or examples (refused by default)")
    cp.set_defaults(fn=cmd_compare)

    pr = sub.add_parser("prompts", help="list, show or render the prompt library")
    pr.add_argument("action", choices=["list", "show", "render"])
    pr.add_argument("name", nargs="?", help="prompt name or path of a prompt file")
    pr.add_argument("file", nargs="?", help="document text file (render)")
    pr.add_argument("--model", default="embedded", help="model whose chat template and tokenizer to use")
    pr.add_argument("--context", type=int, default=8192)
    pr.set_defaults(fn=cmd_prompts)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .signals import Interrupted, raise_on_signals, reap_children

    raise_on_signals()  # from the first line: a SIGTERM or Ctrl-C at any moment ends with a documented status
    try:
        return _main(argv)
    except Interrupted as exc:
        print(f"interrupted ({exc.signame}) before any work was in flight: nothing is lost; run the same "
              f"command again to resume.", file=sys.stderr)
        return 3
    finally:
        reap_children()


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from .prompts import PromptError
    try:
        return args.fn(args)
    except PromptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
