"""The hand-off's quality gate (engine/gate.py), in-process: `engine mix` and `engine export nanotron` leave out
blank "stop" rows (whitespace only, or empty) as "empty generation", failed rows, and rows cut at
max_new_tokens or in a loop unless keep_truncated; they count each reason in their reports and keep the
rows the model ended itself with text."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import sample_docs, write_jsonl

from engine.gate import EMPTY, FAILED, REPEATED, TRUNCATED
from engine.handoff.mix import MixSpec, run_mix
from engine.handoff.nanotron import TrainPlan
from engine.handoff.nanotron_export import NanotronExport, export_nanotron
from engine.handoff.rows import GENERATED, MIX_IN
from engine.handoff.sources import Sources
from engine.output.layout import result_schema
from engine.output.record import ProcessFigures, PromptFigures, Rates, ShardState, ShardTotals, write_state

BLANK = "  \n\t "
STOP_IDS = [f"ok-{i}" for i in range(6)]
# (id, finish_reason, generation)
ROWS = ([(i, "stop", d["text"]) for i, d in zip(STOP_IDS, sample_docs(6, start=100))]
        + [("blank", "stop", BLANK), ("empty", "stop", ""), ("failed", "error", None),
           ("cut", "length", "a document cut at max new tokens"), ("loop", "repetition", "a loop a loop a loop")])
GATED = {EMPTY: 2, FAILED: 1, TRUNCATED: 1, REPEATED: 1}
GATED_KEEPING_CUT = {EMPTY: 2, FAILED: 1}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A run's output directory, written as the engine writes it (the result schema), and mix-in documents."""
    root = tmp_path_factory.mktemp("gate")
    schema = result_schema(None)
    n = len(ROWS)
    cols = {f.name: pa.nulls(n, f.type) for f in schema}
    cols.update({"id": pa.array([r[0] for r in ROWS]), "prompt": pa.array(["faq"] * n),
                 "model": pa.array(["tiny"] * n), "finish_reason": pa.array([r[1] for r in ROWS]),
                 "generation": pa.array([r[2] for r in ROWS]), "text": pa.array(["source"] * n),
                 "completion_tokens": pa.array([len((r[2] or "").split()) for r in ROWS], pa.int32()),
                 "error": pa.array(["boom" if r[1] == "error" else None for r in ROWS])})
    (root / "out" / "faq").mkdir(parents=True)
    pq.write_table(pa.table(cols, schema=schema), root / "out" / "faq" / "part-s00000-of-00001-00000.parquet")
    # what makes it an engine output of a complete run (engine/output/readiness.py): a fingerprint, a complete state
    (root / "out" / "_run").mkdir()
    (root / "out" / "_run" / "fingerprint.json").write_text(json.dumps({"shard_count": 1}))
    write_state(root / "out", ShardState("s00000-of-00001", n, {"faq": PromptFigures(done=n)}, 0, True, ShardTotals(),
                                         ProcessFigures(), Rates()))
    docs = write_jsonl(root / "docs.jsonl", sample_docs(40))
    return root / "out", docs


def sources(run_dir, keep_truncated: bool = False) -> Sources:
    out, docs = run_dir
    return Sources(output_dir=out, mix_in=[str(docs)], keep_truncated=keep_truncated)


def test_mix_leaves_out_blank_failed_and_cut_rows_and_counts_them(tmp_path, tiny_model, run_dir):
    s = run_mix(MixSpec(sources(run_dir), tmp_path / "m", ratio=0.2, tokenizer=str(tiny_model)), say=lambda m: None)
    assert s["skipped"][GENERATED] == GATED  # the blank "stop" rows as "empty generation"
    assert s["available"][GENERATED]["rows"] == len(STOP_IDS)
    table = pq.read_table(tmp_path / "m")
    generated = [r for r in table.to_pylist() if r["source"] == GENERATED]
    assert {r["id"] for r in generated} == set(STOP_IDS)  # the scarcer side: every usable row, no other
    assert all(r["text"].strip() for r in generated)
    assert json.loads((tmp_path / "m" / "_mix.json").read_text())["skipped"][GENERATED] == GATED

    kept = run_mix(MixSpec(sources(run_dir, keep_truncated=True), tmp_path / "k", ratio=0.2,
                           tokenizer=str(tiny_model)), say=lambda m: None)
    assert kept["skipped"][GENERATED] == GATED_KEEPING_CUT  # blank rows stay out even so
    ids = {r["id"] for r in pq.read_table(tmp_path / "k").to_pylist() if r["source"] == GENERATED}
    assert ids == {*STOP_IDS, "cut", "loop"}


