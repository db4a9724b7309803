"""Hand-off: `engine mix`, `engine export nanotron` (token files read back by datatrove's own code),
`engine export lighteval` + `engine compare` on results produced by running the real lighteval."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, engine_cli, make_tiny_model, sample_docs, write_config, write_jsonl
from transformers import AutoTokenizer

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
    first = min(first_doc_len, seq_len + 1)
    assert windows[0]["positions"].tolist()[:first] == list(range(first))

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
            "--shuffle-window", "16", "--part-rows", "50", "--allow-test-backend"]
    a = engine_cli(*args, "--out", str(tmp_path / "a"), check=True)
    math_failed = sum(pq.read_table(p, columns=["finish_reason"]).column(0).to_pylist().count("error")
                      for p in (out / "math").glob("*.parquet"))
    assert "synthetic share" in a.stdout and f"{math_failed:,} x generation failed" in a.stdout
    assert "prompts    math" in a.stdout and "using the run's math rows only" in a.stderr
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
    assert {r["prompt"] for r in gen} == {"math"} and all(r["text"].strip() for r in gen)  # --preset math: math rows
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
                     "--tokenizer", str(tiny_model), "--allow-test-backend")
    assert bad.returncode == 1 and "nope.jsonl" in bad.stderr


SMALL_PLAN = ["--seq-len", "16", "--train-steps", "3", "--gpus", "1", "--micro-batch-size", "2", "--grad-accum", "1"]


def test_export_nanotron_writes_folders_config_and_refuses_a_plan_it_cannot_cover(tmp_path, tiny_model, run_output,
                                                                                  tokenizer):
    out, docs, _ = run_output
    args = ["export", "nanotron", str(out), "--mix-in", str(docs), "--tokenizer", str(tiny_model),
            "--out", str(tmp_path / "nt"), "--preset", "faq", "--allow-test-backend"]
    big = engine_cli(*args)  # the default ~21 B-token plan: nanotron would crash (IndexError) hours in
    assert big.returncode == 1 and "TOO SMALL" in big.stdout and "do not cover the plan" in big.stderr
    assert "--allow-repeat" in big.stderr
    assert not (tmp_path / "nt").exists()  # a refused export leaves nothing that looks usable
    first = engine_cli(*args, *SMALL_PLAN)
    assert first.returncode == 0, first.stderr
    again = engine_cli(*args, *SMALL_PLAN)
    assert again.returncode == 1 and "--overwrite" in again.stderr  # as `engine mix`: never silently replaced
    tiny = engine_cli(*args, "--allow-repeat", "--overwrite")  # not one 4,097-token sample: unreadable even so
    assert tiny.returncode == 1 and "fewer tokens than one training sample" in tiny.stderr
    assert not any((tmp_path / "nt" / n).exists() for n in ("nanotron.yaml", "_export.json", "generated", "mix-in"))
    rep = engine_cli(*args, "--allow-repeat", "--overwrite", *SMALL_PLAN[:2], "--train-steps", "1000")
    assert rep.returncode == 0 and "REPEATED" in rep.stdout and "document masking off" in rep.stderr
    cfg = yaml.safe_load((tmp_path / "nt" / "nanotron.yaml").read_text())
    assert cfg["data_stages"][0]["data"]["dataset"]["use_old_brrr_dataloader"] is True
    ok = engine_cli(*args, *SMALL_PLAN, "--overwrite")
    assert ok.returncode == 0, ok.stderr
    assert "torchrun --nproc_per_node=1 NANOTRON/run_train.py --config-file nanotron.yaml" in ok.stdout
    assert "--config_cls Qwen2Config --tokenizer_name " + str(tmp_path / "nt" / "tokenizer") in ok.stdout
    assert "nanotron@1dfee7f5" in ok.stdout and "datatrove@2c895af7" in ok.stdout
    cfg = yaml.safe_load((tmp_path / "nt" / "nanotron.yaml").read_text())
    ds = cfg["data_stages"][0]["data"]["dataset"]
    # relative to the export: it can be copied to a cluster as is
    assert ds["dataset_folder"] == ["generated", "mix-in"] and cfg["checkpoints"]["checkpoints_path"] == "checkpoints"
    assert ds["dataset_weights"] == [0.6, 0.4] and ds["use_old_brrr_dataloader"] is False
    for folder in ds["dataset_folder"]:
        (meta,) = (tmp_path / "nt" / folder).glob("*.ds.metadata")
        name, size, count = read_metadata(meta)
        assert ds["tokenizer_name"] == name == "tokenizer"  # nanotron compares these strings
        assert ds["token_size_in_bytes"] == size == 2 and count > 0
    assert ds["vocab_size"] == cfg["model"]["model_config"]["vocab_size"] == len(tokenizer)
    assert cfg["tokenizer"]["tokenizer_name_or_path"] == ds["tokenizer_name"]
    assert cfg["tokens"]["sequence_length"] == 16 and cfg["tokens"]["train_steps"] == 3
    assert cfg["model"]["model_config"]["max_position_embeddings"] == 16
    assert cfg["optimizer"]["learning_rate_scheduler"]["min_decay_lr"] == 3e-05
    assert cfg["general"]["run"] == "mix-60-synthetic"
    # documents end with the pretraining end-of-text token, not the chat turn end (<|im_end|>)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert cfg["model"]["model_config"]["eos_token_id"] == endoftext != tokenizer.eos_token_id
    saved = AutoTokenizer.from_pretrained(tmp_path / "nt" / "tokenizer")
    assert saved.eos_token_id == endoftext and not getattr(saved, "chat_template", None)
    mix_dir = tmp_path / "nt" / "mix-in"
    (ds_file,) = mix_dir.glob("*.ds")
    (index,) = mix_dir.glob("*.ds.index")
    ids = np.frombuffer(ds_file.read_bytes(), dtype="<u2")
    ends = np.frombuffer(index.read_bytes(), dtype="<u8")
    assert (ids[ends.astype(np.int64) - 1] == endoftext).all() and (ids == endoftext).sum() == len(ends)
    # the mix-in folder holds every original document, the generated folder every usable faq row
    texts = [json.loads(x)["text"] for x in docs.read_text().splitlines()]
    assert read_metadata(next(mix_dir.glob("*.metadata")))[2] == \
        sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)


VENDOR = REPO / "tests" / "vendor"


@pytest.fixture(scope="module")
def nanotron_src(tmp_path_factory):
    """nanotron at the pinned commit, from the vendored `git archive` (tests/vendor/README.md)."""
    import tarfile

    from engine.handoff.nanotron import NANOTRON_COMMIT
    archive = VENDOR / f"nanotron-{NANOTRON_COMMIT}.tar.gz"
    if not archive.exists():
        pytest.skip(f"nanotron {NANOTRON_COMMIT}'s source is not in {VENDOR} (see its README.md)")
    dest = tmp_path_factory.mktemp("nanotron")
    with tarfile.open(archive) as t:
        t.extractall(dest, filter="data")
    return dest / f"nanotron-{NANOTRON_COMMIT}" / "src"


def nanotron_check(export: Path, nanotron_src: Path, *flags: str) -> dict:
    from engine.handoff.nanotron import DATATROVE_COMMIT
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # make: pybind11
    p = subprocess.run([sys.executable, str(REPO / "tests" / "nanotron_check.py"), str(nanotron_src),
                        str(VENDOR / f"datatrove-{DATATROVE_COMMIT}" / "dataset.py"), *flags], cwd=export, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("NANOTRON_CHECK ")]
    return json.loads(line.split(" ", 1)[1])


def test_the_pinned_nanotron_loads_the_export_and_trains_on_its_folders(tmp_path, tiny_model, run_output,
                                                                         nanotron_src):
    """nanotron 1dfee7f5's own config loader, dataset builder (the keyword call to datatrove 2c895af7's
    DatatroveFolderDataset) and BlendableDataset, run from a copy of the export in another place."""
    import shutil

    out, docs, _ = run_output
    engine_cli("export", "nanotron", str(out), "--mix-in", str(docs), "--tokenizer", str(tiny_model),
               "--out", str(tmp_path / "nt"), "--preset", "faq", *SMALL_PLAN, "--allow-test-backend", check=True)
    moved = Path(shutil.move(tmp_path / "nt", tmp_path / "cluster" / "nt"))  # relocatable
    got = nanotron_check(moved, nanotron_src, "--past-end")
    assert got["config"] == ["Config", "Qwen2Config", "NanosetDatasetsArgs"]
    assert got["tokenizer"]["name"] == "tokenizer" and got["tokenizer"]["eos_id"] == 0  # <|endoftext|>
    assert set(got["folders"]) == {"generated", "mix-in"} and all(n > 0 for n in got["folders"].values())
    assert got["samples_read"] == 3 * 2 and sum(got["drawn"]) == 6  # every sample of the plan read
    assert got["bad_positions"] == 0  # positions restart after every separator (document masking)
    assert set(got["consumption"]) == {"generated", "mix-in"}  # nanotron main asserts "Only S3 paths" here
    assert got["past_end"].startswith("IndexError")  # why a plan larger than a folder is refused
    engine_cli("export", "nanotron", str(out), "--mix-in", str(docs), "--tokenizer", str(tiny_model),
               "--out", str(tmp_path / "rep"), "--preset", "faq", "--allow-repeat", *SMALL_PLAN[:-2], "--grad-accum",
               "400", "--allow-test-backend", check=True)  # 3 steps x 800 sequences of 17 tokens: more than they hold
    rep = nanotron_check(tmp_path / "rep", nanotron_src, "--wrap")
    assert rep["old_loader"]["wraps"] and rep["samples_read"] == 3 * 800  # the full plan, repeating


def test_quality_gate_leaves_out_truncated_generations_unless_kept(tmp_path, tiny_model):
    docs = write_jsonl(tmp_path / "docs.jsonl", sample_docs(20))
    cfg = write_config(tmp_path / "run.toml", tiny_model, [docs], tmp_path / "out", backend="instant",
                       instant={"completion_tokens": 64}, sampling={"max_new_tokens": 64, "temperature": 0.0})
    engine_cli("run", str(cfg), check=True)  # every row hits max_new_tokens: finish_reason length
    base = ["--mix-in", str(docs), "--tokenizer", str(tiny_model), "--allow-test-backend"]
    refused = engine_cli("mix", str(tmp_path / "out"), *base[:-1], "--out", str(tmp_path / "m"))
    assert refused.returncode == 1 and "made by the `instant` backend" in refused.stderr  # test filler: refused
    assert not (tmp_path / "m").exists()
    gated = engine_cli("mix", str(tmp_path / "out"), *base, "--out", str(tmp_path / "m"))
    assert gated.returncode == 1 and "no usable generated rows" in gated.stderr
    kept = engine_cli("mix", str(tmp_path / "out"), *base, "--out", str(tmp_path / "m"), "--keep-truncated",
                      check=True)
    assert "synthetic share" in kept.stdout
    ex = engine_cli("export", "nanotron", str(tmp_path / "out"), *base, "--out", str(tmp_path / "nt"), *SMALL_PLAN)
    assert ex.returncode == 1 and "no documents" in ex.stderr
    ex = engine_cli("export", "nanotron", str(tmp_path / "out"), *base, "--out", str(tmp_path / "nt2"), *SMALL_PLAN,
                    "--keep-truncated", check=True)
    assert "left out" not in ex.stdout
    # counted by reason when some rows are usable
    mixed = write_config(tmp_path / "run2.toml", tiny_model, [docs], tmp_path / "out2", backend="instant",
                         instant={"completion_tokens": 40}, sampling={"max_new_tokens": 64, "temperature": 0.0})
    engine_cli("run", str(mixed), check=True)
    import shutil
    shutil.copytree(tmp_path / "out" / "faq", tmp_path / "out2" / "table")  # a prompt whose rows all truncated
    m = engine_cli("mix", str(tmp_path / "out2"), *base, "--out", str(tmp_path / "m2"), check=True)
    assert "generated: 20 x truncated generation (finish_reason=length" in m.stdout


@pytest.mark.skipif(not EVAL_PYTHON.exists(), reason="no .venv-eval: run scripts/setup_eval.sh")
def test_the_exported_tokenizer_loads_in_transformers_4(tmp_path, tiny_model, run_output, tokenizer):
    out, docs, _ = run_output
    engine_cli("export", "nanotron", str(out), "--mix-in", str(docs), "--out", str(tmp_path / "nt"), *SMALL_PLAN,
               "--allow-test-backend", check=True)  # the default tokenizer: the embedded SmolLM2's, as a base tokenizer
    text = "Rewrite the document as a FAQ."
    p = subprocess.run([str(EVAL_PYTHON), "-c", f"""
