"""The typed record of a shard's figures: its state file, and a run's summary, written and read here only.

    PromptFigures   one prompt's stored rows: done, failed, per finish reason, output and useful tokens
                    (engine/gate.py), duplicates; counted from the parts (PartSink), so they equal the Parquet
    ProcessFigures  this process alone ("this_process"): requests generated, output tokens, seconds
    ShardTotals     the shard over every attempt ("totals"): rows and output tokens from the parts, seconds
                    and attempts summed (`ShardTotals.before(state) + this process`)
    Rates           this process's start-up / generation / finishing seconds and rates over generation
    ShardState      OUTPUT_DIR/_state/<shard>.json: what `engine status`, the dataset card and the launchers read
    ProcessReport   this process's counters and clock as the summary reports them (with `per_prompt`)
    RunSummary      summary.json (summary-<shard>.json with several shards), and what `engine run` prints

JSON keys are the field names (the summary's ProcessReport fields at its top level). Each file has `schema_version`:
`read_state` converts an older one (1: none, before this module) and refuses a newer one, naming the file.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from engine.atomic import write_atomic
from engine.errors import ResumeError
from engine.metrics import Clock, Counters, Tally

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 1: the untyped dicts before this module (no schema_version key)


def _r(x: float, nd: int = 1) -> float:
    return round(float(x), nd)


def _rate(n: float, seconds: float, nd: int = 1) -> float:
    return round(n / seconds, nd) if seconds > 0 else 0.0


def _known(cls, d: dict) -> dict:
    """The keys of `d` that are fields of dataclass `cls` (older or newer files may carry others)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


# ---- the parts of a state ------------------------------------------------------------------------------
@dataclass
class PromptFigures:
    done: int = 0  # rows stored (every attempt)
    failed: int = 0  # of which finish_reason "error"
    finish_reasons: dict[str, int] = field(default_factory=dict)
    output_tokens: int = 0  # completion tokens of every stored row
    useful_tokens: int = 0  # completion tokens of the rows that pass the quality gate (engine/gate.py)
    duplicates: int = 0  # rows whose id another stored row of the shard has
    # prompt tokens of the stored rows, of which the backend served `cached_prompt_tokens` from its prefix cache
    # (its own counter: vLLM num_cached_tokens, SGLang meta_info, `vllm serve` prompt_tokens_details, torch's
    # PrefixCache); the rest it computed
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    computed_prompt_tokens: int = 0

    @classmethod
    def of(cls, tally: dict[str, Tally], duplicates: int = 0) -> PromptFigures:
        prompt, cached = sum(t.prompt_tokens for t in tally.values()), sum(t.cached_tokens for t in tally.values())
        return cls(done=sum(t.rows for t in tally.values()), failed=tally["error"].rows if "error" in tally else 0,
                   finish_reasons={r: t.rows for r, t in tally.items()},
                   output_tokens=sum(t.tokens for t in tally.values()),
                   useful_tokens=sum(t.useful_tokens for t in tally.values()), duplicates=duplicates,
                   prompt_tokens=prompt, cached_prompt_tokens=cached, computed_prompt_tokens=prompt - cached)


@dataclass
class ProcessFigures:
    requests: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    startup_s: float = 0.0
    generation_s: float = 0.0
    finishing_s: float = 0.0

    @classmethod
    def of(cls, counters: Counters, clock: Clock) -> ProcessFigures:
        return cls(counters.requests_done, counters.completion_tokens, _r(clock.elapsed), _r(clock.startup_s),
                   _r(clock.generation_s), _r(clock.finishing_s))


SUMMED = ("wall_s", "startup_s", "generation_s", "finishing_s")  # seconds summed over attempts


@dataclass
class ShardTotals:
    rows: int = 0  # stored rows (from the parts)
    output_tokens: int = 0  # their completion tokens
    attempts: int = 0
    wall_s: float = 0.0
    startup_s: float = 0.0
    generation_s: float = 0.0
    finishing_s: float = 0.0

    @classmethod
    def before(cls, state: ShardState | None) -> ShardTotals:
        """The sums over the attempts before this one, from the state file found at start (after a kill -9 its
        last write: a flush interval old at most). Rows and tokens are not carried: the parts hold them."""
        if state is None:
            return cls()
        t = state.totals
        return cls(attempts=t.attempts, **{k: getattr(t, k) for k in SUMMED})

    def plus(self, this: ProcessFigures, rows: int, output_tokens: int) -> ShardTotals:
        """This shard over every attempt: the earlier ones, this process, and what the parts store."""
        return ShardTotals(rows=rows, output_tokens=output_tokens, attempts=self.attempts + 1,
                           **{k: _r(getattr(self, k) + getattr(this, k)) for k in SUMMED})


