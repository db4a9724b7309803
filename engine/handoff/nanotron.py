"""The nanotron side of `engine export nanotron`: the training plan, coverage, nanotron.yaml and the commands.

Target: the verified pair **nanotron 1dfee7f5 + datatrove 2c895af7** (NANOTRON_COMMIT,
DATATROVE_COMMIT). Its tokenized-bytes loader (`src/nanotron/data/tokenized_bytes.py`) reads folders
of datatrove token files through `DatatroveFolderDataset` with keyword arguments (`folder_path`,
`eos_token_id`, ...) that only datatrove's branch `nouamane/avoid-s3` (2c895af7) has: not its PyPI
releases, not its main. nanotron's main (2411b022) asserts "Only S3 paths are supported" after the
first step on local folders; the PyPI nanotron 0.4 has no such loader. tests/test_handoff.py runs
that nanotron's own config loader, dataset builder and BlendableDataset (source vendored in
tests/vendor) on what this module writes. Both go in an environment of their own (nanotron pins
numpy < 2; lighteval numpy >= 2).

The export's steps, in order, are in nanotron_export.py. The export is self-contained and relocatable:
every path in nanotron.yaml is relative to the export directory (token folders, checkpoints, and the
tokenizer when a copy is saved there), so training runs from that directory, wherever it is copied to.

Each training sample is seq_len + 1 tokens; nanotron samples folder i with weight_i, in order
within a folder, and crashes (IndexError) when a folder runs out, hours into training. So a plan
that needs more samples than a folder holds is an error unless the user allows repetition, which
switches nanotron to its older loader: it wraps around silently and returns no positions
(document masking off).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.errors import SourceError
from engine.handoff.token_files import TokenFolder
from engine.handoff.tokenizer import TrainingTokenizer

NANOTRON_COMMIT = "1dfee7f5"  # github.com/huggingface/nanotron (full: 1dfee7f5, see README)
DATATROVE_COMMIT = "2c895af7"  # github.com/huggingface/datatrove, branch nouamane/avoid-s3
INSTALL = (f"pip install 'nanotron @ git+https://github.com/huggingface/nanotron@{NANOTRON_COMMIT}' "
           f"'datatrove[io] @ git+https://github.com/huggingface/datatrove@{DATATROVE_COMMIT}' (plus flash-attn; "
           f"clone nanotron at {NANOTRON_COMMIT} for run_train.py and examples/llama/convert_nanotron_to_hf.py)")
CHECKPOINTS = "checkpoints"  # nanotron's checkpoints, relative to the export


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


def training_config(folders: list[TokenFolder], weights: list[float], plan: TrainPlan, tt: TrainingTokenizer,
                    seed: int, repeat: bool = False) -> dict:
    """nanotron.yaml for training on `folders` (sampled by `weights`) under `plan`; every path relative to the
    export directory (the folders' own names, `checkpoints`, the tokenizer as recorded). `repeat`: nanotron's
    older loader, which repeats a folder when it runs out."""
    vocab_size, bos, eos = len(tt.tokenizer), tt.tokenizer.bos_token_id, tt.eos_id
    names = {f.tokenizer_name for f in folders}
    sizes = {f.token_size for f in folders}
    if len(names) != 1 or len(sizes) != 1:
        raise SourceError(f"the token folders disagree on the tokenizer: {names} / {sizes}")
    tokenizer_name, token_size = names.pop(), sizes.pop()
    warmup = max(1, min(2000, plan.train_steps // 100))
    return {
        "general": {"project": "synth-engine-ablations", "run": run_name(weights[0]), "seed": seed, "step": None,
                    "consumed_train_samples": None, "benchmark_csv_path": None, "ignore_sanity_checks": True},
        "checkpoints": {"checkpoints_path": CHECKPOINTS, "checkpoint_interval": max(1, plan.train_steps // 10),
                        "checkpoints_path_is_shared_file_system": False, "resume_checkpoint_path": None,
                        "save_initial_state": False, "save_final_state": True, "load_lr_scheduler": True,
                        "load_optimizer": True},
        "data_stages": [{
            "name": "Stable Training Stage", "start_training_step": 1,
            "data": {"seed": seed, "num_loading_workers": 1, "dataset": {
                "dataset_folder": [f.folder.name for f in folders],
                "dataset_weights": weights,
                "tokenizer_name": tokenizer_name,
                "token_size_in_bytes": token_size,
                "vocab_size": vocab_size,
                "return_positions": True,
                "dataset_read_path": None, "dataset_max_tokens": None, "shuffle_files": False,
                "skip_in_stream": False, "pad_samples_to_global_batch_size": False,
                # the older loader repeats a folder when it runs out (no positions: document masking off)
                "use_old_brrr_dataloader": repeat,
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
                                        "min_decay_lr": round(plan.learning_rate / 10, 12)},
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
    path.write_text(f"# nanotron training config written by `engine export nanotron`, for nanotron {NANOTRON_COMMIT} "
                    f"with datatrove {DATATROVE_COMMIT};\n# paths are relative to this file's directory: run from "
                    f"there\n" + yaml.safe_dump(config, sort_keys=False))


def launch_command(out: Path, plan: TrainPlan) -> str:
    return (f"cd {out} && CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun --nproc_per_node={plan.gpus} "
            f"NANOTRON/run_train.py --config-file nanotron.yaml")


def convert_command(out: Path, plan: TrainPlan, tokenizer: str) -> str:
    """nanotron's converter at the pinned commit (examples/llama): the student is Qwen2-shaped, which it
    writes as a transformers LlamaForCausalLM; without --tokenizer_name it would ship Llama-2's."""
    tok = str(out / "tokenizer") if tokenizer == "tokenizer" else tokenizer
    return (f"cd NANOTRON && torchrun --nproc_per_node=1 examples/llama/convert_nanotron_to_hf.py "
            f"--checkpoint_path {out}/checkpoints/{plan.train_steps} --save_path {out}/hf "
            f"--config_cls Qwen2Config --tokenizer_name {tok}")


def run_name(ratio: float) -> str:
    return f"mix-{round(ratio * 100):d}-synthetic"