import json, transformers
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained({str(tmp_path / 'nt' / 'tokenizer')!r})
print(json.dumps([transformers.__version__, t.eos_token, t.eos_token_id, len(t), t({text!r})["input_ids"]]))
"""], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    version, eos, eos_id, n, ids = json.loads(p.stdout.strip().splitlines()[-1])
    assert version.startswith("4.") and eos == "<|endoftext|>" and eos_id == 0 and n == 49152
    ours = AutoTokenizer.from_pretrained(tmp_path / "nt" / "tokenizer")
    assert ours(text)["input_ids"] == ids  # the same ids under transformers 5 (ours) and 4


# ---- lighteval -------------------------------------------------------------------------------

TINY_TASK_DATA = {  # the hub datasets' own columns, two rows per task
    "arc_cf_easy": ("test", lambda i: {"question": f"which flows down rivers {i}?", "answerKey": "B",
                                       "choices": {"label": ["A", "B"], "text": ["bread", "water"]}}),
    "arc_cf_challenge": ("test", lambda i: {"question": f"what rises {i}?", "answerKey": "1",
                                            "choices": {"label": ["1", "2", "3"], "text": ["bread", "cat", "sea"]}}),
    "hellaswag_cf": ("validation", lambda i: {"activity_label": "cooking", "ctx_a": "[header] the bread [title] bakes",
                                              "ctx_b": "rises",
                                              "endings": ["slowly [step] in warm rooms", "the cat", "to the sea",
                                                          "a mat"],
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
    "mmlu_sample_cf": ("test", lambda i: {"question": "1 2 3 4 5 6 7 8 9 ?", "subject": "elementary_mathematics",
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
r = Registry(tasks={str(tmp_path / 'suite' / 'tasks.txt')!r},
             custom_tasks={str(tmp_path / 'suite' / 'early_signal_tasks.py')!r})
tasks = r.load_tasks()
for name, task in sorted(tasks.items()):
    docs = task.get_docs(2)
    golds = lambda d: d.gold_index if isinstance(d.gold_index, list) else [d.gold_index]
    assert all(len(d.choices) >= 2 and all(0 <= g < len(d.choices) for g in golds(d)) for d in docs), name
    if "hellaswag" in name:  # lm-eval-harness's WikiHow clean-up, as lighteval's own cloze HellaSwag
        assert not any("[" in d.query or any("[" in c for c in d.choices) for d in docs), docs[0]
    print(name, len(docs))
"""], capture_output=True, text=True, env={**os.environ, "EARLY_SIGNAL_DATA": str(data), "HF_HUB_OFFLINE": "1"},
        timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert len([ln for ln in probe.stdout.splitlines() if ln.endswith(" 2")]) == len(TINY_TASK_DATA)

    # two "checkpoints" evaluated by lighteval, then compared
    results = []
    for seed in (0, 1):
        model = _tiny_model_for_eval_env(make_tiny_model(tmp_path / f"raw{seed}", seed=seed), tmp_path / f"m{seed}")
        printed = next(ln.strip() for ln in exported.stdout.splitlines()
                       if ln.strip().startswith("lighteval accelerate"))
        cmd = printed.replace("CKPT", str(model))
        cmd = cmd.replace(str(tmp_path / "suite" / "results"), str(tmp_path / f"results{seed}"))
        cmd = cmd.replace(",dtype=bfloat16", "")  # float32 on this CPU
        run = subprocess.run(cmd.replace("lighteval ", f"{EVAL_PYTHON.parent / 'lighteval'} ", 1), shell=True,
                             capture_output=True, text=True, timeout=900,
                             env={**os.environ, "EARLY_SIGNAL_DATA": str(data), "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        results.append(tmp_path / f"results{seed}")
    cmp = engine_cli("compare", *map(str, results), "--baseline", "results0", check=True)
    (f0,) = results[0].rglob("results_*.json")
    raw = json.loads(f0.read_text())["results"]
    head, *body = [ln for ln in cmp.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("|---")]
    assert [c.strip() for c in head.split("|")[1:-1]] == ["task", "results0", "results1", "Δ results1 vs results0"]
    lines = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in body}
    for task in TINY_TASK_DATA:
        r = raw[f"{task}|0"]
        assert lines[task][0] == f"{r['acc_norm'] * 100:.1f} ±{r['acc_norm_stderr'] * 100:.1f}"
    macro = np.mean([raw[f"{t}|0"]["acc_norm"] for t in TINY_TASK_DATA]) * 100
    assert lines[f"**macro average** ({len(TINY_TASK_DATA)} tasks)"][0].split(" ±")[0] == f"{macro:.1f}"
    assert f"**macro, chance-normalised** ({len(TINY_TASK_DATA)} tasks)" in lines
    (f1,) = results[1].rglob("results_*.json")
    raw1 = json.loads(f1.read_text())["results"]
    d = (raw1["piqa_cf|0"]["acc_norm"] - raw["piqa_cf|0"]["acc_norm"]) * 100
    assert lines["piqa_cf"][2].rstrip("*") == f"{d:+.1f}"  # the delta column
    # runs evaluated differently are refused (here: another max_samples), or shown with a warning
    other = tmp_path / "other" / "m" / f1.name
    other.parent.mkdir(parents=True)
    changed = json.loads(f1.read_text())
    changed["config_general"]["max_samples"] = 1000
    other.write_text(json.dumps(changed))
    refused = engine_cli("compare", str(results[0]), str(tmp_path / "other"))
    assert refused.returncode == 1 and "max_samples" in refused.stderr
    shown = engine_cli("compare", str(results[0]), str(tmp_path / "other"), "--allow-different-settings",
                       "--label", "faq", "--label", "web", check=True)
    assert "WARNING" in shown.stderr and "| task | faq | web |" in shown.stdout


@pytest.mark.skipif(not EVAL_PYTHON.exists(), reason="no .venv-eval: run scripts/setup_eval.sh")
def test_hub_sources_need_no_loading_script():
    """datasets >= 4 (lighteval 0.13's) refuses script datasets and lighteval then aborts every task: PIQA
    and SIQA are read from the hub's Parquet conversion."""
    cfg = suite_config()
    assert cfg["piqa_cf"][:3] == ["ybisk/piqa", "default", "refs/convert/parquet"]
    assert cfg["siqa_cf"][:3] == ["allenai/social_i_qa", "default", "refs/convert/parquet"]
    assert "mmlu_cf" not in cfg and cfg["mmlu_sample_cf"][:2] == ["cais/mmlu", "all"]  # renamed: not MMLU's average


@pytest.mark.skipif(not EVAL_PYTHON.exists(), reason="no .venv-eval: run scripts/setup_eval.sh")
def test_every_hub_dataset_of_the_suite_resolves_online():
    """Where the Hugging Face Hub is reachable (never in CI): each task's dataset builder, as lighteval loads it."""
    import httpx
    try:
        httpx.head("https://huggingface.co", timeout=5)
    except httpx.HTTPError:
        pytest.skip("the Hugging Face Hub is not reachable here (CI): checked by configuration only")
    online = subprocess.run([str(EVAL_PYTHON), "-c", f"""
import datasets
for name, (repo, subset, rev, splits) in {suite_config()!r}.items():
    b = datasets.load_dataset_builder(repo, subset, revision=rev)
    assert set(splits) <= set(b.info.splits or splits), (name, b.info.splits)
    print("ok", name)
"""], capture_output=True, text=True, timeout=600)
    assert online.returncode == 0, online.stderr[-3000:]


def suite_config() -> dict:
    p = subprocess.run([str(EVAL_PYTHON), "-c", f"""
import importlib.util, json
spec = importlib.util.spec_from_file_location("t", {str(REPO / 'engine' / 'handoff' / 'early_signal_tasks.py')!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
print(json.dumps({{c.name: [c.hf_repo, c.hf_subset, c.hf_revision, c.evaluation_splits] for c in m.TASKS_TABLE}}))
"""], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "EARLY_SIGNAL_DATA"})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_compare_errors_name_the_file(tmp_path):
    bad = tmp_path / "results_x.json"
    bad.write_text("{not json")
    proc = engine_cli("compare", str(bad))
    assert proc.returncode == 1 and "results_x.json" in proc.stderr
    proc = engine_cli("compare", str(tmp_path / "missing"))
    assert proc.returncode == 1 and "missing" in proc.stderr
