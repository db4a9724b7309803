"""A sweep file (SWEEP.toml): models x optimisation tiers over one fixed sample of documents.

    [sweep]   name, results (directory), timeout_s (per config), gpu_hour_usd, keep_outputs,
              reference_label (what the models' `reference` figures are)
    [data]    paths, docs (measured), warmup_docs (run first, not counted), text_column, id_column
    [run]     the run config every benchmark config starts from (the keys of `engine run` configs)
    [tiers.NAME]  vary = { "dotted.config.key" = [values, ...] }   every combination is one config;
              a key whose values are tables is a named group of settings applied together, e.g.
              speculation = [{}, { "sglang.server_args.speculative_algorithm" = "NGRAM", ... }];
              after = "tier1": start from the best config found so far (baseline and earlier tiers)
    [[models]]  name (model.name), label, params_b, quality (optional score, higher is better),
              gpus (GPUs per config when the backend cannot tell), set = { key = value } (this
              model's fixed settings), vary = { tier1 = { key = [...] } } (extra knobs for one tier),
              reference = { default = .., tier1 = .., tier2 = .. } (published figures, shown beside ours)

Every config of a model is the baseline (run + the model's `set`) plus one combination of a tier.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from engine.config.run_config import config_from_dict, nest, parse_override, read_toml
from engine.errors import ConfigError

BASELINE = "baseline"
RUN_CONTROLLED = ("input.paths", "output.dir", "shard.index", "shard.count")  # set by the bench itself


@dataclass
class DataSpec:
    paths: list[str]
    docs: int = 256
    warmup_docs: int = 16
    text_column: str = "text"
    id_column: str = "id"


@dataclass
class Tier:
    name: str
    vary: dict[str, list]
    after: str | None = None  # start from the best config of the tiers up to this one


@dataclass
class ModelEntry:
    name: str
    label: str
    params_b: float | None = None
    quality: float | None = None
    gpus: int | None = None
    set: dict[str, Any] = field(default_factory=dict)
    vary: dict[str, dict[str, list]] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchConfig:
    """One point of the sweep: a model, a tier and the settings that differ from the run config."""
    model: ModelEntry
    tier: str
    settings: dict[str, Any]  # dotted key -> value: the model's `set`, a carried winner, this tier's knobs
    key: str

    def describe(self) -> str:
        knobs = {k: v for k, v in self.settings.items() if k not in self.model.set}
        return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in knobs.items()) or "defaults"


@dataclass
class Sweep:
    path: Path
    name: str
    results: Path
    timeout_s: float
    gpu_hour_usd: float
    keep_outputs: bool
    reference_label: str
    data: DataSpec
    run: dict  # nested run-config data, relative paths resolved against the sweep file
    tiers: list[Tier]
    models: list[ModelEntry]

    def select(self, labels: str | None) -> list[ModelEntry]:
        """The models named in a comma-separated list of labels (`--models`), in sweep order; all for None."""
        if not labels:
            return list(self.models)
        wanted = [x.strip() for x in labels.split(",") if x.strip()]
        unknown = set(wanted) - {m.label for m in self.models}
        if unknown:
            raise ConfigError(f"--models: unknown {', '.join(sorted(unknown))} "
                              f"(the sweep has {', '.join(m.label for m in self.models)})")
        return [m for m in self.models if m.label in wanted]

    def config(self, model: ModelEntry, tier: str, settings: dict[str, Any]) -> BenchConfig:
        ident = {"model": model.name, "settings": settings, "run": self.run,
                 "data": [self.data.paths, self.data.docs, self.data.warmup_docs, self.data.text_column]}
        key = hashlib.sha1(orjson.dumps(ident, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]
        return BenchConfig(model, tier, settings, key)

    def baseline(self, model: ModelEntry) -> BenchConfig:
        return self.config(model, BASELINE, dict(model.set))

    def expand(self, model: ModelEntry, tier: Tier, start: dict[str, Any]) -> list[BenchConfig]:
        """Every combination of the tier's knobs (and the model's extra knobs for it) on top of `start`."""
        vary = {**tier.vary, **model.vary.get(tier.name, {})}
        keys = list(vary)
        configs = []
        for values in itertools.product(*(vary[k] for k in keys)):
            settings = dict(start)
            for k, v in zip(keys, values):
                settings.update(v if isinstance(v, dict) else {k: v})  # a group, or one knob
            configs.append(self.config(model, tier.name, settings))
        return configs

    def run_data(self, settings: dict[str, Any], overrides: dict[str, Any]) -> dict:
        data = self.run
        for key, value in {**settings, **overrides}.items():
            data = deep_merge(data, nest(key.split("."), value))
        return data

    def check(self, cfg: BenchConfig) -> None:
        """Build the run config of `cfg` as the worker will, so a bad knob fails before anything runs."""
        data = self.run_data(cfg.settings, {"model.name": cfg.model.name, "input.paths": ["sample.parquet"],
                                            "output.dir": "out"})
        try:
            config_from_dict(data, self.path.parent)
        except ConfigError as exc:
            raise ConfigError(f"{self.path}: model {cfg.model.label}, {cfg.tier} ({cfg.describe()}): {exc}") from None


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _absolute(raw: dict, base: Path) -> dict:
    """Resolve the sweep's own paths (data.paths, sweep.results) that are still relative against `base`."""
    def absolute(p):
        return p if not isinstance(p, str) or Path(p).is_absolute() else str((base / p).resolve())

    data, sweep = raw.get("data"), raw.get("sweep")
    if isinstance(data, dict) and isinstance(data.get("paths"), list):
        data["paths"] = [absolute(p) for p in data["paths"]]
    if isinstance(sweep, dict) and "results" in sweep:
        sweep["results"] = absolute(sweep["results"])
    return raw