def test_mix_cli_prints_what_it_left_out(tmp_path, tiny_model, run_dir, capsys):
    from engine.cli.handoff import cmd_mix
    from engine.cli.parser import build_parser

    out, docs = run_dir
    args = build_parser().parse_args(["mix", str(out), "--mix-in", str(docs), "--tokenizer", str(tiny_model),
                                      "--out", str(tmp_path / "m"), "--ratio", "0.2"])
    assert cmd_mix(args) == 0
    printed = capsys.readouterr().out
    assert "left out   generated: 2 x empty generation" in printed
    assert "1 x truncated generation" in printed and "1 x stopped in a repetition loop" in printed


def _documents(folder: Path, tokenizer) -> list[str]:
    (ds,) = folder.glob("*.ds")
    tokens = np.fromfile(ds, dtype="<u2")
    ends = np.frombuffer(Path(f"{ds}.index").read_bytes(), dtype="<u8").astype(np.int64)
    return [tokenizer.decode(d[:-1]) for d in np.split(tokens, ends[:-1])]  # each without its separator


SMALL = TrainPlan(sequence_length=16, micro_batch_size=1, grad_accum=1, gpus=1, train_steps=1)


def test_export_nanotron_leaves_out_blank_failed_and_cut_rows_and_counts_them(tmp_path, tiny_model, run_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    r = export_nanotron(NanotronExport(sources(run_dir), tmp_path / "nt", ratio=0.5, tokenizer=str(tiny_model),
                                       plan=SMALL), say=lambda m: None)
    assert r.skipped[GENERATED] == GATED and r.skipped[MIX_IN] == {}
    generated = r.folders[0]
    assert generated.folder.name == GENERATED and generated.documents == len(STOP_IDS)
    texts = {row[2] for row in ROWS if row[0] in STOP_IDS}
    assert sorted(_documents(generated.folder, tok)) == sorted(texts)  # every document has text: none blank
    assert json.loads((tmp_path / "nt" / "_export.json").read_text())["skipped"][GENERATED] == GATED

    kept = export_nanotron(NanotronExport(sources(run_dir, keep_truncated=True), tmp_path / "nt", ratio=0.5,
                                          tokenizer=str(tiny_model), plan=SMALL, overwrite=True), say=lambda m: None)
    assert kept.skipped[GENERATED] == GATED_KEEPING_CUT
    assert kept.folders[0].documents == len(STOP_IDS) + 2  # the cut and the looping row, not the blank ones
    assert not any(not d.strip() for d in _documents(kept.folders[0].folder, tok))


def test_export_cli_prints_what_it_left_out(tmp_path, tiny_model, run_dir, capsys):
    from engine.cli.handoff import cmd_export
    from engine.cli.parser import build_parser

    out, docs = run_dir
    args = build_parser().parse_args(["export", "nanotron", str(out), "--mix-in", str(docs), "--tokenizer",
                                      str(tiny_model), "--out", str(tmp_path / "nt"), "--seq-len", "16",
                                      "--train-steps", "1", "--gpus", "1", "--micro-batch-size", "1",
                                      "--grad-accum", "1", "--keep-truncated"])
    assert cmd_export(args) == 0
    printed = capsys.readouterr().out
    assert "left out generated: 2 x empty generation" in printed and "1 x generation failed" in printed
    assert "truncated" not in printed and "repetition loop" not in printed  # kept with --keep-truncated
    assert f"{len(STOP_IDS) + 2:,} documents" in printed


def test_specs_refuse_a_ratio_outside_0_1(run_dir, tmp_path):
    from engine.errors import SourceError

    for ratio in (0.0, 1.0, 1.5):
        with pytest.raises(SourceError, match="between 0 and 1"):
            MixSpec(sources(run_dir), tmp_path / "m", ratio=ratio)
        with pytest.raises(SourceError, match="between 0 and 1"):
            NanotronExport(sources(run_dir), tmp_path / "nt", ratio=ratio)


def test_a_damaged_part_is_named_by_mix(tmp_path, tiny_model, run_dir):
    import shutil

    from engine.errors import SourceError

    out = tmp_path / "out"
    shutil.copytree(run_dir[0], out)
    part = next((out / "faq").glob("*.parquet"))
    pq.write_table(pq.read_table(part), part, compression="zstd")  # as the engine writes its parts
    meta = pq.ParquetFile(part).metadata.row_group(0)
    gen = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "generation")
    start = gen.dictionary_page_offset or gen.data_page_offset
    data = bytearray(part.read_bytes())
    middle = start + gen.total_compressed_size // 2  # inside the generation column's compressed values
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])  # flipped; the footer is intact
    part.write_bytes(bytes(data))
    spec = MixSpec(Sources(output_dir=out, mix_in=[str(run_dir[1])]), tmp_path / "m", ratio=0.2,
                   tokenizer=str(tiny_model))
    with pytest.raises(SourceError, match=part.name) as e:  # named, whichever reader meets the damage first
        run_mix(spec, say=lambda m: None)
    assert "damaged result part" in str(e.value), e.value  # met while reading its rows (the footer reads)
    assert not (tmp_path / "m").exists()  # nothing visible: the mix is written aside, then renamed
