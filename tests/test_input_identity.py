"""A run's identity includes its input, and its counters are the shard's, through the CLI on real files:
a changed or extended input is refused (status 2), --extend-input accepts new files without changing the
ids of the others, an output of the previous version is accepted once; the state file, summary, status and
card totals equal the sums read from the Parquet files after a no-op re-run and after Ctrl-C + resume;
duplicate ids are reported, not counted as rows; a refused export leaves nothing behind. The Ctrl-C'd run is a
process of its own (`Watched`); every other command runs in this process (`engine_main`)."""
from __future__ import annotations

import shutil
import signal

import orjson
import pyarrow.parquet as pq
from conftest import Watched, engine_main, sample_docs, stored_rows, wait_for, write_config, write_jsonl

TAG = "s00000-of-00001"


def noid_docs(n: int, start: int = 0) -> list[dict]:
    return [{"text": d["text"]} for d in sample_docs(n, start)]  # ids derived: <file>:<row>


def ids_of(out, prompt="faq") -> list[str]:
    return [i for f in sorted((out / prompt).glob("*.parquet")) for i in pq.read_table(f).column("id").to_pylist()]


def parquet_sums(out, prompt="faq") -> tuple[int, int]:
    """(rows, completion tokens) as the Parquet files hold them."""
    rows = tokens = 0
    for f in (out / prompt).glob("*.parquet"):
        t = pq.read_table(f, columns=["completion_tokens"])
        rows += t.num_rows
        tokens += sum(t.column(0).to_pylist())
    return rows, tokens


def state(out) -> dict:
    return orjson.loads((out / "_state" / f"{TAG}.json").read_bytes())


def test_a_changed_input_with_the_same_name_is_refused(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "corpus.jsonl", sample_docs(12))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [src], out, report={"enabled": False})
    engine_main("run", str(cfg), check=True)
    write_jsonl(src, sample_docs(12, start=500))  # another corpus under the same name
    again = engine_main("run", str(cfg))
    assert again.returncode == 2, again.stderr
    assert "holds results of another input" in again.stderr and "corpus.jsonl" in again.stderr
    assert "--overwrite" in again.stderr and "another output.dir" in again.stderr
    assert sorted(ids_of(out)) == sorted(d["id"] for d in sample_docs(12))  # nothing generated
    fresh = engine_main("run", str(cfg), "--overwrite", check=True)
    assert "complete" in fresh.stdout
    assert sorted(ids_of(out)) == sorted(d["id"] for d in sample_docs(12, start=500))


def test_files_joining_a_glob_are_refused_unless_extend_input_and_ids_do_not_change(tmp_path, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "noid.jsonl", noid_docs(17))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [data / "*.jsonl"], out, report={"enabled": False})
    engine_main("run", str(cfg), check=True)
    first = sorted(ids_of(out))
    assert first == sorted(f"noid.jsonl:{i}" for i in range(17))
    write_jsonl(data / "more.jsonl", noid_docs(9, start=100))
    refused = engine_main("run", str(cfg))
    assert refused.returncode == 2 and "joined the input" in refused.stderr and "more.jsonl" in refused.stderr
    assert "--extend-input" in refused.stderr
    assert sorted(ids_of(out)) == first
    extended = engine_main("run", str(cfg), "--extend-input", check=True)
    assert "resuming" in extended.stderr
    ids = ids_of(out)
    assert len(ids) == len(set(ids)) == 26  # the 17 stored rows kept, not generated again
    assert set(first) <= set(ids) and {f"more.jsonl:{i}" for i in range(9)} <= set(ids)
    # a file given by name keeps its label when another file joins as a second path
    (data / "more.jsonl").unlink()
    out2 = tmp_path / "out2"
    cfg2 = write_config(tmp_path / "run2.toml", tiny_model, [data / "noid.jsonl"], out2, report={"enabled": False})
    engine_main("run", str(cfg2), check=True)
    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "x.jsonl", noid_docs(3, start=300))
    engine_main("run", str(cfg2), "--extend-input", "--set",
               f"input.paths=['{data / 'noid.jsonl'}', '{other / 'x.jsonl'}']", check=True)
    assert sorted(ids_of(out2)) == sorted([f"noid.jsonl:{i}" for i in range(17)] + [f"x.jsonl:{i}" for i in range(3)])
    # two files that would get the same label are refused, naming both
    write_jsonl(other / "noid.jsonl", noid_docs(2))
    clash = engine_main("run", str(cfg2), "--set", f"input.paths=['{data / 'noid.jsonl'}', '{other / 'noid.jsonl'}']")
    assert clash.returncode == 1 and "same label 'noid.jsonl'" in clash.stderr


