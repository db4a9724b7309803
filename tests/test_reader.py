import pyarrow as pa
import pytest
from conftest import sample_docs, write_jsonl, write_parquet

from engine.errors import InputError
from engine.input.reader import Reader


def read_all(paths, **kw):
    r = Reader([str(p) for p in paths], "text", "id", kw.pop("batch_rows", 7), kw.pop("max_doc_chars", 10_000), **kw)
    r.preflight()
    docs, rejected = [], []
    for b in r.batches():
        docs += b.docs
        rejected += b.rejected
    return r, docs, rejected


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst", "parquet"])
def test_formats_stream_every_row(tmp_path, fmt):
    rows = sample_docs(25)
    path = tmp_path / f"in.{fmt}"
    write_parquet(path, rows) if fmt == "parquet" else write_jsonl(path, rows, zst=fmt.endswith("zst"))
    r, docs, rejected = read_all([path])
    assert r.total_rows == 25 and not rejected
    assert [d.id for d in docs] == [x["id"] for x in rows]
    assert docs[3].text == rows[3]["text"] and docs[3].columns == {"url": rows[3]["url"]}


def test_ids_are_derived_from_file_and_row_without_an_id_column(tmp_path):
    rows = [{"text": f"document {i}"} for i in range(3)]
    _, docs, _ = read_all([write_parquet(tmp_path / "noid.parquet", rows)])
    assert [d.id for d in docs] == ["noid.parquet:0", "noid.parquet:1", "noid.parquet:2"]


@pytest.mark.parametrize("n_files,count", [(1, 3), (4, 2), (5, 3)])
def test_shards_are_disjoint_and_cover_everything(tmp_path, n_files, count):
    paths = [write_jsonl(tmp_path / f"f{i}.jsonl", sample_docs(10, start=10 * i)) for i in range(n_files)]
    seen = []
    for i in range(count):
        r, docs, _ = read_all(paths, shard_index=i, shard_count=count)
        assert r.total_rows == len(docs)
        seen += [d.id for d in docs]
    assert sorted(seen) == sorted(f"doc-{i:05d}" for i in range(10 * n_files))


def test_bad_rows_are_skipped_and_recorded(tmp_path):
    path = tmp_path / "messy.jsonl"
    lines = [
        b'{"id": "a", "text": "good one"}',
        b'{"id": "b", "text": null}',
        b'{"id": "c", "text": "   \\n  "}',
        b'{"id": "d", "text": 42}',
        b'{"id": "e", "text": "broken',
        b'{"id": "f", "text": "bad \xff\xfe utf8"}',
        b'[1, 2, 3]',
        b'{"id": "g", "text": "' + b"x" * 200 + b'"}',
        b'{"id": "h", "text": "control \\u0001 chars and emoji \xf0\x9f\x98\x80 and rtl '
        b'\xd7\xa9\xd7\x9c\xd7\x95\xd7\x9d"}',
        b'{"text": "no id here"}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    _, docs, rejected = read_all([path], max_doc_chars=100)
    assert [d.id for d in docs] == ["a", "h", "messy.jsonl:9"]
    assert "\u0001" in docs[1].text and "\U0001F600" in docs[1].text
    reasons = {r.source: r.reason for r in rejected}
    assert "null" in reasons["messy.jsonl:1"]
    assert "whitespace" in reasons["messy.jsonl:2"]
    assert "not a string" in reasons["messy.jsonl:3"]
    assert "not valid JSON" in reasons["messy.jsonl:4"] and "line 5" in reasons["messy.jsonl:4"]
    assert "not valid JSON" in reasons["messy.jsonl:5"]
    assert "not an object" in reasons["messy.jsonl:6"]
    assert "max_doc_chars" in reasons["messy.jsonl:7"]
    assert len(docs) + len(rejected) == len(lines)


def test_fail_fast_cases_name_the_file(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", sample_docs(3))
    trunc = tmp_path / "trunc.parquet"
    write_parquet(trunc, sample_docs(50))
    trunc.write_bytes(trunc.read_bytes()[:-100])
    with pytest.raises(InputError, match="trunc.parquet: not a readable Parquet"):
        read_all([good, trunc])
    fake = tmp_path / "fake.parquet"
    fake.write_text("hello, not parquet")
    with pytest.raises(InputError, match="fake.parquet"):
        read_all([fake])
    notext = write_parquet(tmp_path / "notext.parquet", [{"id": "1", "body": "x"}])
    with pytest.raises(InputError, match="no text column 'text'"):
        read_all([notext])
    inttext = write_parquet(tmp_path / "inttext.parquet", [{"id": "1", "text": 5}])
    with pytest.raises(InputError, match="expected a string type"):
        read_all([inttext])
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("this is\nnot json\n")
    with pytest.raises(InputError, match="garbage.jsonl: none of the first"):
        read_all([garbage])
    zst = write_jsonl(tmp_path / "cut.jsonl.zst", sample_docs(200), zst=True)
    zst.write_bytes(zst.read_bytes()[:-20])
    with pytest.raises(InputError, match="cut.jsonl.zst: zstd stream is truncated"):
        read_all([zst])
    with pytest.raises(InputError, match="matches no file"):
        read_all([tmp_path / "missing-*.jsonl"])
    with pytest.raises(InputError, match="unknown input type"):
        read_all([tmp_path / "good.jsonl", (tmp_path / "x.csv")]) if (tmp_path / "x.csv").write_text("a") else None


def test_empty_file_warns_and_differing_schemas_are_reconciled(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    a = write_parquet(tmp_path / "a.parquet", [{"id": "1", "text": "one", "score": 1.5, "lang": "en"}])
    b = write_parquet(tmp_path / "b.parquet", [{"id": "2", "text": "two", "score": 2, "extra": True}])
    r, docs, _ = read_all([a, b, empty])
    assert [d.columns for d in docs] == [{"score": 1.5, "lang": "en"}, {"score": 2.0, "lang": None}]
    assert any("empty file" in w for w in r.warnings) and any("extra" in w for w in r.warnings)
    c = write_parquet(tmp_path / "c.parquet", [{"id": "3", "text": "three", "score": pa.scalar([1, 2]).as_py()}])
    with pytest.raises(InputError, match="c.parquet: column 'score'"):
        read_all([a, c])


def test_seen_ids_find_duplicates_across_merges_in_8_bytes_an_id():
    from engine.ids import SeenIds

    seen = SeenIds(merge_every=4)
    assert seen.first_time([1, 2, 3, 2]) == [True, True, True, False]
    assert seen.first_time([4, 5, 1]) == [True, True, False]  # 1 was merged into the array by now
    assert len(seen.arr) >= 4 and seen.first_time([5, 6]) == [False, True]
    big = SeenIds(merge_every=100_000)
    assert all(big.first_time(list(range(200_000))))
    assert big.arr.nbytes == 200_000 * 8 and not big.recent
