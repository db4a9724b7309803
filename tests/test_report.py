"""The diversity report on constructed outputs with known answers, and through the CLI."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import engine_main

from engine.output.layout import result_schema
from engine.output.report import (
    Thresholds,
    build_report,
    distinct_ngram_ratio,
    first_sentence,
    repeated_line_rate,
    write_report,
)


def write_outputs(folder, gens, completion=None, reasons=None, model="m", name="part-s00000-of-00001-00000.parquet"):
    n = len(gens)
    folder.mkdir(parents=True, exist_ok=True)
    rows = {
        "id": [f"d{i}" for i in range(n)], "prompt": [folder.name] * n, "model": [model] * n, "generation": gens,
        "finish_reason": reasons or ["stop"] * n, "prompt_tokens": [100] * n,
        "completion_tokens": completion or [10] * n, "cached_tokens": [0] * n, "truncated": [False] * n,
        "error": [None] * n, "doc_ref": [f"f:{i}" for i in range(n)], "text": ["source"] * n,
    }
    pq.write_table(pa.Table.from_pydict(rows, schema=result_schema(None)), folder / name)


def varied(i: int) -> str:
    return f"Output number {i} talks about topic {i * 7919 % 1000}. Then it goes on differently {i}."


def test_115_of_1000_sharing_an_opening_is_11_5_percent_and_warns(tmp_path):
    same = "Here is a rewritten version of the document."
    gens = [f"{same} Then detail {i}." for i in range(115)] + [varied(i) for i in range(885)]
    write_outputs(tmp_path / "faq", gens)
    rep = build_report(tmp_path, sample=5000)
    (g,) = rep["groups"]
    assert g["rows"] == 1000 and g["sampled_outputs"] == 1000
    assert g["opening"]["top_first_sentence_share"] == pytest.approx(0.115)
    top = g["opening"]["most_common_first_sentences"][0]
    assert top == {"text": same, "count": 115}
    assert any("11.5%" in w for w in g["warnings"])
    # 10-character openings: "Here is a " once + "Output num" once: 2 distinct of 1000.
    assert g["opening"]["distinct_prefix_counts"]["10"] == 2
    assert g["opening"]["distinct_prefixes"]["20"] == pytest.approx(886 / 1000)  # above its threshold
    assert len(g["warnings"]) == 1


def test_no_warning_for_varied_outputs(tmp_path):
    write_outputs(tmp_path / "faq", [f"{i} " + varied(i) for i in range(200)])
    (g,) = build_report(tmp_path)["groups"]
    assert g["warnings"] == [] and g["opening"]["distinct_prefixes"]["50"] == 1.0


def test_ngram_line_and_length_statistics():
    assert distinct_ngram_ratio(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert distinct_ngram_ratio(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert distinct_ngram_ratio(["x"], 2) == 0.0
    assert repeated_line_rate(["one\ntwo\none\n\none", "three"]) == pytest.approx(2 / 5)
    assert first_sentence("  Hello there. And more.") == "Hello there."
    assert first_sentence("Title line\nbody") == "Title line"


def test_lengths_empty_and_limit_shares(tmp_path):
    gens = ["text a.", "", "   ", "text b.", None, "text c.", "text d.", "text e.", "text f.", "text g."]
    comp = [10, 0, 1, 20, 0, 30, 40, 50, 60, 100]
    reasons = ["stop", "stop", "stop", "length", "error", "stop", "stop", "stop", "stop", "length"]
    write_outputs(tmp_path / "math", gens, comp, reasons)
    (g,) = build_report(tmp_path)["groups"]
    assert g["share_empty"] == pytest.approx(0.2) and g["share_failed"] == pytest.approx(0.1)
    assert g["share_stopped_by_length"] == pytest.approx(0.2)
    assert g["length_tokens"]["p50"] == 20 and g["length_tokens"]["max"] == 100 and g["length_tokens"]["p5"] == 0
    assert g["output_input_token_ratio"] == pytest.approx(sum(comp) / 1000)


def test_groups_per_prompt_and_model_streamed_from_several_parts_with_a_sample(tmp_path):
    write_outputs(tmp_path / "faq", [varied(i) for i in range(50)], model="a", name="part-1.parquet")
    write_outputs(tmp_path / "faq", [varied(i) for i in range(50, 80)], model="b", name="part-2.parquet")
    write_outputs(tmp_path / "table", [varied(i) for i in range(10)], model="a")
    rep = build_report(tmp_path, sample=20)
    assert [(g["prompt"], g["model"], g["rows"], g["sampled_outputs"]) for g in rep["groups"]] == [
        ("faq", "a", 50, 20), ("faq", "b", 30, 20), ("table", "a", 10, 10)]


def test_report_files_and_cli(tmp_path):
    write_outputs(tmp_path / "faq", ["Same start. " + str(i) for i in range(30)] + [varied(i) for i in range(70)])
    write_report(tmp_path, thresholds=Thresholds(0.05, 0.5))
    folder = tmp_path / "report"
    assert json.loads((folder / "report.json").read_text())["groups"][0]["rows"] == 100
    for png in ("lengths-faq-m.png", "prefixes-faq-m.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = engine_main("report", str(tmp_path), "--top-opening-share", "0.5", check=True)
    assert "open with the same sentence" not in p.stdout
    p = engine_main("report", str(tmp_path), check=True)
    assert "30.0% of outputs open with the same sentence" in p.stdout