def _take(table: dict, where: str, known: dict[str, type]) -> dict:
    unknown = set(table) - set(known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(known))})")
    for k, tp in known.items():
        if k in table and not isinstance(table[k], tp):
            raise ConfigError(f"{where}.{k}: expected {tp}, got {table[k]!r}")
    return table


def _vary(table: Any, where: str) -> dict[str, list]:
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{where}: give a table of config keys to lists of values")
    for k, v in table.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{where}.\"{k}\": expected a non-empty list of values")
        groups = [x for x in v if isinstance(x, dict)]
        if groups and len(groups) != len(v):
            raise ConfigError(f"{where}.\"{k}\": give either values or tables of settings, not both")
        for name in [k] if not groups else [n for g in groups for n in g]:
            if name in RUN_CONTROLLED:
                raise ConfigError(f"{where}.\"{name}\": set by the bench itself, not a knob")
    return table


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    path = Path(path)
    raw = read_toml(path, "sweep")
    _take(raw, str(path), {"sweep": dict, "data": dict, "run": dict, "tiers": dict, "models": list})
    base = path.resolve().parent
    _absolute(raw, base)
    for item in overrides:  # paths given on the command line are relative to the current directory
        parts, value = parse_override(item)
        raw = _absolute(deep_merge(raw, nest(parts, value)), Path.cwd())

    s = _take(raw.get("sweep", {}), "[sweep]", {"name": str, "results": str, "timeout_s": (int, float),
                                                  "gpu_hour_usd": (int, float), "keep_outputs": bool,
                                                  "reference_label": str})
    d = _take(raw.get("data", {}), "[data]", {"paths": list, "docs": int, "warmup_docs": int, "text_column": str,
                                              "id_column": str})
    if not d.get("paths"):
        raise ConfigError(f"{path}: [data] paths: give the input files the sample is taken from")
    data = DataSpec(list(d["paths"]), d.get("docs", 256), d.get("warmup_docs", 16), d.get("text_column", "text"),
                    d.get("id_column", "id"))
    if data.docs < 1 or data.warmup_docs < 0:
        raise ConfigError(f"{path}: [data] docs must be >= 1 and warmup_docs >= 0")

    run = dict(raw.get("run", {}))
    for key in RUN_CONTROLLED:
        section, name = key.split(".")
        if name in run.get(section, {}):
            raise ConfigError(f"{path}: [run] {key} is set by the bench itself (use [data] and [sweep] results)")
    run.setdefault("report", {})["enabled"] = False  # throughput only; `engine report` works on kept outputs

    tiers = []
    for name, t in raw.get("tiers", {}).items():
        if name == BASELINE:
            raise ConfigError(f"{path}: '{BASELINE}' is the implicit first tier; name tiers otherwise")
        t = _take(t, f"[tiers.{name}]", {"vary": dict, "after": str})
        if "after" in t and t["after"] not in [x.name for x in tiers]:
            raise ConfigError(f"{path}: [tiers.{name}] after = {t['after']!r} is not an earlier tier")
        tiers.append(Tier(name, _vary(t.get("vary"), f"[tiers.{name}] vary"), t.get("after")))

    models = []
    for i, m in enumerate(raw.get("models", [])):
        where = f"[[models]] #{i + 1}"
        m = _take(m, where, {"name": str, "label": str, "params_b": (int, float), "quality": (int, float),
                             "gpus": int, "set": dict, "vary": dict, "reference": dict})
        if "name" not in m:
            raise ConfigError(f"{path}: {where} needs a name (the model.name of the run config)")
        vary = {}
        for tier, table in m.get("vary", {}).items():
            if tier not in [t.name for t in tiers]:
                raise ConfigError(f"{path}: {where} vary.{tier}: no such tier")
            vary[tier] = _vary(table, f"{where} vary.{tier}")
        name = m["name"]
        if not Path(name).is_absolute() and (base / name).exists():
            name = str((base / name).resolve())
        models.append(ModelEntry(name, m.get("label", Path(name).name), m.get("params_b"), m.get("quality"),
                                 m.get("gpus"), dict(m.get("set", {})), vary,
                                 {k: float(v) for k, v in m.get("reference", {}).items()}))
    if not models:
        raise ConfigError(f"{path}: no [[models]]")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{path}: model labels must be unique ({', '.join(labels)})")

    results = Path(s.get("results", base / f"../out/bench/{s.get('name', path.stem)}")).resolve()
    return Sweep(path, s.get("name", path.stem), results,
                 float(s.get("timeout_s", 1800)), float(s.get("gpu_hour_usd", 3.0)), s.get("keep_outputs", False),
                 s.get("reference_label", "published"), data, run, tiers, models)
