"""`engine run` end to end through the command line, on real files, with the instant backend and the tiny
torch model: the first test as a user runs it (a process of its own), the others in this process
(`engine_main`: the same parser, commands and error handler)."""
import json

import pyarrow.parquet as pq
import pytest
from conftest import engine_cli, engine_main, sample_docs, write_config, write_jsonl, write_parquet


def read_prompt(out, prompt):
    return pq.read_table(out / prompt)


def test_instant_run_writes_one_row_per_document_and_prompt(tmp_path, tiny_model):
    a = write_jsonl(tmp_path / "a.jsonl.zst", sample_docs(30), zst=True)
    b = write_parquet(tmp_path / "b.parquet", sample_docs(20, start=30))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [a, b], out, prompts=("faq", "table"),
                       instant={"completion_tokens": 12})
    proc = engine_cli("run", str(cfg), check=True)
    assert "complete:" in proc.stdout and "output" in proc.stdout
    for prompt in ("faq", "table"):
        t = read_prompt(out, prompt)
        assert t.num_rows == 50
        assert sorted(t.column("id").to_pylist()) == [f"doc-{i:05d}" for i in range(50)]
        for col in ("id", "prompt", "model", "generation", "finish_reason", "prompt_tokens",
                    "completion_tokens", "text", "url"):
            assert col in t.column_names
        assert set(t.column("prompt").to_pylist()) == {prompt}
        assert all(n == 12 for n in t.column("completion_tokens").to_pylist())
        assert all(g for g in t.column("generation").to_pylist())
        meta = pq.ParquetFile(next((out / prompt).glob("*.parquet"))).metadata
        assert meta.row_group(0).column(0).compression == "ZSTD"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["requests_generated"] == 100
    # Running again finds everything done and generates nothing.
    again = engine_main("run", str(cfg), check=True)
    assert "generated  0 requests" in again.stdout


def test_output_loads_with_datasets(tmp_path, tiny_model):
    datasets = pytest.importorskip("datasets")
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(8))
    out = tmp_path / "out"
    engine_main("run", str(write_config(tmp_path / "r.toml", tiny_model, [src], out)), check=True)
    ds = datasets.load_dataset("parquet", data_files=str(out / "faq" / "*.parquet"), split="train")
    assert len(ds) == 8 and "generation" in ds.column_names


def test_torch_backend_run_with_tiny_model(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(6))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], out, backend="torch", prompts=("faq", "math"),
                       torch={"batch_size": 4})
    engine_main("run", str(cfg), "--set", "sampling.max_new_tokens=5", check=True)
    for prompt in ("faq", "math"):
        t = read_prompt(out, prompt)
        assert t.num_rows == 6
        assert all(0 < n <= 5 for n in t.column("completion_tokens").to_pylist())
        cached = sorted(t.column("cached_tokens").to_pylist())  # the prompt's prefix: computed once, then reused
        assert cached[0] == 0 and all(c > 0 for c in cached[1:])


def test_cli_errors_name_the_problem(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(2))
    cfg = write_config(tmp_path / "r.toml", tiny_model, [src], tmp_path / "out")
    p = engine_main("run", str(cfg), "--set", "sampling.temprature=1")
    assert p.returncode == 2 and "sampling.temprature" in p.stderr
    p = engine_main("run", str(cfg), "--set", f"input.paths=['{tmp_path}/nothing-*.jsonl']")
    assert p.returncode == 1 and "matches no file" in p.stderr
    p = engine_main("run", str(cfg), "--set", "prompts=['nope']")
    assert p.returncode == 2 and "unknown prompt 'nope'" in p.stderr


def test_prompts_command(tmp_path, tiny_model):
    p = engine_main("prompts", "list", check=True)
    for name in ("faq", "math", "table", "tutorial"):
        assert name in p.stdout
    doc = tmp_path / "doc.txt"
    doc.write_text("the cat sat on a mat")
    p = engine_main("prompts", "render", "faq", str(doc), "--model", str(tiny_model), check=True)
    assert "the cat sat on a mat" in p.stdout and "prompt tokens" in p.stderr
