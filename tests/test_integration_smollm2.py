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
    assert all(c > 100 for c in t.column("cached_tokens").to_pylist())  # the shared prefix was reused