def test_a_removed_file_is_refused_and_an_old_fingerprint_is_accepted_once(tmp_path, tiny_model):
    a = write_jsonl(tmp_path / "a.jsonl", sample_docs(5))
    b = write_jsonl(tmp_path / "b.jsonl", sample_docs(5, start=5))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [a, b], out, report={"enabled": False})
    engine_main("run", str(cfg), check=True)
    gone = engine_main("run", str(cfg), "--set", f"input.paths=['{a}']")
    assert gone.returncode == 2 and "b.jsonl" in gone.stderr and "no longer in the input" in gone.stderr
    fp_path = out / "_run" / "fingerprint.json"
    fp = orjson.loads(fp_path.read_bytes())
    del fp["input"]["files"]  # as the previous version wrote it
    fp_path.write_bytes(orjson.dumps(fp))
    old = engine_main("run", str(cfg), check=True)
    assert "made by an earlier version" in old.stderr
    assert [f["label"] for f in orjson.loads(fp_path.read_bytes())["input"]["files"]] == ["a.jsonl", "b.jsonl"]
    quiet = engine_main("run", str(cfg), check=True)
    assert "earlier version" not in quiet.stderr and "generated  0 requests" in quiet.stdout


def test_counters_equal_the_parquet_after_a_no_op_rerun_and_after_ctrl_c_and_resume(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(400))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [src], out, report={"enabled": False},
                       instant={"delay_ms": 20, "completion_tokens": 8}, output={"flush_seconds": 0.2})
    w = Watched(cfg)
    wait_for(lambda: stored_rows(out) >= 40, "rows stored", 300, w.proc)
    w.proc.send_signal(signal.SIGINT)
    code, _, err = w.finish()
    assert code == 3, err
    interrupted = state(out)
    assert interrupted["exit_status"] == 3
    status = engine_main("status", str(out))
    assert "stopped (exit 3, interrupted)" in status.stdout, status.stdout
    engine_main("run", str(cfg), check=True)
    rows, tokens = parquet_sums(out)
    assert rows == 400
    for label in ("resumed", "no-op re-run"):
        st = state(out)
        assert st["output_tokens"] == st["totals"]["output_tokens"] == tokens, (label, st)
        assert st["totals"]["rows"] == rows and st["prompts"]["faq"]["output_tokens"] == tokens
        summary = orjson.loads((out / "summary.json").read_bytes())
        assert summary["shard_totals"]["output_tokens"] == tokens and summary["shard_totals"]["rows"] == rows
        assert f"{tokens:,}" in (out / "README.md").read_text()
        status = engine_main("status", str(out), "--check")
        assert status.returncode == 0 and f"{tokens:,}" in status.stdout
        if label == "resumed":
            assert st["totals"]["attempts"] == 2 and 0 < st["this_process"]["output_tokens"] < tokens
            wall = st["totals"]["wall_s"]
            noop = engine_main("run", str(cfg), check=True)
            assert f"output tokens {tokens:,}" in noop.stdout  # the printed shard line
        else:
            assert st["totals"]["attempts"] == 3 and st["this_process"]["output_tokens"] == 0
            assert st["totals"]["wall_s"] >= wall


def test_duplicate_ids_are_reported_by_status_card_and_mix(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(20))
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [src], out, report={"enabled": False})
    engine_main("run", str(cfg), check=True)
    (part,) = (out / "faq").glob("*.parquet")
    shutil.copy(part, part.with_name(part.name.replace("-00000.", "-00001.")))  # as two writers left it
    st = engine_main("status", str(out), "--check")
    assert st.returncode == 1 and "WARNING DUPLICATES" in st.stdout and "20 duplicate row(s)" in st.stdout
    again = engine_main("run", str(cfg), check=True)  # recovery counts them
    assert "DUPLICATES" in again.stderr and state(out)["prompts"]["faq"]["duplicates"] == 20
    assert "WARNING: faq stores 20 duplicate row(s)" in (out / "README.md").read_text()
    mix = engine_main("mix", str(out), "--mix-in", str(src), "--tokenizer", str(tiny_model), "--out",
                     str(tmp_path / "mix"), "--keep-truncated", "--allow-test-backend")
    assert mix.returncode == 0, mix.stderr
    assert "20 x DUPLICATE id" in mix.stdout
    table = pq.read_table(tmp_path / "mix")
    generated = [i for i, s in zip(table.column("id").to_pylist(), table.column("source").to_pylist())
                 if s == "generated"]
    assert len(generated) == len(set(generated))


def test_status_of_a_missing_directory_is_an_error(tmp_path):
    st = engine_main("status", str(tmp_path / "nope"))
    assert st.returncode == 2 and "no such directory" in st.stderr
