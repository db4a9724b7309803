"""Hand-off: `engine mix`, `engine export nanotron` (token files read back by datatrove's own code),
`engine export lighteval` + `engine compare` on results produced by running the real lighteval."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, engine_cli, make_tiny_model, sample_docs, write_config, write_jsonl

from engine.handoff.token_files import read_metadata, write_token_folder

EVAL_PYTHON = REPO / ".venv-eval" / "bin" / "python"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The tiny tokenizer made to add BOS by default (as Llama-style tokenizers do): token files must not."""
    import copy

    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                special_tokens=[("<|im_start|>", tokenizer.bos_token_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|im_start|>")
    assert tok("the cat")["input_ids"][0] == tok.bos_token_id
    return tok


class BigVocab:
    """The tiny tokenizer presented as one with more than 65,536 entries: token files switch to uint32."""

    def __init__(self, tok):
        self.tok, self.eos_token_id = tok, tok.eos_token_id

    def __len__(self):
        return 70_000

    def __call__(self, *a, **k):
        return self.tok(*a, **k)


@pytest.mark.parametrize("big", [False, True], ids=["uint16", "uint32"])
def test_token_files_are_read_back_exactly_by_datatrove(tmp_path, bos_tokenizer, big):
    from datatrove.pipeline.tokens.merger import load_doc_ends
    from datatrove.pipeline.tokens.tokenizer import TokenizedFile
    from datatrove.utils.dataset import DatatroveFolderDataset

    tokenizer = bos_tokenizer
    tok = BigVocab(tokenizer) if big else tokenizer
    texts = [d["text"] for d in sample_docs(40)]
    folder = write_token_folder(iter(texts), tok, "tiny-tokenizer", tmp_path / "generated", seed=3, name="000_gen",
                                batch_size=7)
    size = 4 if big else 2
    assert folder.token_size == size and folder.documents == 40
    ds = tmp_path / "generated" / "000_gen.ds"
    dtype = np.uint32 if big else np.uint16
    tokens = np.fromfile(ds, dtype=dtype)
    with open(str(ds) + ".index", "rb") as f:
        ends = load_doc_ends(f)  # datatrove's own reader of the index
    assert ends[-1] == len(tokens) == folder.tokens
    docs = np.split(tokens, ends[:-1])
    expected = {tuple(tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]) for t in texts}
    assert {tuple(d.tolist()) for d in docs} == expected  # every document once, EOS appended, no BOS
    assert not any(tokenizer.bos_token_id in d for d in docs)  # the tokenizer adds BOS by default; we must not
    firsts = [tokenizer.decode(d[:-1]) for d in docs]
    assert firsts != texts  # shuffled before writing (nanotron reads a folder in order)
    assert read_metadata(Path(str(ds) + ".metadata")) == ("tiny-tokenizer", size, len(tokens))

    # datatrove's loader (the one nanotron's tokenized-folder dataset subclasses) yields exactly our tokens
    seq_len = 31
    dataset = DatatroveFolderDataset(str(tmp_path / "generated"), seq_len=seq_len, token_size=size,
                                     return_positions=True)
    windows = [dataset[i] for i in range(len(dataset))]
    got = np.concatenate([w["input_ids"].numpy() for w in windows])
    assert len(dataset) == len(tokens) // (seq_len + 1)
    assert np.array_equal(got, tokens[:len(got)].astype(np.int64))
    first_doc_len = int(ends[0])
    assert windows[0]["positions"].tolist()[:min(first_doc_len, seq_len + 1)] == list(range(min(first_doc_len, seq_len + 1)))

    # and datatrove's own writer, given the same documents in the same order, writes the same bytes
    ref = TokenizedFile(str(tmp_path / "ref"), "000_gen.ds", tokenizer_name_or_path="tiny-tokenizer",
                        save_final_metadata=True, token_size=size)
    for d in docs:
        ref.write(d.tolist(), None)
    ref.close()
    for suffix in ("", ".index", ".metadata"):
        assert (tmp_path / "ref" / f"000_gen.ds{suffix}").read_bytes() == Path(f"{ds}{suffix}").read_bytes(), suffix


@pytest.fixture(scope="module")
def run_output(tmp_path_factory, tiny_model):
    """An `engine run` output with two prompts, a few failed rows, and the original documents."""
    root = tmp_path_factory.mktemp("run")
    docs = write_jsonl(root / "docs.jsonl", sample_docs(60))
    cfg = write_config(root / "run.toml", tiny_model, [docs], root / "out", backend="instant", prompts=("faq", "math"),
                       instant={"completion_tokens": 40, "fail_rate": 0.05},
                       retry={"max_attempts": 1, "max_error_fraction": 0.5},
                       sampling={"max_new_tokens": 64, "temperature": 0.0})
    engine_cli("run", str(cfg), check=True)
    failed = sum((pq.read_table(p, columns=["finish_reason"]).column(0).to_pylist().count("error"))
                  for p in (root / "out").glob("*/*.parquet"))
    assert failed > 0
    return root / "out", docs, failed


def test_mix_cli_hits_the_token_ratio_deterministically(tmp_path, tiny_model, run_output):
    out, docs, failed = run_output
    args = ["mix", str(out), "--mix-in", str(docs), "--tokenizer", str(tiny_model), "--preset", "math",
            "--shuffle-window", "16", "--part-rows", "50"]
    a = engine_cli(*args, "--out", str(tmp_path / "a"), check=True)
    assert "synthetic share" in a.stdout and f"{failed:,} x generation failed" in a.stdout
    table = pq.read_table(tmp_path / "a")
    assert table.schema.field("source").type == "string"
    assert set(table.column("source").to_pylist()) == {"generated", "mix-in"}
    summary = json.loads((tmp_path / "a" / "_mix.json").read_text())
    assert len(summary["parts"]) == -(-table.num_rows // 50)  # rolled every 50 rows
    tok = {s: sum(t for t, src in zip(table.column("tokens").to_pylist(), table.column("source").to_pylist())
                  if src == s) for s in ("generated", "mix-in")}
    share = tok["generated"] / (tok["generated"] + tok["mix-in"])
    assert abs(share - 0.8) < 0.03, share  # the math preset; whole documents, so not exact
    assert summary["ratio_achieved"] == pytest.approx(share, abs=1e-4)
    # generated rows carry their prompt; no failed or empty generation made it in
    gen = [r for r in table.to_pylist() if r["source"] == "generated"]
    assert {r["prompt"] for r in gen} <= {"faq", "math"} and all(r["text"].strip() for r in gen)
    # the same seed gives the same mix; another seed another one
    engine_cli(*args, "--out", str(tmp_path / "b"), check=True)
    assert pq.read_table(tmp_path / "b").to_pylist() == table.to_pylist()
    engine_cli(*args, "--out", str(tmp_path / "c"), "--seed", "1", check=True)
    assert pq.read_table(tmp_path / "c").column("id").to_pylist() != table.column("id").to_pylist()
    # an existing output is not overwritten silently; bad input is named
    again = engine_cli(*args, "--out", str(tmp_path / "a"))
    assert again.returncode == 1 and "--overwrite" in again.stderr
    (tmp_path / "a" / "notes.txt").write_text("mine")
    engine_cli(*args, "--out", str(tmp_path / "a"), "--seed", "1", "--overwrite", check=True)
    parts = sorted((tmp_path / "a").glob("part-*.parquet"))
    assert [r for f in parts for r in pq.read_table(f).to_pylist()] == pq.read_table(tmp_path / "c").to_pylist()
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"  # only the mix's own files are replaced
    bad = engine_cli("mix", str(out), "--mix-in", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "d"),
                     "--tokenizer", str(tiny_model))
    assert bad.returncode == 1 and "nope.jsonl" in bad.stderr


def test_export_nanotron_writes_folders_config_and_checks_coverage(tmp_path, tiny_model, run_output, tokenizer):
    out, docs, _ = run_output
    args = ["export", "nanotron", str(out), "--mix-in", str(docs), "--tokenizer", str(tiny_model),
            "--out", str(tmp_path / "nt"), "--preset", "faq"]
    big = engine_cli(*args)
    assert big.returncode == 0 and "TOO SMALL" in big.stdout and "do not cover the plan" in big.stderr
    assert engine_cli(*args, "--strict").returncode == 1
    small = ["--seq-len", "16", "--train-steps", "3", "--gpus", "1", "--micro-batch-size", "2", "--grad-accum", "1"]
    ok = engine_cli(*args, *small, "--strict")
    assert ok.returncode == 0, ok.stderr
    assert "torchrun --nproc_per_node=1 run_train.py --config-file" in ok.stdout
    cfg = yaml.safe_load((tmp_path / "nt" / "nanotron.yaml").read_text())
    ds = cfg["data_stages"][0]["data"]["dataset"]
    assert ds["dataset_folder"] == [str(tmp_path / "nt" / "generated"), str(tmp_path / "nt" / "mix-in")]
    assert ds["dataset_weights"] == [0.6, 0.4]
    for folder in ds["dataset_folder"]:
        (meta,) = Path(folder).glob("*.ds.metadata")
        name, size, count = read_metadata(meta)
        assert ds["tokenizer_name"] == name == str(tiny_model)  # nanotron compares these strings
        assert ds["token_size_in_bytes"] == size == 2 and count > 0
    assert ds["vocab_size"] == cfg["model"]["model_config"]["vocab_size"] == len(tokenizer)
    assert cfg["tokenizer"]["tokenizer_name_or_path"] == ds["tokenizer_name"]
    assert cfg["tokens"]["sequence_length"] == 16 and cfg["tokens"]["train_steps"] == 3
    assert cfg["model"]["model_config"]["max_position_embeddings"] == 16
    assert cfg["data_stages"][0]["start_training_step"] == 1
    # the mix-in folder holds every original document, the generated folder every usable row
    mix_meta = read_metadata(next((tmp_path / "nt" / "mix-in").glob("*.metadata")))
    texts = [json.loads(x)["text"] for x in docs.read_text().splitlines()]
    assert mix_meta[2] == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)


