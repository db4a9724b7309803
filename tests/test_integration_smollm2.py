"""The real embedded model, SmolLM2-135M-Instruct, through the command line (slow)."""
import pyarrow.parquet as pq
import pytest
from conftest import REPO, engine_cli

pytestmark = pytest.mark.slow


def test_demo_config_generates_real_text(tmp_path):
    out = tmp_path / "demo"
    proc = engine_cli("run", str(REPO / "runs" / "demo.toml"), "--set", f"output.dir={out}",
                      "--set", "sampling.max_new_tokens=24", "--set", "prompts=['faq']", check=True)
    assert "complete:" in proc.stdout
    t = pq.read_table(out / "faq")
    assert t.num_rows == 20
    assert set(t.column("model").to_pylist()) == {"SmolLM2-135M-Instruct"}
    gens = t.column("generation").to_pylist()
    assert sum(len(g.split()) >= 3 for g in gens) >= 15  # real words, not empty strings
    assert all(0 < n <= 24 for n in t.column("completion_tokens").to_pylist())
    cached = sorted(t.column("cached_tokens").to_pylist())
    assert cached[0] == 0 and all(c > 100 for c in cached[1:])  # the shared prefix: computed once, then reused


def test_document_first_prefills_each_document_once(tmp_path):
    """render.layout = "document_first" on the real model and tokenizer: of a document's four prompts, one
    computes the document's prefix and three are served it from the torch backend's prefix cache (its own
    count, stored per row), so cached prompt tokens per document are >= 3 x the document's tokens; summary
    and status report prompt tokens cached and computed per prompt."""
    import json

    from transformers import AutoTokenizer

    from engine.model.locate import resolve_model

    out = tmp_path / "df"
    prompts = ["faq", "math", "table", "tutorial"]
    proc = engine_cli("run", str(REPO / "runs" / "demo.toml"), "--set", f"output.dir={out}",
                      "--set", "sampling.max_new_tokens=6", "--set", f"prompts={prompts}",
                      "--set", "render.layout=document_first", "--set", "report.enabled=false", check=True)
    assert "complete:" in proc.stdout
    tok = AutoTokenizer.from_pretrained(resolve_model("embedded")[0])
    docs = {json.loads(line)["id"]: json.loads(line)["text"]
            for line in (REPO / "runs" / "data" / "demo_docs.jsonl").read_text().splitlines() if line.strip()}
    rows = [r for p in prompts for r in pq.read_table(out / p).to_pylist()]
    assert len(rows) == 4 * len(docs)
    for doc_id, text in docs.items():
        mine = sorted(r["cached_tokens"] for r in rows if r["id"] == doc_id)
        doc_tokens = len(tok(text, add_special_tokens=False).input_ids)
        assert mine[0] == 0 and mine[1] == mine[3] > doc_tokens, (doc_id, mine, doc_tokens)  # header + document
        assert sum(mine) >= 3 * doc_tokens
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cached_tokens"] == sum(r["cached_tokens"] for r in rows)
    assert summary["computed_prompt_tokens"] == summary["input_tokens"] - summary["cached_tokens"]
    assert all(q["computed_prompt_tokens"] == q["prompt_tokens"] - q["cached_prompt_tokens"]
               for q in summary["per_prompt"].values())
    status = engine_cli("status", str(out), check=True)
    assert "prompt tokens (document_first; the backends' own cache counts)" in status.stdout
    card = (out / "README.md").read_text()
    assert "layout: `document_first`" in card and "cached" in card