@dataclass
class Rates:
    """This process's timing; rates are over generation time."""
    startup_s: float = 0.0
    process_startup_s: float | None = None  # from the process's own start; None when unknown
    generation_s: float = 0.0
    finishing_s: float = 0.0
    requests_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    useful_output_tokens: int = 0
    useful_output_tokens_per_s: float = 0.0

    @classmethod
    def of(cls, counters: Counters, clock: Clock) -> Rates:
        gen, proc, useful = clock.generation_s, clock.process_startup_s, counters.useful_tokens
        return cls(_r(clock.startup_s), _r(proc) if proc is not None else None, _r(gen), _r(clock.finishing_s),
                   _rate(counters.requests_done, gen, 3), _rate(counters.completion_tokens, gen), useful,
                   _rate(useful, gen))


@dataclass
class SlurmAttempt:
    job_id: str
    task: str  # "<array job>_<task>" or the job id
    restart_count: int = 0


# ---- the state file --------------------------------------------------------------------------------------
@dataclass
class ShardState:
    shard: str  # s00003-of-00016
    input_rows: int | None
    prompts: dict[str, PromptFigures]
    rejected: int
    complete: bool
    totals: ShardTotals
    this_process: ProcessFigures
    rates: Rates
    model: str = ""
    backend: str = ""
    pid_host: str = ""
    flush_seconds: float = 0.0
    elapsed_s: float = 0.0  # this process's wall clock
    slurm: SlurmAttempt | None = None
    exit_status: int | None = None  # once the process ended
    ended_at: float | None = None
    updated_at: float = 0.0
    schema_version: int = SCHEMA_VERSION

    @property
    def output_tokens(self) -> int:
        """The shard's output tokens over every attempt (from the stored parts)."""
        return self.totals.output_tokens

    @property
    def stored(self) -> int:
        return sum(p.done for p in self.prompts.values())

    @property
    def useful_tokens(self) -> int:
        return sum(p.useful_tokens for p in self.prompts.values())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        rates = d.pop("rates")
        if rates["process_startup_s"] is None:
            del rates["process_startup_s"]
        for k in ("slurm", "exit_status", "ended_at"):
            if d[k] is None:
                del d[k]
        return {"schema_version": d.pop("schema_version"), **d, **rates, "output_tokens": self.output_tokens}

    @classmethod
    def from_dict(cls, d: dict, where: str = "state file") -> ShardState:
        version = d.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ResumeError(f"{where}: written by a newer synth-engine (state schema {version!r}; this one reads "
                              f"up to {SCHEMA_VERSION}): upgrade synth-engine to read this output")
        if version == 1:
            d = _from_v1(d)
        try:
            return cls(shard=d["shard"], input_rows=d.get("input_rows"),
                       prompts={p: PromptFigures(**_known(PromptFigures, c)) for p, c in d["prompts"].items()},
                       rejected=int(d.get("rejected", 0)), complete=bool(d.get("complete")),
                       totals=ShardTotals(**_known(ShardTotals, d.get("totals") or {})),
                       this_process=ProcessFigures(**_known(ProcessFigures, d.get("this_process") or {})),
                       rates=Rates(**_known(Rates, d)),
                       slurm=SlurmAttempt(**_known(SlurmAttempt, d["slurm"])) if d.get("slurm") else None,
                       **_known(cls, {k: v for k, v in d.items() if k not in {
                           "shard", "input_rows", "prompts", "rejected", "complete", "totals", "this_process",
                           "rates", "slurm", "schema_version"}}))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ResumeError(f"{where}: not a readable shard state ({type(exc).__name__}: {exc}); delete it to "
                              f"let the next run write it again (the stored parts are not affected)") from None


def _from_v1(d: dict) -> dict:
    """A version-1 state file (before schema_version): `totals` may be missing (one attempt then, its wall
    clock as generation time), per-prompt `useful_tokens` counted whitespace-only rows (kept as written)."""
    d = dict(d)
    if "totals" not in d:
        wall = float(d.get("elapsed_s") or 0.0)
        tokens = int(d.get("output_tokens") or 0)
        d["totals"] = {"rows": sum(int(c.get("done", 0)) for c in d.get("prompts", {}).values()),
                       "output_tokens": tokens, "attempts": 1, "wall_s": wall, "generation_s": wall}
    return d


