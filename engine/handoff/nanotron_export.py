"""`engine export nanotron`: token folders (one per source) + a nanotron training config, in one directory.

The path of `engine export nanotron ...`, top to bottom:

    engine/cli/handoff.py   cmd_export: the arguments -> a NanotronExport spec (Sources + TrainPlan + ...)
    export_nanotron(spec)   refuses a non-empty OUT (unless overwrite), then `_steps`, in order, into a
                            hidden folder beside OUT that becomes OUT at the end (staging.py):
      0. sources.py           an engine output, of a complete run (unless allow_incomplete: said loudly)
      1. tokenizer.py         the training tokenizer and its document separator (engine/model finds it)
      2. sources.py           the rows: the run's, through the quality gate (generated.py, engine/gate.py),
                              and the mix-in rows (mix_in.py, engine/input's reader); left-out rows counted
      3. token_files.py       each source's rows -> OUT/generated, OUT/mix-in (datatrove .ds files)
      4. nanotron.py          the mix: the ratio as nanotron's sampling weights; the coverage of the plan
                              (a folder too small for it is a CoverageError unless allow_repeat)
      5. nanotron.py          OUT/nanotron.yaml, OUT/tokenizer (a copy, when one is needed), OUT/_export.json
    the CLI prints the ExportResult.

A refused, failed or killed export (coverage, a bad source, Ctrl-C, the OOM killer) leaves nothing in OUT:
no token folder, nanotron.yaml or _export.json that looks usable.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import CoverageError, SourceError
from engine.handoff import check_ratio
from engine.handoff.nanotron import (
    CHECKPOINTS,
    DATATROVE_COMMIT,
    INSTALL,
    NANOTRON_COMMIT,
    Coverage,
    TrainPlan,
    convert_command,
    coverage,
    launch_command,
    training_config,
    write_config,
)
from engine.handoff.rows import GENERATED, MIX_IN, Skipped
from engine.handoff.sources import Sources, read_sources
from engine.handoff.staging import clear, staged
from engine.handoff.token_files import TokenFolder, write_token_folder
from engine.handoff.tokenizer import TrainingTokenizer, save_training_tokenizer, training_tokenizer

OURS = (GENERATED, MIX_IN, "tokenizer", "nanotron.yaml", "_export.json")  # all an export writes in OUT
LAST = ("nanotron.yaml", "_export.json")  # moved into an OUT that holds other files last: they make it usable


def _ours(name: str) -> bool:
    return name in OURS


@dataclass(frozen=True)
class NanotronExport:
    """What `engine export nanotron` is asked for."""
    sources: Sources
    out: Path  # the export directory (self-contained: nanotron.yaml's paths are relative to it)
    ratio: float  # synthetic share of tokens, 0 < ratio < 1: nanotron's sampling weights
    tokenizer: str = "embedded"  # the training tokenizer: `embedded`, a local directory or a hub id
    plan: TrainPlan = field(default_factory=TrainPlan)
    seed: int = 0
    eos_token: str | None = None  # the document separator; None: <|endoftext|> when the vocabulary has it
    allow_repeat: bool = False  # nanotron's older loader repeats folders smaller than the plan
    overwrite: bool = False  # replace what an earlier export wrote in `out`

    def __post_init__(self) -> None:
        check_ratio(self.ratio)


@dataclass
class ExportResult:
    """What an export wrote (or, carried by a CoverageError, would have written), for the CLI to print."""
    prompts: list[str]
    tokenizer: str  # as recorded in the token files and nanotron.yaml ("tokenizer": the copy in the export)
    tokenizer_note: str
    eos_id: int
    vocab_size: int
    folders: list[TokenFolder]
    weights: list[float]
    coverage: list[Coverage]
    skipped: dict[str, dict[str, int]]  # per source, rows left out by reason
    repeat: bool
    config: Path
    launch: str
    convert: str
    install: str = INSTALL
    run: dict = field(default_factory=dict)  # the run's completeness (readiness.RunProgress.to_dict)


def export_nanotron(spec: NanotronExport, say: Callable[[str], object] = print) -> ExportResult:
    """Write the export `spec` asks for (see the module docstring); a refused or failed one leaves nothing."""
    out = spec.out
    if out.exists() and not out.is_dir():
        raise SourceError(f"{out} is a file, not a directory; choose another --out")
    if out.exists() and any(p.name != CHECKPOINTS for p in out.iterdir()) and not spec.overwrite:
        raise SourceError(f"{out} is not empty; choose another --out or pass --overwrite")
    clear(out, _ours)  # --overwrite: only what an export writes, now (a refused or failed one leaves neither)
    # 0. an engine output (else a one-line error), of a complete run (unless allow_incomplete)
    prompts = spec.sources.checked_prompts()
    run = spec.sources.progress(say).to_dict()
    # written into a hidden folder that becomes OUT when whole: a refusal (CoverageError), a bad source, Ctrl-C
    # or a kill leaves nothing in OUT
    with staged(out, _ours, last=LAST) as work:
        return _steps(spec, work, prompts, run, say)


def _steps(spec: NanotronExport, work: Path, prompts: list[str], run: dict,
           say: Callable[[str], object]) -> ExportResult:
    from tqdm import tqdm

    src, out, plan = spec.sources, spec.out, spec.plan
    # 1. the training tokenizer
    tt = training_tokenizer(spec.tokenizer, spec.eos_token)
    say(f"training tokenizer {spec.tokenizer}"
        + (f" (saved to {out / 'tokenizer'}, recorded as 'tokenizer')" if tt.copy else "") + f": {tt.note}")
    # 2. the rows of both sources, left-out rows counted by reason
    skipped = {GENERATED: Skipped(), MIX_IN: Skipped()}
    rows = read_sources(src, prompts, skipped)
    # 3. token files: one folder per source
    folders = []
    for i, (name, stream) in enumerate(rows.items()):
        with tqdm(desc=f"tokenising {name}", unit="doc", disable=None) as bar:
            folder = write_token_folder((r.text for r in stream), tt.tokenizer, tt.recorded, work / name,
                                        spec.seed + i, name=f"000_{name}", progress=bar.update)
        folders.append(dataclasses.replace(folder, folder=out / name))  # where it will be (staging.py)
        say(f"{name:>9}: {folder.documents:,} documents, {folder.tokens:,} tokens -> {out / name}")
    # 4. the mix: the ratio as sampling weights, and whether the folders cover the plan
    weights = [spec.ratio, round(1 - spec.ratio, 6)]
    result = ExportResult(
        prompts=prompts, tokenizer=tt.recorded, tokenizer_note=tt.note, eos_id=tt.eos_id, vocab_size=len(tt.tokenizer),
        folders=folders, weights=weights, coverage=coverage(folders, weights, plan),
        skipped={k: v.counts for k, v in skipped.items()}, repeat=spec.allow_repeat, config=out / "nanotron.yaml",
        launch=launch_command(out, plan), convert=convert_command(out, plan, tt.recorded), run=run)
    _check_coverage(result, plan)  # a refusal writes no config (the work folder is removed)
    # 5. the tokenizer copy, nanotron.yaml and the record
    _write(spec, tt, result, work)
    return result


def _write(spec: NanotronExport, tt: TrainingTokenizer, result: ExportResult, work: Path) -> None:
    if tt.copy:
        save_training_tokenizer(tt, work / "tokenizer")
    write_config(work / result.config.name, training_config(result.folders, result.weights, spec.plan, tt,
                                                            spec.seed, repeat=spec.allow_repeat))
    src = spec.sources
    (work / "_export.json").write_text(json.dumps({
        "nanotron": NANOTRON_COMMIT, "datatrove": DATATROVE_COMMIT, "output_dir": str(src.output_dir.resolve()),
        "run": result.run,
        "mix_in": src.mix_in, "prompts": result.prompts, "ratio": spec.ratio, "weights": result.weights,
        "seed": spec.seed, "tokenizer": tt.recorded, "eos_id": tt.eos_id, "keep_truncated": src.keep_truncated,
        "allow_repeat": spec.allow_repeat, "plan": vars(spec.plan),
        "folders": {f.folder.name: {"documents": f.documents, "tokens": f.tokens} for f in result.folders},
        "skipped": result.skipped}, indent=2))


def _check_coverage(result: ExportResult, plan: TrainPlan) -> None:
    cov = result.coverage
    if any(not c.ok for c in cov) and not result.repeat:
        most = min(c.max_steps for c in cov)
        fit = (f"they support at most {most:,} steps at this batch and mix (--train-steps {most})" if most
               else "they do not hold even one step's worth at this batch and mix")
        raise CoverageError(
            f"the token folders do not cover the plan: nanotron reads each folder in order and crashes "
            f"(IndexError) when one runs out, hours into training; {fit}. Generate or mix in more data, plan a "
            f"smaller run, or pass --allow-repeat (nanotron's older loader then repeats the folders silently, "
            f"without document masking)", result)
    empty = [f.folder.name for f, c in zip(result.folders, cov) if c.samples == 0]
    if empty:  # even the repeating loader divides by the folder's sample count (ZeroDivisionError)
        raise CoverageError(f"{', '.join(empty)}: fewer tokens than one training sample ({plan.sequence_length + 1:,} "
                            f"tokens); nanotron cannot read such a folder at all. Generate or mix in more data, or "
                            f"use a shorter --seq-len", result)

