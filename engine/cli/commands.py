"""`engine run` (and its --dry-run), `status`, `inspect`, `report`, `launch`, `bench` and `prompts`: each parses
nothing (the parser did), calls the engine, prints, and returns an exit status; errors go to the one handler
(cli/__init__.py)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config.run_config import DOCUMENT_FIRST
from engine.errors import ConfigError, ExitCode

if TYPE_CHECKING:
    from engine.output.record import RunSummary


def cmd_run(args) -> int:
    logging.getLogger("engine.cli").info("engine run %s: reading the config", args.config)
    from engine.config.run_config import load_config
    from engine.run import Run

    overrides = list(args.set or [])
    if args.shard:  # a static shard: no units, whatever the config says
        overrides += [f"shard.index={args.shard[0]}", f"shard.count={args.shard[1]}", "input.unit_rows=0"]
    cfg = load_config(args.config, overrides)
    if cfg.input.unit_rows > 0 and cfg.shard.count > 1:
        raise ConfigError("input.unit_rows > 0 (workers claiming units) and shard.count > 1 (static shards): choose "
                          "one (--shard sets input.unit_rows = 0)")
    if args.dry_run:
        from engine.plan import make_plan, render_plan

        plan = make_plan(cfg, args.bench or [], args.throughput, args.overwrite, args.extend_input)
        print_out(render_plan(plan))
        return ExitCode.OK
    if cfg.input.unit_rows > 0:  # a worker: claims units until none is left (engine/worker.py)
        from engine.worker import Worker

        for flag, name in ((args.retry_errors, "--retry-errors"), (args.extend_input, "--extend-input")):
            if flag:
                raise ConfigError(f"{name} is not available to workers (input.unit_rows > 0) yet; run it with "
                                  f"--shard 0/1 on an output made that way")
        code, summary = Worker(cfg, overwrite=args.overwrite).execute()
        print_summary(summary)
        if code == ExitCode.INTERRUPTED:
            print("interrupted: every committed unit is saved, and the unit in hand resumes from its journal; run "
                  "the same command again (or start another worker) to go on.", file=sys.stderr)
        return code
    # settle_signals: once the state and summary are written a signal changes nothing (signals.settle)
    code, summary = Run(cfg, overwrite=args.overwrite, retry_errors=args.retry_errors,
                        extend_input=args.extend_input, settle_signals=True).execute()
    print_summary(summary)  # a closed stdout (`| head`, a `tee` that died first) does not change `code`
    if code == ExitCode.INTERRUPTED:
        print("interrupted: everything finished so far is saved; run the same command again to resume.",
              file=sys.stderr)
    return code


def print_summary(s: RunSummary) -> None:
    from engine.gate import EXPLAINED

    q = s.process  # this process's figures; s.shard_totals: the shard's over every attempt
    stored = ", ".join(f"{k} {v:,}" for k, v in s.documents_stored.items())
    rows = s.input_rows
    where = f"shard {s.shard}" if s.units is None else \
        f"{s.shard}: committed {s.units['by_this_worker']:,} unit(s); {s.units['committed']:,} of " \
        f"{s.units['count']:,} units committed in all"
    lines = [
        f"{'complete' if s.complete else 'incomplete'}: {s.output_dir}  ({where}, model {s.model}, "
        f"backend {s.backend})",
        f"  documents  input rows {rows if rows is not None else '?'}; stored per prompt: {stored}; "
        f"rejected rows {q.rejected_rows:,}; failed {s.failed:,}"
        f"{f' ({q.failed_this_process:,} in this process)' if q.failed_this_process != s.failed else ''}; "
        f"input truncated {q.truncated:,}",
        f"  finished   {', '.join(f'{k} {v:,}' for k, v in sorted(q.finish_reasons.items())) or '-'} "
        f"(length: cut at max_new_tokens; repetition: stopped in a loop)",
        f"  time       {q.wall_seconds:.1f} s: start-up {q.startup_s:.1f} s, generation "
        f"{q.generation_s:.1f} s, finishing {q.finishing_s:.1f} s"
        + (f" (process start-up, from the process's own start: {q.process_startup_s:.1f} s)"
           if q.process_startup_s is not None else ""),
        f"  generated  {q.requests_generated:,} requests ({q.requests_per_s:.2f} req/s over generation); "
        f"skipped (done before or rejected) {q.requests_skipped:,}",
        f"  tokens     input {q.input_tokens:,} (cached {q.cached_tokens:,}, computed {q.computed_prompt_tokens:,})"
        f"  output {q.output_tokens:,} "
        f"({q.output_tokens_per_s:,.1f} tok/s)  "
        f"useful {q.useful_output_tokens:,} ({q.useful_output_tokens_per_s:,.1f} tok/s, "
        f"{q.useful_share:.0%})  prefix-cache hit {q.prefix_cache_hit_rate:.1%}",
        f"  {EXPLAINED}",
        *(f"  why        {n}" for n in s.useful_notes),
    ]
    for prompt, r in q.per_prompt.items():
        lines.append(f"  {prompt:<10} output {r.output_tokens:,} ({r.output_tokens_per_s:,.1f} tok/s)  useful "
                     f"{r.useful_output_tokens:,} ({r.useful_output_tokens_per_s:,.1f} tok/s)  "
                     + ", ".join(f"{k} {v:,}" for k, v in sorted(r.finish_reasons.items()))
                     + f"  prompt tokens {r.prompt_tokens:,} (cached {r.cached_prompt_tokens:,}, computed "
                       f"{r.computed_prompt_tokens:,})")
    t = s.shard_totals
    lines.append(f"  {'shard' if s.units is None else 'run':<10} every {'' if s.units is None else 'unit and '}"
                 f"attempt ({t.attempts:,}): rows {t.rows:,}, output tokens "
                 f"{t.output_tokens:,} (from the stored rows), {t.wall_s:,.1f} s wall, "
                 f"{t.generation_s:,.1f} s generating")
    for w in s.input_warnings:
        lines.append(f"  warning    {w}")
    if s.report:
        lines.append(f"  report     {s.report}")
    for w in s.report_warnings:
        lines.append(f"  WARNING    {w}")
    print_out("\n".join(lines))


def print_out(text: str) -> None:
    """Print to stdout, flushed. A closed stdout (its reader, `head` or a `tee`, ended first) is not the
    command's failure: the text is dropped and stdout points at /dev/null from here, so that neither this
    nor Python's flush at exit raises BrokenPipeError (the recipe of Python's `signal` docs). The exit status
    stays the command's own."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def cmd_status(args) -> int:
    from engine.output.status import render_status
    from engine.stores import is_remote

    text, complete = render_status(args.output_dir if is_remote(args.output_dir) else Path(args.output_dir),
                                   deep=args.deep)
    print_out(text)  # `engine status --check | head`: the status is still the check's
    return ExitCode.ERROR if args.check and not complete else ExitCode.OK


