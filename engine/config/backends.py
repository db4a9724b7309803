"""The backends a run can name, and what each one can do: one registry of traits, asked instead of
branching on a backend's name (config validation, the model setup, the renderer's budget, the run).

`make_backend` (engine/backends/__init__.py) imports `traits(name).module` lazily and builds its
`BACKEND` class from the run config, so naming a backend here costs nothing until it is used, and this
module imports no backend. `sglang-http` is the old name of `http`, kept as an alias: `canonical` maps
it, and a loaded run config is always canonical.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ConfigError


@dataclass(frozen=True)
class BackendTraits:
    name: str  # what `backend` says in a run config
    module: str  # the module whose `BACKEND` class builds it (`BACKEND.from_config(cfg, setup)`)
    model_free: bool  # no model runs (instant): rows name the model "instant:<model>"
    in_process: bool  # the engine runs in this process (False: servers elsewhere, reached over HTTP)
    # A shared prompt prefix's KV is computed once and reused (torch: its own cache, `torch.prefix_cache`;
    # vllm / sglang: the engine's prefix / radix cache; http: the server's).
    prefix_cache: bool
    # The engine has a loop detector of its own that the run switches on per request: vLLM's
    # `repetition_detection`. False where the stop is ours: torch (its decode loop), sglang (our custom
    # logit processor, which 0.5.23 must be allowed to load), http (native: the same processor; openai:
    # vLLM servers honour `repetition_detection`, SGLang's OpenAI routes ignore it), instant (no model).
    native_repetition_stop: bool
    # Completions carry the engine's own cached-token count (http: SGLang's meta_info always; OpenAI
    # servers only when they report it: `vllm serve --enable-prompt-tokens-details`, SGLang
    # `--enable-cache-report`, else 0).
    reports_cached_tokens: bool
    hub_models: bool  # model.name may be a Hugging Face Hub id the engine downloads itself
    # Tokens at the end of the context the backend never generates into: SGLang caps max_new_tokens at
    # max_req_len - input - 1 with max_req_len = context - 1 (scheduler.py:2709, tp_worker.py:568), so a
    # request at the full budget gets 2 tokens fewer; the renderer leaves them out of the document budget.
    context_reserve: int


SGLANG_CONTEXT_RESERVE = 2

BACKENDS: dict[str, BackendTraits] = {t.name: t for t in (
    BackendTraits("torch", "engine.backends.torch_backend", model_free=False, in_process=True, prefix_cache=True,
                  native_repetition_stop=False, reports_cached_tokens=True, hub_models=False, context_reserve=0),
    BackendTraits("instant", "engine.backends.instant", model_free=True, in_process=True, prefix_cache=False,
                  native_repetition_stop=False, reports_cached_tokens=False, hub_models=False, context_reserve=0),
    BackendTraits("vllm", "engine.backends.vllm_engine", model_free=False, in_process=True, prefix_cache=True,
                  native_repetition_stop=True, reports_cached_tokens=True, hub_models=True, context_reserve=0),
    BackendTraits("sglang", "engine.backends.sglang_engine", model_free=False, in_process=True, prefix_cache=True,
                  native_repetition_stop=False, reports_cached_tokens=True, hub_models=True,
                  context_reserve=SGLANG_CONTEXT_RESERVE),
    # The reserve is SGLang's; an OpenAI server that is vLLM loses 2 tokens of document budget to it.
    BackendTraits("http", "engine.backends.http", model_free=False, in_process=False, prefix_cache=True,
                  native_repetition_stop=False, reports_cached_tokens=True, hub_models=True,
                  context_reserve=SGLANG_CONTEXT_RESERVE),
)}
ALIASES = {"sglang-http": "http"}  # old name -> name


def canonical(name: str) -> str:
    """The backend's registered name (an alias resolved); an unknown name is returned as it is."""
    return ALIASES.get(name, name)


def traits(name: str) -> BackendTraits:
    """What the backend `name` (or an alias of it) can do; a ConfigError naming the known ones otherwise."""
    found = BACKENDS.get(canonical(name))
    if found is None:
        known = ", ".join([*BACKENDS, *(f"{a} (= {n})" for a, n in ALIASES.items())])
        raise ConfigError(f"config key 'backend': unknown backend {name!r} (one of {known})")
    return found
