"""`engine run`, `status`, `report`, `launch`, `serve` and `prompts`: each parses nothing (the parser did),
calls the engine, prints, and returns an exit status; errors go to the one handler (cli/__init__.py)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from engine.errors import ConfigError, ExitCode


def cmd_run(args) -> int:
    logging.getLogger("engine.cli").info("engine run %s: reading the config", args.config)
    from engine.config.run_config import load_config
    from engine.run import Run

    overrides = list(args.set or [])
    if args.shard:
        overrides += [f"shard.index={args.shard[0]}", f"shard.count={args.shard[1]}"]
    cfg = load_config(args.config, overrides)
    code, summary = Run(cfg, overwrite=args.overwrite, retry_errors=args.retry_errors,
                        extend_input=args.extend_input).execute()
    print_summary(summary)
    if code == ExitCode.INTERRUPTED:
        print("interrupted: everything finished so far is saved; run the same command again to resume.",
              file=sys.stderr)
    return code


def print_summary(s: dict) -> None:
    stored = ", ".join(f"{k} {v:,}" for k, v in s["documents_stored"].items())
    rows = s["input_rows"]
    lines = [
        f"{'complete' if s['complete'] else 'incomplete'}: {s['output_dir']}  (shard {s['shard']}, model {s['model']}, "
        f"backend {s['backend']})",
        f"  documents  input rows {rows if rows is not None else '?'}; stored per prompt: {stored}; "
        f"rejected rows {s['rejected_rows']:,}; failed {s['failed']:,}"
        f"{f' ({n:,} in this process)' if (n := s.get('failed_this_process', s['failed'])) != s['failed'] else ''}; "
        f"input truncated {s['truncated']:,}",
        f"  finished   {', '.join(f'{k} {v:,}' for k, v in sorted(s.get('finish_reasons', {}).items())) or '-'} "
        f"(length: cut at max_new_tokens; repetition: stopped in a loop)",
        f"  time       {s['wall_seconds']:.1f} s: start-up {s.get('startup_s', 0):.1f} s, generation "
        f"{s.get('generation_s', 0):.1f} s, finishing {s.get('finishing_s', 0):.1f} s",
        f"  generated  {s['requests_generated']:,} requests ({s['requests_per_s']:.2f} req/s over generation); "
        f"skipped (done before or rejected) {s['requests_skipped']:,}",
        f"  tokens     input {s['input_tokens']:,}  output {s['output_tokens']:,} "
        f"({s['output_tokens_per_s']:,.1f} tok/s)  "
        f"useful {s.get('useful_output_tokens', 0):,} ({s.get('useful_output_tokens_per_s', 0):,.1f} tok/s, "
        f"{s.get('useful_share', 0):.0%})  prefix-cache hit {s['prefix_cache_hit_rate']:.1%}",
    ]
    for prompt, q in s.get("per_prompt", {}).items():
        lines.append(f"  {prompt:<10} output {q['output_tokens']:,} ({q['output_tokens_per_s']:,.1f} tok/s)  useful "
                     f"{q['useful_output_tokens']:,} ({q['useful_output_tokens_per_s']:,.1f} tok/s)  "
                     + ", ".join(f"{k} {v:,}" for k, v in sorted(q["finish_reasons"].items())))
    if t := s.get("shard_totals"):  # the figures above are this process's; the shard's over every attempt:
        lines.append(f"  shard      every attempt ({t['attempts']:,}): rows {t['rows']:,}, output tokens "
                     f"{t['output_tokens']:,} (from the stored rows), {t.get('wall_s', 0):,.1f} s wall, "
                     f"{t.get('generation_s', 0):,.1f} s generating")
    for w in s.get("input_warnings", []):
        lines.append(f"  warning    {w}")
    if s.get("report"):
        lines.append(f"  report     {s['report']}")
    for w in s.get("report_warnings", []):
        lines.append(f"  WARNING    {w}")
    print("\n".join(lines))


def cmd_status(args) -> int:
    from engine.output.status import render_status
    from engine.stores import is_remote

    text, complete = render_status(args.output_dir if is_remote(args.output_dir) else Path(args.output_dir))
    print(text)
    return ExitCode.ERROR if args.check and not complete else ExitCode.OK


def cmd_report(args) -> int:
    from engine.output.report import Thresholds, write_report

    out = Path(args.output_dir)
    if not out.is_dir():
        raise ConfigError(f"{out} is not a directory")
    report = write_report(out, args.sample, args.seed, Thresholds(args.top_opening_share, args.distinct_prefix20))
    if not report["groups"]:
        from engine.errors import EngineError
        raise EngineError(f"{out} holds no result parts (<prompt>/*.parquet)")
    print((out / "report" / "report.md").read_text())
    return ExitCode.OK


def cmd_launch(args) -> int:
    from engine.ops.launch import SlurmOptions, launch_ray, launch_slurm

    if args.scheduler == "slurm":
        gpus = args.gpus_per_shard if args.gpus_per_shard is not None else 1
        if gpus < 0 or not float(gpus).is_integer():  # Slurm's --gres counts whole GPUs; Ray takes fractions
            raise ConfigError(f"--gpus-per-shard {gpus:g}: Slurm takes a whole number of GPUs per task "
                              "(0 for a partition without GPUs: no --gres line)")
        if args.cpus_per_shard < 1 or not float(args.cpus_per_shard).is_integer():
            raise ConfigError(f"--cpus-per-shard {args.cpus_per_shard:g}: Slurm takes a whole number of CPUs per task")
        opts = SlurmOptions(gpus_per_shard=int(gpus),
                            cpus_per_shard=int(args.cpus_per_shard), max_concurrent=args.max_concurrent,
                            partition=args.partition, account=args.account, qos=args.qos, time=args.time,
                            signal_seconds=args.signal_seconds, job_name=args.job_name,
                            extra=tuple(args.sbatch or ()))
        return launch_slurm(Path(args.config), args.shards, opts, list(args.set or []), args.submit, args.dry_run)
    return launch_ray(Path(args.config), args.shards, args.address, args.gpus_per_shard, args.cpus_per_shard,
                      args.max_retries, list(args.set or []))


def cmd_serve(args) -> int:
    from engine.ops.serve import serve
    serve(args.host, args.port, args.backend, args.model, args.completion_tokens, args.delay_ms, args.fail_rate,
          args.temperature, served_name=args.served_model_name)
    return ExitCode.OK


def cmd_prompts(args) -> int:
    from engine.render import prompts as P

    if args.action == "list":
        found = [P.load_prompt(name) for name in P.available()]
        width = max((len(p.name) for p in found), default=0)
        for p in found:
            mark = "*" if p.recommended else " "
            print(f"{mark} {p.name:<{width}}  {p.intent}")
        print("(* recommended default)")
        return ExitCode.OK
    if not args.name:
        raise ConfigError(f"'engine prompts {args.action}' needs a prompt name or file")
    p = P.load_prompt(args.name)
    if args.action == "show":
        print(f"name: {p.name}\norigin: {p.origin}\nintent: {p.intent}\nmax_new_tokens: {p.max_new_tokens}\n"
              f"file: {p.path}\n\n{p.template}\n\nnotes: {p.notes}")
        return ExitCode.OK
    if not args.file:
        raise ConfigError("'engine prompts render NAME FILE' needs a document file")
    doc_path = Path(args.file)
    if not doc_path.is_file():
        raise ConfigError(f"engine prompts render: document file {doc_path} not found")
    from transformers import AutoTokenizer

    from engine.model.store import resolve_model
    from engine.render.renderer import Renderer

    model_dir, _ = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    doc = doc_path.read_text(encoding="utf-8")
    r = Renderer(tok, [p], context=args.context, max_new_tokens=None)
    ids, truncated = r.request_ids(p.name, doc, r.encode_documents([doc])[0])
    print(tok.decode(ids))
    rp = r.rendered[p.name]
    print(f"--- {len(ids)} prompt tokens (shared prefix {len(rp.prefix_ids)}, suffix {len(rp.suffix_ids)}); "
          f"document {'truncated' if truncated else 'whole'}; max_new_tokens {rp.max_new_tokens}", file=sys.stderr)
    return ExitCode.OK
