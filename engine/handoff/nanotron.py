"""`engine export nanotron`: token folders (one per source) + a nanotron training config.

Target: nanotron's main branch (github.com/huggingface/nanotron; read at commit 1dfee7f5 for
`examples/config_qwen.yaml` and `NanosetDatasetsArgs`), whose Nanoset loader reads folders of
datatrove token files (`src/nanotron/data/tokenized_bytes.py`, `DatatroveFolderDataset`). The PyPI
release (nanotron 0.4, 2024) has no such loader and cannot read these folders; its main branch
passes keyword arguments that only datatrove's main branch has, so install both from git (as the
field did) in an environment of their own: nanotron pins numpy < 2, lighteval numpy >= 2.

Each training sample is seq_len + 1 tokens; nanotron samples folder i with probability weight_i and
fails when a folder has fewer samples than training asks of it, so the export checks that
tokens_i // (seq_len + 1) >= train_steps x global_batch x weight_i and says what would fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from .token_files import TokenFolder


@dataclass
class TrainPlan:
    sequence_length: int = 4096
    micro_batch_size: int = 4
    grad_accum: int = 4
    gpus: int = 8  # data-parallel ranks
    train_steps: int = 40_000  # 40,000 x 128 x 4,096 = 21.0 B tokens: the field's ablation budget
    learning_rate: float = 3e-4

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.gpus

    @property
    def tokens(self) -> int:
        return self.train_steps * self.global_batch * self.sequence_length


@dataclass
class Coverage:
    weight: float
    tokens: int
    samples: int  # full training samples (seq_len + 1 tokens) the folder holds
    needed: int  # samples training draws from it
    max_steps: int  # the most steps this folder supports at this weight

    @property
    def ok(self) -> bool:
        return self.samples >= self.needed


def coverage(folders: list[TokenFolder], weights: list[float], plan: TrainPlan) -> list[Coverage]:
    out = []
    for f, w in zip(folders, weights):
        samples = f.tokens // (plan.sequence_length + 1)
        needed = math.ceil(plan.train_steps * plan.global_batch * w)
        max_steps = int(samples // (plan.global_batch * w)) if w > 0 else plan.train_steps
        out.append(Coverage(w, f.tokens, samples, needed, max_steps))
    return out


def student_model(vocab_size: int, plan: TrainPlan, bos: int | None, eos: int | None) -> dict:
    """The field's ablation student: a ~1.7 B Qwen2-style dense model (SmolLM2-1.7B's shape), 4k context."""
    return {
        "ddp_bucket_cap_mb": 25, "dtype": "bfloat16", "init_method": {"std": 0.02}, "make_vocab_size_divisible_by": 1,
        "model_config": {
            "is_qwen2_config": True, "attention_bias": False, "bos_token_id": bos, "eos_token_id": eos,
            "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
            "max_position_embeddings": plan.sequence_length, "num_attention_heads": 32, "num_hidden_layers": 24,
            "num_key_value_heads": 32, "pad_token_id": None, "pretraining_tp": 1, "rms_norm_eps": 1.0e-05,
            "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": True, "use_cache": True,
            "vocab_size": vocab_size, "_attn_implementation": "flash_attention_2", "_use_doc_masking": True,
        },
    }


def training_config(folders: list[TokenFolder], weights: list[float], vocab_size: int, plan: TrainPlan,
                    run_name: str, checkpoints: str, bos: int | None, eos: int | None, seed: int) -> dict:
    names = {f.tokenizer_name for f in folders}
    sizes = {f.token_size for f in folders}
    if len(names) != 1 or len(sizes) != 1:
        raise ValueError(f"the token folders disagree on the tokenizer: {names} / {sizes}")
    tokenizer_name, token_size = names.pop(), sizes.pop()
    warmup = max(1, min(2000, plan.train_steps // 100))
    return {
        "general": {"project": "synth-engine-ablations", "run": run_name, "seed": seed, "step": None,
                    "consumed_train_samples": None, "benchmark_csv_path": None, "ignore_sanity_checks": True},
        "checkpoints": {"checkpoints_path": checkpoints, "checkpoint_interval": max(1, plan.train_steps // 10),
                        "checkpoints_path_is_shared_file_system": False, "resume_checkpoint_path": None,
                        "save_initial_state": False, "save_final_state": True, "load_lr_scheduler": True,
                        "load_optimizer": True},
        "data_stages": [{
            "name": "Stable Training Stage", "start_training_step": 1,
            "data": {"seed": seed, "num_loading_workers": 1, "dataset": {
                "dataset_folder": [str(f.folder) for f in folders],
                "dataset_weights": weights,
                "tokenizer_name": tokenizer_name,
                "token_size_in_bytes": token_size,
                "vocab_size": vocab_size,
                "return_positions": True,
                "dataset_read_path": None, "dataset_max_tokens": None, "shuffle_files": False,
                "skip_in_stream": False, "pad_samples_to_global_batch_size": False, "use_old_brrr_dataloader": False,
            }},
        }],
        "logging": {"iteration_step_info_interval": 1, "log_level": "info", "log_level_replica": "info"},
        "model": student_model(vocab_size, plan, bos, eos),
        "optimizer": {
            "accumulate_grad_in_fp32": True, "clip_grad": 1.0, "weight_decay": 0.1,
            "weight_decay_exclude_named_params": [], "zero_stage": 0,
            "learning_rate_scheduler": {"learning_rate": plan.learning_rate, "lr_warmup_steps": warmup,
                                        "lr_warmup_style": "linear", "lr_decay_style": "cosine",
                                        "lr_decay_steps": plan.train_steps - warmup, "lr_decay_starting_step": None,
                                        "min_decay_lr": plan.learning_rate / 10},
            "optimizer_factory": {"name": "adamW", "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1.0e-08,
                                  "torch_adam_is_fused": True},
        },
        "parallelism": {"dp": plan.gpus, "pp": 1, "tp": 1, "pp_engine": "1f1b", "tp_mode": "REDUCE_SCATTER",
                        "tp_linear_async_communication": True, "context_parallel_size": 1,
                        "expert_parallel_size": 1, "recompute_layer": False},
        "tokenizer": {"tokenizer_name_or_path": tokenizer_name, "tokenizer_revision": None,
                      "tokenizer_max_length": None},
        "tokens": {"sequence_length": plan.sequence_length, "train_steps": plan.train_steps,
                   "micro_batch_size": plan.micro_batch_size, "batch_accumulation_per_replica": plan.grad_accum,
                   "val_check_interval": -1, "limit_val_batches": 0, "limit_test_batches": 0},
    }


def write_config(path: Path, config: dict) -> None:
    path.write_text("# nanotron training config written by `engine export nanotron`; targets nanotron main "
                    "(datatrove token folders)\n" + yaml.safe_dump(config, sort_keys=False))


def launch_command(config_path: Path, plan: TrainPlan) -> str:
    return (f"CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun --nproc_per_node={plan.gpus} run_train.py "
            f"--config-file {config_path}")


def export_nanotron(output_dir: Path, mix_in: list[str], tokenizer_name: str, out: Path, ratio: float, seed: int,
                    plan: TrainPlan, prompts: list[str] | None, text_column: str, say=print) -> dict:
    """Tokenise both sources into OUT/generated and OUT/mix-in, write OUT/nanotron.yaml, check coverage."""
    from tqdm import tqdm

    from .sources import (
        GENERATED,
        MIX_IN,
        Skipped,
        generated_prompts,
        generated_rows,
        load_tokenizer,
        mix_in_rows,
    )
    from .token_files import write_token_folder

    if not 0 < ratio < 1:
        raise ValueError(f"--ratio {ratio}: the synthetic share must be between 0 and 1 (exclusive)")
    tokenizer, recorded = load_tokenizer(tokenizer_name)
    prompts = generated_prompts(output_dir, prompts)
    skipped = {GENERATED: Skipped(), MIX_IN: Skipped()}
    sources = {GENERATED: lambda: (r.text for r in generated_rows(output_dir, prompts, skipped[GENERATED])),
               MIX_IN: lambda: (r.text for r in mix_in_rows(mix_in, text_column, skipped[MIX_IN]))}
    folders = []
    for i, (name, texts) in enumerate(sources.items()):
        with tqdm(desc=f"tokenising {name}", unit="doc", disable=None) as bar:
            folders.append(write_token_folder(texts(), tokenizer, recorded, out / name, seed + i,
                                              name=f"000_{name}", progress=bar.update))
        say(f"{name:>9}: {folders[-1].documents:,} documents, {folders[-1].tokens:,} tokens -> {out / name}")
    weights = [ratio, round(1 - ratio, 6)]
    config = training_config(folders, weights, len(tokenizer), plan, f"mix-{int(ratio * 100)}-synthetic",
                              str(out / "checkpoints"), tokenizer.bos_token_id, tokenizer.eos_token_id, seed)
    config_path = out / "nanotron.yaml"
    write_config(config_path, config)
    cov = coverage(folders, weights, plan)
    return {"folders": folders, "weights": weights, "coverage": cov, "config": config_path,
            "launch": launch_command(config_path, plan), "tokenizer": recorded, "vocab_size": len(tokenizer),
            "skipped": {k: v.counts for k, v in skipped.items()}, "prompts": prompts}
