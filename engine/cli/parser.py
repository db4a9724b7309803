"""The `engine` argument parser: every subcommand, its options and their defaults (shown by --help)."""
from __future__ import annotations

import argparse
import copy

from engine.cli.commands import cmd_bench, cmd_inspect, cmd_launch, cmd_prompts, cmd_report, cmd_run, cmd_status
from engine.cli.handoff import cmd_compare, cmd_export, cmd_mix
from engine.config.run_config import DOCUMENT_LAST, LAYOUTS
from engine.errors import RESUMABLE, ExitCode

_RESUMABLE = [str(int(c)) for c in RESUMABLE]
EXIT_STATUSES = "exit statuses: " + ", ".join(f"{int(c)} {c.name.lower().replace('_', ' ')}" for c in ExitCode) + \
    f" ({', '.join(_RESUMABLE[:-1])} and {_RESUMABLE[-1]} are resumable: run the same command again)"


class Formatter(argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (where it has one worth showing: not None, False or empty)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default = action.default
        return bool(action.option_strings) and not (default is None or default is False
                                                    or default in ("", argparse.SUPPRESS))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not self._shows_default(action):
            return text
        return f"{text} (default: %(default)s)"

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):  # argparse prints no help line for an option without help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """Subcommand parsers that show defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)