# ---- lighteval -------------------------------------------------------------------------------

TINY_TASK_DATA = {  # the hub datasets' own columns, two rows per task
    "arc_cf_easy": ("test", lambda i: {"question": f"which flows down rivers {i}?", "answerKey": "B",
                                       "choices": {"label": ["A", "B"], "text": ["bread", "water"]}}),
    "arc_cf_challenge": ("test", lambda i: {"question": f"what rises {i}?", "answerKey": "1",
                                            "choices": {"label": ["1", "2", "3"], "text": ["bread", "cat", "sea"]}}),
    "hellaswag_cf": ("validation", lambda i: {"activity_label": "cooking", "ctx_a": "the bread", "ctx_b": "rises",
                                              "endings": ["slowly in warm rooms", "the cat", "to the sea", "a mat"],
                                              "label": str(i % 4)}),
    "piqa_cf": ("validation", lambda i: {"goal": f"read a document {i}", "sol1": "rewrite it", "sol2": "the mat",
                                         "label": i % 2}),
    "siqa_cf": ("validation", lambda i: {"context": "the cat sat.", "question": "what next?", "answerA": "a mat",
                                         "answerB": "water", "answerC": "bread", "label": str(1 + i % 3)}),
    "openbookqa_cf": ("test", lambda i: {"question_stem": "water flows", "answerKey": "A",
                                         "choices": {"label": ["A", "B", "C", "D"],
                                                     "text": ["down rivers", "up", "the cat", "bread"]}}),
    "winogrande_cf": ("validation", lambda i: {"sentence": "the cat sat on _ while water flows.",
                                               "option1": "a mat", "option2": "the sea", "answer": str(1 + i % 2)}),
    "commonsenseqa_cf": ("validation", lambda i: {"question": "where does water flow?", "answerKey": "E",
                                                  "choices": {"label": list("ABCDE"),
                                                              "text": ["mat", "cat", "bread", "room", "sea"]}}),
    "mmlu_cf": ("test", lambda i: {"question": "1 2 3 4 5 6 7 8 9 ?", "subject": "elementary_mathematics",
                                   "choices": ["0", "1", "2", "3"], "answer": i % 4}),
}


