"""What the stored results of a run depend on: resuming into an output made otherwise is refused
(output/layout.py `check_fingerprint`); `engine run --dry-run` checks the same."""
from __future__ import annotations

from engine.config.backends import traits
from engine.config.run_config import RunConfig
from engine.input.identity import input_record
from engine.input.reader import Reader
from engine.model.setup import ModelSetup
from engine.render.prompts import Prompt
from engine.render.renderer import Renderer


def run_fingerprint(cfg: RunConfig, prompts: list[Prompt], setup: ModelSetup, renderer: Renderer,
                    reader: Reader) -> dict:
    s = setup.sampling
    units = {"units": {"rows": cfg.input.unit_rows, "count": reader.unit_count(cfg.input.unit_rows),
                       "input_rows": sum(f.rows or 0 for f in reader.files)}} \
        if cfg.input.unit_rows > 0 else {}  # workers claiming units (engine/worker.py); absent for static shards
    return {**units,
        "model": setup.model_name, "backend_family": "instant" if traits(cfg.backend).model_free else "model",
        "prompts": {p.name: p.fingerprint for p in prompts},
        "render": {"layout": cfg.render.layout},
        "sampling": {"temperature": s.temperature, "top_p": s.top_p, "seed": cfg.sampling.seed, **s.extra(),
                     **({"ignore_eos": True} if cfg.sampling.ignore_eos else {}),
                     "max_new_tokens": {n: r.max_new_tokens for n, r in renderer.rendered.items()}},
        "context": setup.context, "shard_count": cfg.shard.count, "system_prompt": cfg.model.system_prompt,
        "input": {"text_column": cfg.input.text_column, "id_column": cfg.input.id_column,
                  "files": input_record(reader.files)},
    }
