"""The model a run uses, known before any backend starts: where it is, its tokenizer, its context, the ids
that end a generation, and the sampling settings resolved once for every backend (run config, then the
model's generation config)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.config.backends import traits
from engine.config.run_config import RunConfig
from engine.model.locate import resolve_model
from engine.types import RepetitionStop, SamplingParams


def generation_config(model_dir: Path | str) -> dict:
    """The keys the model's generation_config.json sets (none when it has none)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir).to_diff_dict()
    except OSError:
        return {}


def generation_eos(model_dir: Path | str) -> list[int]:
    """The EOS ids the model's generation_config.json names (often more than the tokenizer's one)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def sampling_defaults(gen: dict, temperature: float | None, top_p: float | None) -> tuple[float, float]:
    """Run config first, then the model's generation config, then 0.7 / 0.95."""
    if temperature is None:
        temperature = float(gen["temperature"]) if gen.get("do_sample", True) and "temperature" in gen else 0.7
    if top_p is None:
        top_p = float(gen.get("top_p", 0.95))
    return temperature, top_p


def resolve_sampling(gen: dict, s, repetition=None) -> SamplingParams:
    """Every sampling knob from the run config's `[sampling]` first, then the model's generation
    config (as vLLM applies it by default: temperature, top_p, top_k, min_p, repetition_penalty),
    then off. One resolution for every backend, so SGLang, vLLM, HTTP and torch sample alike."""
    temperature, top_p = sampling_defaults(gen, s.temperature, s.top_p)

    def pick(name, value, cast, off):
        if value is not None:
            return cast(value)
        return cast(gen[name]) if gen.get(name) is not None else off
    return SamplingParams(temperature, top_p, s.seed, s.ignore_eos,
                          top_k=max(0, pick("top_k", s.top_k, int, 0)),
                          min_p=pick("min_p", s.min_p, float, 0.0),
                          repetition_penalty=pick("repetition_penalty", s.repetition_penalty, float, 1.0),
                          repetition_stop=(RepetitionStop(repetition.min_pattern, repetition.max_pattern,
                                                          repetition.min_count)
                                           if repetition is not None and repetition.enabled else None))


@dataclass
class ModelSetup:
    """What a run needs to know about its model before any backend starts."""
    model_dir: Path | str
    model_name: str
    tokenizer: object
    context: int
    sampling: SamplingParams

    @classmethod
    def load(cls, cfg: RunConfig) -> ModelSetup:
        from transformers import AutoConfig, AutoTokenizer

        model_dir, model_name = resolve_model(cfg.model.name, allow_hub=traits(cfg.backend).hub_models)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # get_text_config: multimodal checkpoints (Gemma-3 4B+) keep it in their text config
        context = cfg.model.context or AutoConfig.from_pretrained(model_dir).get_text_config().max_position_embeddings
        sampling = resolve_sampling(generation_config(model_dir), cfg.sampling, cfg.repetition)
        return cls(model_dir, model_name, tokenizer, context, sampling)

    def eos_ids(self) -> set[int]:
        """Every id that ends a generation: the generation config's EOS and the tokenizer's."""
        eos = self.tokenizer.eos_token_id
        return set(generation_eos(self.model_dir)) | ({eos} if eos is not None else set())