def cmd_inspect(args) -> int:
    import shutil

    from engine.output.inspect import InspectOptions, inspect_output

    if args.n < 1 or args.lines < 2:
        raise ConfigError("-n must be 1 or more and --lines 2 or more")
    width = args.width or shutil.get_terminal_size((100, 24)).columns
    opts = InspectOptions(args.prompt, args.finish_reason, tuple(args.id or ()), args.n, width, args.lines, args.seed)
    print_out(inspect_output(Path(args.output_dir), opts))
    return ExitCode.OK


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
    from engine.ops.launch import SlurmOptions, default_cpus, launch_ray, launch_slurm

    if args.scheduler == "slurm":
        gpus = args.gpus_per_shard if args.gpus_per_shard is not None else 1
        if gpus < 0 or not float(gpus).is_integer():  # Slurm's --gres counts whole GPUs; Ray takes fractions
            raise ConfigError(f"--gpus-per-shard {gpus:g}: Slurm takes a whole number of GPUs per task "
                              "(0 for a partition without GPUs: no --gres line)")
        cpus = args.cpus_per_shard if args.cpus_per_shard is not None else default_cpus(gpus)
        if cpus < 1 or not float(cpus).is_integer():
            raise ConfigError(f"--cpus-per-shard {cpus:g}: Slurm takes a whole number of CPUs per task")
        opts = SlurmOptions(gpus_per_shard=int(gpus),
                            cpus_per_shard=int(cpus), max_concurrent=args.max_concurrent,
                            partition=args.partition, account=args.account, qos=args.qos, time=args.time,
                            signal_seconds=args.signal_seconds, job_name=args.job_name,
                            extra=tuple(args.sbatch or ()))
        return launch_slurm(Path(args.config), args.workers or args.shards, opts, list(args.set or []), args.submit,
                            args.dry_run, workers=args.workers is not None)
    return launch_ray(Path(args.config), args.workers or args.shards, args.address, args.gpus_per_shard,
                      args.cpus_per_shard, args.max_retries, list(args.set or []), dry_run=args.dry_run,
                      workers=args.workers is not None)


def cmd_bench(args) -> int:
    from engine.bench.driver import Driver
    from engine.bench.report import write_report
    from engine.bench.sweep import load_sweep
    from engine.signals import Interrupted

    sweep = load_sweep(args.sweep, args.set or [])
    models = sweep.select(args.models)
    driver = Driver(sweep, args.retry_failed)
    if args.dry_run:
        n = driver.check(models)
        for m in models:
            print(f"{m.label} ({m.name}): baseline + " + ", ".join(
                f"{t.name} {len(sweep.expand(m, t, dict(m.set)))}" + (f" after {t.after}" if t.after else "")
                for t in sweep.tiers))
        print(f"{n} configs, each in its own process (timeout {sweep.timeout_s:.0f} s); results in {sweep.results}")
        return ExitCode.OK
    try:
        records = driver.run(models, execute=not args.report_only)
    except Interrupted as exc:
        if exc.abort:  # Ctrl-C again: the one handler (cli/__init__.py) says so
            raise
        print(f"interrupted ({exc.signame}): finished configs are saved; run the same command again to resume.",
              file=sys.stderr)
        return ExitCode.INTERRUPTED
    files = write_report(sweep, records, args.gpu_hour_usd)
    print(files["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in files.values()))
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
    p = P.load_prompts([args.name], args.layout)[0]
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

    from engine.model.locate import resolve_model
    from engine.render.renderer import Renderer

    model_dir, _ = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    doc = doc_path.read_text(encoding="utf-8")
    r = Renderer(tok, [p], context=args.context, max_new_tokens=None)
    ids, truncated = r.request_ids(p.name, doc, r.encode_documents([doc])[0])
    print(tok.decode(ids))
    rp = r.rendered[p.name]
    shared = "chat header + document" if p.layout == DOCUMENT_FIRST else "chat header + instruction"
    print(f"--- {len(ids)} prompt tokens (shared prefix: {shared}, {r.prefix_len(p.name, ids)}; "
          f"suffix {len(rp.suffix_ids)}); "
          f"document {'truncated' if truncated else 'whole'}; max_new_tokens {rp.max_new_tokens}", file=sys.stderr)
    return ExitCode.OK