def _shard(value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects i/N (e.g. 3/16), got {value!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {value}: need 0 <= i < N")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="engine", description="Synthetic pretraining data: rewrite documents with LLMs.",
                                 epilog=EXIT_STATUSES, formatter_class=Formatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks of errors)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="generate: rewrite every input document with every prompt", epilog=EXIT_STATUSES)
    run.add_argument("config", help="run config (TOML), e.g. runs/demo.toml")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--shard", type=_shard, metavar="I/N", help="run shard I of N (same as shard.index/count)")
    run.add_argument("--overwrite", action="store_true",
                     help="delete earlier results in output.dir instead of resuming (needed after a config change)")
    run.add_argument("--retry-errors", action="store_true",
                     help="remove the stored error rows (finish_reason = error) and generate those documents again")
    run.add_argument("--extend-input", action="store_true",
                     help="accept input files that joined since output.dir was made (one shard only); changed or "
                          "removed files are still refused")
    run.add_argument("--dry-run", action="store_true",
                     help="check everything a run checks before start-up, count rows and requests, show one rendered "
                          "prompt per prompt, estimate tokens, time and GPU-hours; write nothing")
    run.add_argument("--bench", action="append", metavar="RESULTS",
                     help="--dry-run: throughput figures from an `engine bench` results directory or results.jsonl "
                          "(repeatable; runs/out/bench/*/ is read too)")
    run.add_argument("--throughput", type=float, metavar="TOK_S",
                     help="--dry-run: your own output tokens/s per GPU for the estimate")
    run.set_defaults(fn=cmd_run)

    st = sub.add_parser("status", help="progress of a run's output directory, per shard and prompt")
    st.add_argument("output_dir")
    st.add_argument("--check", action="store_true", help="exit 1 unless the run is complete (every committed part "
                    "present, of its recorded size and row count, the state files readable)")
    st.add_argument("--deep", action="store_true", help="also verify every part's checksum (reads all the output)")
    st.set_defaults(fn=cmd_status)

    ins = sub.add_parser("inspect", help="read sample rows of an output: source beside generation, per prompt and "
                                         "finish reason")
    ins.add_argument("output_dir")
    ins.add_argument("--prompt", help="this prompt's rows only")
    ins.add_argument("--finish-reason", choices=["stop", "length", "repetition", "error"],
                     help="rows that ended so only")
    ins.add_argument("--id", action="append", metavar="ID", help="this document's rows (repeatable)")
    ins.add_argument("-n", type=int, default=3, help="rows per prompt and finish reason (a seeded sample)")
    ins.add_argument("--lines", type=int, default=16, help="lines shown of each source and generation")
    ins.add_argument("--width", type=int, help="columns (default: the terminal's)")
    ins.add_argument("--seed", type=int, default=0, help="which rows the sample takes")
    ins.set_defaults(fn=cmd_inspect)

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
    count = la.add_mutually_exclusive_group(required=True)
    count.add_argument("--shards", type=int, help="number of static shards (tasks), each 1/N of the input for good")
    count.add_argument("--workers", type=int, help="number of workers (tasks) claiming units of input.unit_rows rows "
                       "until none is left (README, \"Elastic scale-out\")")
    la.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every shard")
    la.add_argument("--gpus-per-shard", type=float, default=None,
                    help="GPUs per task (slurm: a whole number, default 1, 0 for a partition without GPUs; "
                         "ray: fractions allowed, default 1 when the cluster has GPUs, else 0)")
    la.add_argument("--cpus-per-shard", type=float, default=None,
                    help="CPUs per task (default: 2 x (2 + GPUs) + 2, vLLM's cores per GPU worker plus the run's "
                         "tokeniser and writer threads: 8 for one GPU; 4 without GPUs; ray: at most a node's CPUs)")
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
    la.add_argument("--dry-run", action="store_true",
                    help="run every check of a launch, print what would be submitted (slurm: the script; ray: each "
                         "shard's command), write, start and submit nothing")
    la.add_argument("--address", default=None, help="ray: cluster address (default: start a local Ray)")
    la.add_argument("--max-retries", type=int, default=3, help="ray: reruns of an interrupted shard")
    la.set_defaults(fn=cmd_launch)

    be = sub.add_parser("bench", help="benchmark sweep: models x optimisation tiers, one process per config, "
                                       "then a report (Markdown, CSV, Pareto plot)", epilog=EXIT_STATUSES,
                        description="Run a sweep file's configs (models x optimisation tiers over one fixed "
                                    "sample of documents), each `engine run` in its own process, then write the "
                                    "report. Resumable: finished configs are kept in the results directory, and "
                                    "the same command run again skips them (README: \"Benchmarks: model x "
                                    "optimisation-tier sweeps\").")
    be.add_argument("sweep", help="sweep file (TOML), e.g. runs/bench/cpu.toml")
    be.add_argument("--models", help="comma-separated model labels to run (default: all)")
    be.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a sweep key, e.g. 'data.paths=[\"/data/fw/*.parquet\"]' or "
                         "run.sampling.max_new_tokens=512")
    be.add_argument("--retry-failed", action="store_true", help="rerun configs recorded as oom/timeout/failure")
    be.add_argument("--report-only", action="store_true", help="write the report from the results so far")
    be.add_argument("--dry-run", action="store_true", help="check every config and list them; run nothing")
    be.add_argument("--gpu-hour-usd", type=float, help="price for the cost columns (default: the sweep's)")
    be.set_defaults(fn=cmd_bench)

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
                       help="keep cut-off generations: cut at max_new_tokens (finish_reason=length) or stopped in a "
                            "repetition loop (finish_reason=repetition, the text before the loop); left out by default")
        p.add_argument("--overwrite", action="store_true", help="replace what an earlier mix/export wrote in --out")
        p.add_argument("--allow-incomplete", action="store_true",
                       help="use the rows of a run that is not complete (refused by default; says what is missing)")
        p.add_argument("--allow-test-backend", action="store_true",
                       help="use the rows of a run made by the model-free `instant` backend (test filler, not "
                            "language: refused by default)")

    from engine.handoff import PRESETS
    PRESET_HELP = {k: f"{v * 100:.0f}%% synthetic" for k, v in PRESETS.items()}
    mx = sub.add_parser("mix", help="mix generated rows with original data at a token ratio (zstd Parquet)")
    mix_args(mx, "directory for the mixed Parquet parts and _mix.json (summary)")
    mx.add_argument("--tokenizer", default="embedded", help="tokenizer the tokens are counted with")
    mx.add_argument("--shuffle-window", type=int, default=100_000, help="rows shuffled together (bounded memory)")
    mx.add_argument("--part-rows", type=int, default=500_000, help="rows per Parquet part")
    mx.set_defaults(fn=cmd_mix)

    ex = sub.add_parser("export", help="hand-off: nanotron token folders + config, or the lighteval task suite")
    targets = ex.add_subparsers(dest="target", required=True, metavar="{nanotron,lighteval}", parser_class=_Parser)
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
    le.add_argument("--overwrite", action="store_true", help="replace what an earlier export wrote in --out")
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
    pr.add_argument("--layout", choices=LAYOUTS, default=DOCUMENT_LAST,
                    help="render.layout: show / render the prompt's form for that layout")
    pr.set_defaults(fn=cmd_prompts)
    return ap