def state_path(out: Path, tag: str) -> Path:
    return Path(out) / "_state" / f"{tag}.json"


def write_state(out: Path, state: ShardState) -> None:
    state.updated_at = time.time()
    write_atomic(state_path(out, state.shard), orjson.dumps(state.to_dict(), option=orjson.OPT_INDENT_2))


def load_state(path: Path) -> ShardState:
    """One state file; a ResumeError naming it when it is unreadable or of a newer schema."""
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ResumeError(f"{path}: damaged state file ({exc}); delete it to let the next run write it again "
                          f"(the stored parts are not affected)") from None
    if not isinstance(data, dict):
        raise ResumeError(f"{path}: not a shard state (a JSON {type(data).__name__})")
    return ShardState.from_dict(data, str(path))


def read_state(out: Path, tag: str) -> ShardState | None:
    """This shard's state at start (the earlier attempts' sums): None when there is none; a damaged one is
    said and ignored (the state is derived: the parts are what counts), a newer schema is refused."""
    path = state_path(out, tag)
    if not path.exists():
        return None
    try:
        return load_state(path)
    except ResumeError as exc:
        if "newer synth-engine" in str(exc):
            raise
        log.warning("%s; counting this shard's earlier attempts as none", exc)
        return None


def read_states(out: Path, damaged: dict[str, str] | None = None) -> list[ShardState]:
    """Every shard's state in `out`, by shard tag. An unreadable one raises its ResumeError (naming it), unless
    `damaged` is given: then it is left out and its message recorded there, under its shard tag."""
    folder = Path(out) / "_state"
    if not folder.is_dir():
        return []
    states = []
    for path in sorted(folder.glob("*.json")):
        try:
            states.append(load_state(path))
        except ResumeError as exc:
            if damaged is None:
                raise
            damaged[path.stem] = str(exc)
    return states


# ---- the summary -----------------------------------------------------------------------------------------
@dataclass
class PromptRates:
    rows: int
    finish_reasons: dict[str, int]
    output_tokens: int
    useful_output_tokens: int
    output_tokens_per_s: float
    useful_output_tokens_per_s: float
    prompt_tokens: int = 0  # of these rows; the backend served `cached_prompt_tokens` of them from its cache
    cached_prompt_tokens: int = 0
    computed_prompt_tokens: int = 0


@dataclass
class ProcessReport:
    """This process's figures as the summary reports them; rates over generation time (README, "What each
    figure covers")."""
    requests_generated: int = 0
    requests_skipped: int = 0
    failed_this_process: int = 0
    retries: int = 0
    rejected_rows: int = 0
    truncated: int = 0  # documents cut to fit the context (input truncation)
    input_truncated: int = 0
    output_truncated: int = 0  # generations cut at max_new_tokens
    repetition_stopped: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    useful_output_tokens: int = 0
    useful_share: float = 0.0
    cached_tokens: int = 0
    computed_prompt_tokens: int = 0  # input_tokens - cached_tokens: what the backend prefilled
    prefix_cache_hit_rate: float = 0.0
    wall_seconds: float = 0.0
    startup_s: float = 0.0
    process_startup_s: float | None = None
    generation_s: float = 0.0
    finishing_s: float = 0.0
    requests_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    useful_output_tokens_per_s: float = 0.0
    input_tokens_per_s: float = 0.0
    per_prompt: dict[str, PromptRates] = field(default_factory=dict)

    @classmethod
    def of(cls, c: Counters, clock: Clock) -> ProcessReport:
        gen, reasons, useful = clock.generation_s, c.reasons(), c.useful_tokens
        proc = clock.process_startup_s
        per_prompt = {}
        for prompt, by in sorted(c.stored.items()):
            tokens, good = sum(t.tokens for t in by.values()), sum(t.useful_tokens for t in by.values())
            ptoks, cached = sum(t.prompt_tokens for t in by.values()), sum(t.cached_tokens for t in by.values())
            per_prompt[prompt] = PromptRates(sum(t.rows for t in by.values()), {r: t.rows for r, t in by.items()},
                                             tokens, good, _rate(tokens, gen), _rate(good, gen), ptoks, cached,
                                             ptoks - cached)
        return cls(
            requests_generated=c.requests_done, requests_skipped=c.requests_skipped, failed_this_process=c.failed,
            retries=c.retries, rejected_rows=c.rejected, truncated=c.truncated, input_truncated=c.truncated,
            output_truncated=reasons.get("length", 0), repetition_stopped=reasons.get("repetition", 0),
            finish_reasons=reasons, input_tokens=c.prompt_tokens, output_tokens=c.completion_tokens,
            useful_output_tokens=useful,
            useful_share=round(useful / c.completion_tokens, 4) if c.completion_tokens else 0.0,
            cached_tokens=c.cached_tokens, computed_prompt_tokens=c.prompt_tokens - c.cached_tokens,
            prefix_cache_hit_rate=round(c.cached_tokens / c.prompt_tokens, 4) if c.prompt_tokens else 0.0,
            wall_seconds=_r(clock.elapsed, 2), startup_s=_r(clock.startup_s, 2),
            process_startup_s=_r(proc, 2) if proc is not None else None, generation_s=_r(gen, 2),
            finishing_s=_r(clock.finishing_s, 2), requests_per_s=_rate(c.requests_done, gen, 2),
            output_tokens_per_s=_rate(c.completion_tokens, gen), useful_output_tokens_per_s=_rate(useful, gen),
            input_tokens_per_s=_rate(c.prompt_tokens, gen), per_prompt=per_prompt)


