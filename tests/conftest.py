"""Shared fixtures: a tiny random Llama with a tokenizer trained here, and input files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

REPO = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ("the cat sat on a mat while water flows down rivers to the sea and bread rises slowly in warm rooms "
         "questions answers table tutorial math problem steps document read rewrite numbers 1 2 3 4 5 6 7 8 9 0")


def make_tiny_model(dest: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([WORDS] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
                      tie_word_embeddings=True, initializer_range=0.3)  # varied, not one repeated token
    LlamaForCausalLM(cfg).save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def sample_docs(n: int, start: int = 0) -> list[dict]:
    base = WORDS.split()
    docs = []
    for i in range(start, start + n):
        words = [base[(i * 7 + j * 3) % len(base)] for j in range(20 + (i * 13) % 60)]
        docs.append({"id": f"doc-{i:05d}", "url": f"https://example.org/{i}", "text": " ".join(words) + "\nend."})
    return docs


def write_jsonl(path: Path, rows: list[dict], zst: bool = False) -> Path:
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if zst else data)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, (Path, str)):
        return json.dumps(str(v))
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def write_config(path: Path, model: str | Path, inputs: list[Path], out: Path, backend: str = "instant",
                 prompts=("faq",), **sections: dict) -> Path:
    """A run config; keyword arguments add or override keys by section, e.g. instant={"delay_ms": 2}."""
    data = {"input": {"paths": [str(p) for p in inputs]}, "output": {"dir": str(out)}, "model": {"name": str(model)},
            "sampling": {"max_new_tokens": 16, "temperature": 0.0}}
    for name, keys in sections.items():
        data.setdefault(name, {}).update(keys)
    lines = [f"backend = {_toml_value(backend)}", f"prompts = {_toml_value(list(prompts))}"]
    for name, keys in data.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def engine_cli(*args: str, timeout: float = 600, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `engine` command line in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"engine {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
