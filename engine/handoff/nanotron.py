"""`engine export nanotron`: token folders (one per source) + a nanotron training config.

Target: the verified pair **nanotron 1dfee7f5 + datatrove 2c895af7** (NANOTRON_COMMIT,
DATATROVE_COMMIT). Its tokenized-bytes loader (`src/nanotron/data/tokenized_bytes.py`) reads folders
of datatrove token files through `DatatroveFolderDataset` with keyword arguments (`folder_path`,
`eos_token_id`, ...) that only datatrove's branch `nouamane/avoid-s3` (2c895af7) has: not its PyPI
releases, not its main. nanotron's main (2411b022) asserts "Only S3 paths are supported" after the
first step on local folders; the PyPI nanotron 0.4 has no such loader. tests/test_handoff.py runs
that nanotron's own config loader, dataset builder and BlendableDataset (source vendored in
tests/vendor) on what this module writes. Both go in an environment of their own (nanotron pins
numpy < 2; lighteval numpy >= 2).

The export is self-contained and relocatable: every path in nanotron.yaml is relative to the export
directory (token folders, checkpoints, and the tokenizer when a copy is saved there), so training
runs from that directory, wherever it is copied to.

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

from engine.errors import CoverageError, SourceError
from engine.handoff.token_files import TokenFolder

NANOTRON_COMMIT = "1dfee7f5"  # github.com/huggingface/nanotron (full: 1dfee7f5, see README)
DATATROVE_COMMIT = "2c895af7"  # github.com/huggingface/datatrove, branch nouamane/avoid-s3
INSTALL = (f"pip install 'nanotron @ git+https://github.com/huggingface/nanotron@{NANOTRON_COMMIT}' "
           f"'datatrove[io] @ git+https://github.com/huggingface/datatrove@{DATATROVE_COMMIT}' (plus flash-attn; "
           f"clone nanotron at {NANOTRON_COMMIT} for run_train.py and examples/llama/convert_nanotron_to_hf.py)")


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
                    run_name: str, checkpoints: str, bos: int | None, eos: int | None, seed: int,
                    folder_names: list[str] | None = None, repeat: bool = False) -> dict:
    names = {f.tokenizer_name for f in folders}
    sizes = {f.token_size for f in folders}
    if len(names) != 1 or len(sizes) != 1:
        raise SourceError(f"the token folders disagree on the tokenizer: {names} / {sizes}")
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
                "dataset_folder": folder_names or [str(f.folder) for f in folders],
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


def export_nanotron(output_dir: Path, mix_in: list[str], tokenizer_name: str, out: Path, ratio: float, seed: int,
                    plan: TrainPlan, prompts: list[str] | None, text_column: str, say=print,
                    eos_token: str | None = None, keep_truncated: bool = False, allow_repeat: bool = False,
                    overwrite: bool = False) -> dict:
    """Tokenise both sources into OUT/generated and OUT/mix-in, write OUT/nanotron.yaml (and OUT/tokenizer),
    check coverage: a folder smaller than the plan is a CoverageError unless `allow_repeat`. A refused or
    failed export removes what it wrote (no config or record is left that looks usable)."""
    from engine.errors import SourceError

    if not 0 < ratio < 1:
        raise SourceError(f"--ratio {ratio}: the synthetic share must be between 0 and 1 (exclusive)")
    ours = ("generated", "mix-in", "tokenizer", "nanotron.yaml", "_export.json")
    if out.exists() and any(p.name not in ("checkpoints",) for p in out.iterdir()):
        if not overwrite:
            raise SourceError(f"{out} is not empty; choose another --out or pass --overwrite")
        import shutil
        for name in ours:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)  # only what an export writes
    created = not out.exists()
    try:
        return _export(output_dir, mix_in, tokenizer_name, out, ratio, seed, plan, prompts, text_column, say,
                       eos_token, keep_truncated, allow_repeat)
    except BaseException:  # a refusal (CoverageError), a bad source, Ctrl-C: remove what this export began
        import shutil
        for name in ours:
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _export(output_dir, mix_in, tokenizer_name, out, ratio, seed, plan, prompts, text_column, say, eos_token,
            keep_truncated, allow_repeat) -> dict:
    """export_nanotron's work; the token folders first, then the checks, then the config and record."""
    from tqdm import tqdm

    from engine.handoff.sources import (
        GENERATED,
        MIX_IN,
        Skipped,
        generated_prompts,
        generated_rows,
        mix_in_rows,
        save_training_tokenizer,
        training_tokenizer,
    )
    from engine.handoff.token_files import write_token_folder

    tt = training_tokenizer(tokenizer_name, eos_token)
    say(f"training tokenizer {tokenizer_name}" + (f" (saved to {out / 'tokenizer'}, recorded as 'tokenizer')" if tt.copy
                                                 else "") + f": {tt.note}")
    prompts = generated_prompts(output_dir, prompts)
    skipped = {GENERATED: Skipped(), MIX_IN: Skipped()}
    sources = {GENERATED: lambda: (r.text for r in generated_rows(output_dir, prompts, skipped[GENERATED],
                                                                  keep_truncated)),
               MIX_IN: lambda: (r.text for r in mix_in_rows(mix_in, text_column, skipped[MIX_IN]))}
    folders = []
    for i, (name, texts) in enumerate(sources.items()):
        with tqdm(desc=f"tokenising {name}", unit="doc", disable=None) as bar:
            folders.append(write_token_folder(texts(), tt.tokenizer, tt.recorded, out / name, seed + i,
                                              name=f"000_{name}", progress=bar.update))
        say(f"{name:>9}: {folders[-1].documents:,} documents, {folders[-1].tokens:,} tokens -> {out / name}")
    if tt.copy:
        save_training_tokenizer(tt, out / "tokenizer")
    weights = [ratio, round(1 - ratio, 6)]
    tok = tt.tokenizer
    config = training_config(folders, weights, len(tok), plan, run_name(ratio), "checkpoints",
                             tok.bos_token_id, tt.eos_id, seed, folder_names=[GENERATED, MIX_IN],
                             repeat=allow_repeat)
    config_path = out / "nanotron.yaml"
    cov = coverage(folders, weights, plan)
    result = {"folders": folders, "weights": weights, "coverage": cov, "config": config_path,
              "launch": launch_command(out, plan), "convert": convert_command(out, plan, tt.recorded),
              "install": INSTALL, "tokenizer": tt.recorded, "tokenizer_note": tt.note, "eos_id": tt.eos_id,
              "vocab_size": len(tok), "skipped": {k: v.counts for k, v in skipped.items()}, "prompts": prompts,
              "repeat": allow_repeat}
    _check_coverage(folders, cov, plan, allow_repeat, result)  # a refusal writes no config (the caller cleans up)
    write_config(config_path, config)
    import json
    (out / "_export.json").write_text(json.dumps({
        "nanotron": NANOTRON_COMMIT, "datatrove": DATATROVE_COMMIT, "output_dir": str(output_dir.resolve()),
        "mix_in": mix_in, "prompts": prompts, "ratio": ratio, "weights": weights, "seed": seed,
        "tokenizer": tt.recorded, "eos_id": tt.eos_id, "keep_truncated": keep_truncated, "allow_repeat": allow_repeat,
        "plan": vars(plan), "folders": {f.folder.name: {"documents": f.documents, "tokens": f.tokens} for f in folders},
        "skipped": result["skipped"]}, indent=2))
    return result


def _check_coverage(folders, cov, plan, allow_repeat: bool, result: dict) -> None:
    short = [c for c in cov if not c.ok]
    if short and not allow_repeat:
        most = min(c.max_steps for c in cov)
        fit = (f"they support at most {most:,} steps at this batch and mix (--train-steps {most})" if most
               else "they do not hold even one step's worth at this batch and mix")
        raise CoverageError(
            f"the token folders do not cover the plan: nanotron reads each folder in order and crashes "
            f"(IndexError) when one runs out, hours into training; {fit}. Generate or mix in more data, plan a "
            f"smaller run, or pass --allow-repeat (nanotron's older loader then repeats the folders silently, "
            f"without document masking)", result)
    empty = [f.folder.name for f, c in zip(folders, cov) if c.samples == 0]
    if empty:  # even the repeating loader divides by the folder's sample count (ZeroDivisionError)
        raise CoverageError(f"{', '.join(empty)}: fewer tokens than one training sample ({plan.sequence_length + 1:,} "
                            f"tokens); nanotron cannot read such a folder at all. Generate or mix in more data, or "
                            f"use a shorter --seq-len", result)
