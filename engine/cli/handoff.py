"""`engine mix`, `export nanotron`, `export lighteval` and `compare`: the hand-off to training and evaluation
(engine/handoff/); errors go to the one handler (cli/__init__.py)."""
from __future__ import annotations

import sys
from pathlib import Path

from engine.errors import ConfigError, ExitCode

SHARE_TOLERANCE = 0.05  # `engine mix` warns when the achieved synthetic share is further than this from the asked one


def _ratio(args) -> float:
    """The synthetic share, checked before any token is counted (that can take hours on real data)."""
    from engine.handoff import PRESETS, check_ratio
    return check_ratio(args.ratio if args.ratio is not None else PRESETS[args.preset])


def _sources(args):
    """Where the rows of a mix or export come from: the run's output directory and the mix-in files."""
    from engine.handoff.sources import Sources

    return Sources(output_dir=Path(args.output_dir).resolve(), mix_in=args.mix_in, prompts=_prompts_for_preset(args),
                   text_column=args.text_column, keep_truncated=args.keep_truncated,
                   allow_incomplete=args.allow_incomplete, allow_test_backend=args.allow_test_backend)


def cmd_mix(args) -> int:
    from engine.handoff.mix import MixSpec, run_mix

    if not args.output_dir or not args.mix_in:
        raise ConfigError("engine mix needs OUTPUT_DIR and --mix-in PATH")
    ratio = _ratio(args)
    spec = MixSpec(sources=_sources(args), out=Path(args.out).resolve(), ratio=ratio, tokenizer=args.tokenizer,
                   seed=args.seed, shuffle_window=args.shuffle_window, part_rows=args.part_rows,
                   overwrite=args.overwrite)
    s = run_mix(spec, say=lambda m: print(m, file=sys.stderr))
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
    if abs(s["ratio_achieved"] - s["ratio_requested"]) > SHARE_TOLERANCE:
        print(f"WARNING: the synthetic share is {s['ratio_achieved']:.1%} of tokens, asked {s['ratio_requested']:.0%}: "
              f"whole documents are mixed and these sources are too small (or their documents too long) to come "
              f"closer; mix more rows or choose another --ratio", file=sys.stderr)
    return ExitCode.OK


def _split(value: str | None) -> list[str] | None:
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


def cmd_export(args) -> int:
    if args.target == "lighteval":
        from engine.handoff.lighteval_export import LightevalExport, export_lighteval
        r = export_lighteval(LightevalExport(
            out=Path(args.out).resolve(), checkpoint=args.checkpoint, tasks=_split(args.tasks),
            max_samples=args.max_samples, results=Path(args.results).resolve() if args.results else None,
            overwrite=args.overwrite))
        print(f"tasks file  {r['tasks_file']}\ntask list   {r['task_list']} ({', '.join(r['tasks'])})\n"
              f"1. convert the nanotron checkpoint to transformers format (the command `engine export nanotron` "
              f"printed; in the nanotron checkout)\n"
              f"2. evaluate it (in the lighteval environment, lighteval 0.13):\n  {r['command']}\n"
              f"3. compare runs:\n  engine compare {r['results']} OTHER_RESULTS_DIR ... [--baseline NAME]")
        return ExitCode.OK
    from engine.errors import CoverageError
    from engine.handoff.nanotron import TrainPlan
    from engine.handoff.nanotron_export import NanotronExport, export_nanotron

    plan = TrainPlan(args.seq_len, args.micro_batch_size, args.grad_accum, args.gpus, args.train_steps)
    try:
        ratio = _ratio(args)
        spec = NanotronExport(sources=_sources(args), out=Path(args.out).resolve(), ratio=ratio,
                              tokenizer=args.tokenizer, plan=plan, seed=args.seed, eos_token=args.eos_token,
                              allow_repeat=args.allow_repeat, overwrite=args.overwrite)
        r = export_nanotron(spec, say=lambda m: print(m, file=sys.stderr))
        error = None
    except CoverageError as exc:  # the plan is printed with what is too small, then the error
        error, r = exc, exc.args[1]
    tok = (f"{Path(args.out).resolve() / 'tokenizer'} (recorded as 'tokenizer', relative to the export)"
           if r.tokenizer == "tokenizer" else r.tokenizer)
    print(f"token folders (datatrove format; tokenizer {tok}, vocabulary {r.vocab_size:,}, "
          f"document separator id {r.eos_id}; prompts {', '.join(r.prompts)}):")
    for c, f in zip(r.coverage, r.folders):
        mark = "ok" if c.ok else ("REPEATED" if r.repeat else "TOO SMALL")
        print(f"  {f.folder}  weight {c.weight:.2f}  {f.documents:,} documents  {f.tokens:,} tokens = "
              f"{c.samples:,} samples of {plan.sequence_length + 1:,} tokens; training draws {c.needed:,}  [{mark}]")
    print(f"plan: {plan.train_steps:,} steps x {plan.global_batch} sequences x {plan.sequence_length:,} tokens = "
          f"{plan.tokens / 1e9:,.2f} B tokens ({plan.gpus} GPUs x micro-batch {plan.micro_batch_size} x "
          f"accumulation {plan.grad_accum})")
    for source, counts in r.skipped.items():
        for reason, n in counts.items():
            print(f"left out {source}: {n:,} x {reason}")
    if error is not None:
        raise error
    print(f"config: {r.config} (paths relative to its directory)\n"
          f"install (an environment of its own): {r.install}\n"
          f"train:\n  {r.launch}\n"
          f"convert the final checkpoint for lighteval:\n  {r.convert}")
    if r.repeat and any(not c.ok for c in r.coverage):
        print("WARNING: --allow-repeat: nanotron's older loader repeats the small folders and returns no positions "
              "(document masking off)", file=sys.stderr)
    return ExitCode.OK


def _prompts_for_preset(args) -> list[str] | None:
    """--prompts, else the preset's prompt when the run has it (--preset faq mixes faq rows, not math ones)."""
    from engine.handoff.generated import generated_prompts

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
    from engine.handoff.compare import compare, markdown

    runs = compare(args.results, args.label, args.allow_different_settings, warn=lambda m: print(m, file=sys.stderr))
    print(markdown(runs, args.baseline))
    return ExitCode.OK