@dataclass
class RunSummary:
    output_dir: str
    shard: str
    model: str
    backend: str
    prompts: list[str]
    resumed: bool
    complete: bool
    input_rows: int | None
    documents_stored: dict[str, int]  # rows stored per prompt (every attempt)
    process: ProcessReport  # this process
    failed: int  # error rows stored (every attempt)
    error_rows_removed: int  # by --retry-errors
    shard_totals: ShardTotals
    this_process: ProcessFigures
    input_warnings: list[str] = field(default_factory=list)
    useful_notes: list[str] = field(default_factory=list)  # why the useful share is low, where it is (useful_notes())
    report: str | None = None  # the diversity report's path, once written
    report_warnings: list[str] = field(default_factory=list)
    units: dict | None = None  # a worker's (engine/worker.py): count, committed, by_this_worker; totals: every unit
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        process = d.pop("process")
        if process["process_startup_s"] is None:
            del process["process_startup_s"]
        if d["report"] is None:
            del d["report"]
        return {"schema_version": d.pop("schema_version"), **d, **process}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2)

    @classmethod
    def from_dict(cls, d: dict, where: str = "summary") -> RunSummary:
        version = d.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ResumeError(f"{where}: written by a newer synth-engine (summary schema {version!r}; this one "
                              f"reads up to {SCHEMA_VERSION}): upgrade synth-engine to read it")
        try:
            process = ProcessReport(**{**_known(ProcessReport, d), "per_prompt": {
                p: PromptRates(**_known(PromptRates, q)) for p, q in (d.get("per_prompt") or {}).items()}})
            if version == 1:  # the failed count of this process was `failed_this_process` or, alone, `failed`
                process.failed_this_process = int(d.get("failed_this_process", d.get("failed", 0)))
            nested = {"process", "shard_totals", "this_process", "schema_version"}
            return cls(**{**_known(cls, {k: v for k, v in d.items() if k not in nested}), "process": process,
                          "shard_totals": ShardTotals(**_known(ShardTotals, d.get("shard_totals") or {})),
                          "this_process": ProcessFigures(**_known(ProcessFigures, d.get("this_process") or {}))})
        except (KeyError, TypeError) as exc:
            raise ResumeError(f"{where}: not a readable run summary ({type(exc).__name__}: {exc})") from None


def load_summary(path: Path) -> RunSummary:
    try:
        data = orjson.loads(Path(path).read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ResumeError(f"{path}: damaged summary ({exc})") from None
    if not isinstance(data, dict):
        raise ResumeError(f"{path}: not a run summary (a JSON {type(data).__name__})")
    return RunSummary.from_dict(data, str(path))


def write_summary(out: Path, summary: RunSummary, shard_count: int) -> Path:
    path = Path(out) / ("summary.json" if shard_count == 1 else f"summary-{summary.shard}.json")
    write_atomic(path, summary.to_json())
    return path