def _tiny_model_for_eval_env(src: Path, dest: Path) -> Path:
    """The tiny model, readable by the eval environment's transformers 4.x (its tokenizer class name)."""
    import shutil
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.skipif(not EVAL_PYTHON.exists(), reason="no .venv-eval: run scripts/setup_eval.sh")
def test_lighteval_suite_runs_and_compare_reads_its_results(tmp_path, tiny_model):
    data = tmp_path / "data"
    for task, (split, row) in TINY_TASK_DATA.items():
        (data / task).mkdir(parents=True)
        (data / task / f"{split}.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in range(2)))
    exported = engine_cli("export", "lighteval", "--out", str(tmp_path / "suite"), "--checkpoint", "CKPT",
                          "--max-samples", "2", check=True)
    assert "lighteval accelerate" in exported.stdout
    tasks_txt = (tmp_path / "suite" / "tasks.txt").read_text().split()
    assert sorted(t.split("|")[0] for t in tasks_txt) == sorted(TINY_TASK_DATA)

    # the real lighteval loads the tasks file: every task is found and builds its documents
    probe = subprocess.run([str(EVAL_PYTHON), "-c", f"""
from lighteval.tasks.registry import Registry
r = Registry(tasks={str(tmp_path / 'suite' / 'tasks.txt')!r}, custom_tasks={str(tmp_path / 'suite' / 'early_signal_tasks.py')!r})
tasks = r.load_tasks()
for name, task in sorted(tasks.items()):
    docs = task.get_docs(2)
    assert all(len(d.choices) >= 2 and 0 <= d.gold_index < len(d.choices) for d in docs), name
    print(name, len(docs))
"""], capture_output=True, text=True, env={**os.environ, "EARLY_SIGNAL_DATA": str(data), "HF_HUB_OFFLINE": "1"},
        timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert len([ln for ln in probe.stdout.splitlines() if ln.endswith(" 2")]) == len(TINY_TASK_DATA)

    # two "checkpoints" evaluated by lighteval, then compared
    results = []
    for seed in (0, 1):
        model = _tiny_model_for_eval_env(make_tiny_model(tmp_path / f"raw{seed}", seed=seed), tmp_path / f"m{seed}")
        cmd = exported.stdout.split("\n")[3].strip().replace("CKPT", str(model))
        cmd = cmd.replace(str(tmp_path / "suite" / "results"), str(tmp_path / f"results{seed}"))
        cmd = cmd.replace(",dtype=bfloat16", "")  # float32 on this CPU
        run = subprocess.run(cmd.replace("lighteval ", f"{EVAL_PYTHON.parent / 'lighteval'} ", 1), shell=True,
                             capture_output=True, text=True, timeout=900,
                             env={**os.environ, "EARLY_SIGNAL_DATA": str(data), "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        results.append(tmp_path / f"results{seed}")
    cmp = engine_cli("compare", *map(str, results), check=True)
    (f0,) = results[0].rglob("results_*.json")
    raw = json.loads(f0.read_text())["results"]
    lines = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in cmp.stdout.splitlines()
             if ln.startswith("| ") and not ln.startswith("| task")}
    for task in TINY_TASK_DATA:
        assert lines[task][0] == f"{raw[f'{task}|0']['acc_norm'] * 100:.1f}"
    macro = np.mean([raw[f"{t}|0"]["acc_norm"] for t in TINY_TASK_DATA]) * 100
    assert lines[f"**macro average** ({len(TINY_TASK_DATA)} tasks)"][0] == f"{macro:.1f}"
    assert len(lines["piqa_cf"]) == 2  # one column per run


def test_compare_errors_name_the_file(tmp_path):
    bad = tmp_path / "results_x.json"
    bad.write_text("{not json")
    proc = engine_cli("compare", str(bad))
    assert proc.returncode == 1 and "results_x.json" in proc.stderr
    proc = engine_cli("compare", str(tmp_path / "missing"))
    assert proc.returncode == 1 and "missing" in proc.stderr
