"""Integrity end to end (issue #33): damaged, changed or partial data is never called complete. Each test damages
real files of a real output the way a disk or a person does (zero-filled blocks, flipped bytes, a cut or deleted
file, garbage bookkeeping, a full filesystem), then runs the command line on it and checks the exit status, the
message (naming the file), and that the output afterwards is exactly once or refused."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import engine_cli, engine_main, sample_docs, write_config, write_jsonl
from test_storage import BUCKET, cli, remote_ids, s3  # noqa: F401 - s3: the S3 server fixture (moto on loopback)

from engine.output.journal import JournalWriter

TAG = "s00000-of-00001"
N = 200


def make_output(tmp_path: Path, tiny_model, out: Path | str | None = None, n: int = N, **output) -> tuple[Path, Path]:
    src = write_jsonl(tmp_path / "in.jsonl", sample_docs(n))
    out = out or tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", tiny_model, [src], out, output={"row_group_rows": 50, **output},
                       instant={"completion_tokens": 4}, report={"enabled": False})
    return cfg, out


def exactly_once(out: Path, n: int = N, prompt: str = "faq") -> None:
    """Every part reads whole (its values valid), and each document has one row."""
    ids = []
    for part in sorted((out / prompt).glob("*.parquet")):
        table = pq.read_table(part)
        table.validate(full=True)
        assert "" not in table.column("id").to_pylist()
        ids += table.column("id").to_pylist()
    assert sorted(ids) == sorted(d["id"] for d in sample_docs(n))


def the_part(out: Path, prompt: str = "faq") -> Path:
    (part,) = sorted((out / prompt).glob("*.parquet"))
    return part


def generated(stdout: str) -> int:
    return int(stdout.split("generated  ")[1].split()[0].replace(",", ""))


def crash_state(out: Path, batch_rows: int = 50) -> Path:
    """Turn a complete output into the state a kill -9 leaves: its rows journaled (flushed), no part committed."""
    part = the_part(out)
    table = pq.read_table(part)
    part.unlink()
    (out / "_manifest" / "faq" / f"{TAG}.jsonl").unlink()
    journal = JournalWriter(out / "_journal" / "faq" / f"{TAG}-00000.arrows", table.schema)
    for batch in table.to_batches(max_chunksize=batch_rows):
        journal.write(batch)
    journal.flush(sync=True)  # and never closed: the process died
    return journal.path


def batch_bodies(journal: Path) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each record batch's body in a journal."""
    out = []
    with pa.OSFile(str(journal)) as f:
        pa.ipc.read_message(f)  # the schema
        while f.tell() < f.size():
            msg = pa.ipc.read_message(f)
            out.append((f.tell() - msg.body.size, f.tell()))
    return out


def damage(path: Path, start: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(start)
        fh.write(data)


# ---- 1. journal damage never reaches the output ------------------------------------------------------------------
@pytest.mark.parametrize("how", ["zero-filled last batch", "bytes flipped in a batch"])
def test_a_damaged_journal_batch_is_dropped_and_generated_again(tmp_path, tiny_model, how):
    cfg, out = make_output(tmp_path, tiny_model)
    engine_main("run", str(cfg), check=True)
    journal = crash_state(out)
    bodies = batch_bodies(journal)
    assert len(bodies) == N // 50
    if how.startswith("zero"):  # a power cut: the file was extended, its last blocks never written
        start, end = bodies[-1]
        damage(journal, start, bytes(end - start))
    else:  # 16 bytes flipped inside the second batch's body (its strings: invalid UTF-8 among them)
        start, end = bodies[1]
        mid = (start + end) // 2
        damage(journal, mid, bytes(b ^ 0xFF for b in journal.read_bytes()[mid:mid + 16]))
    resumed = engine_main("run", str(cfg))
    assert resumed.returncode == 0, resumed.stderr
    exactly_once(out)
    assert generated(resumed.stdout) == 50  # the dropped batch's documents, nothing else
    assert "damaged on disk, dropped" in resumed.stderr and str(journal) in resumed.stderr
    status = engine_main("status", str(out), "--check")
    assert status.returncode == 0 and "DUPLICATES" not in status.stdout and "run COMPLETE" in status.stdout


def test_read_journal_tells_a_torn_tail_from_damage(tmp_path, caplog):
    """A tail cut by a crash is expected (said quietly); zeros after an end-of-stream marker and a damaged
    batch header are damage (a warning); either way only intact batches come back."""
    from engine.output.journal import read_journal

    schema = pa.schema([("id", pa.string())])
    path = tmp_path / "j.arrows"

    def journal() -> bytearray:
        j = JournalWriter(path, schema)
        for i in range(4):
            j.write(pa.RecordBatch.from_pydict({"id": [f"d{i}-{k}" for k in range(10)]}, schema=schema))
        j.flush(sync=True)
        j.file.close()
        return bytearray(path.read_bytes())

    def read(data: bytes) -> tuple[list[int], bool]:
        path.write_bytes(data)
        caplog.clear()
        rows = [b.num_rows for b in read_journal(path, schema)]
        return rows, any(r.levelname == "WARNING" and "damaged on disk" in r.message for r in caplog.records)

    whole = journal()
    bodies = batch_bodies(path)
    assert read(bytes(whole)) == ([10] * 4, False)
    assert read(bytes(whole[:-20])) == ([10] * 3, False)  # torn by a crash
    zeroed = whole[:bodies[-2][1]] + bytes(len(whole) - bodies[-2][1])  # the last message's blocks never written
    assert read(bytes(zeroed)) == ([10] * 3, True)
    header = bytearray(whole)
    header[bodies[0][1] + 8:bodies[0][1] + 24] = bytes(b ^ 0xFF for b in header[bodies[0][1] + 8:bodies[0][1] + 24])
    assert read(bytes(header)) == ([10], True)  # nothing after a damaged header can be trusted to frame


# ---- 2. a damaged or missing part is never "complete" ------------------------------------------------------------
def test_a_cut_or_deleted_part_is_found_by_status_check_and_resume_regenerates_it(tmp_path, tiny_model):
    cfg, out = make_output(tmp_path, tiny_model)
    engine_main("run", str(cfg), check=True)
    part = the_part(out)
    whole = part.read_bytes()
    part.write_bytes(whole[:len(whole) // 2])
    status = engine_main("status", str(out), "--check")
    assert status.returncode == 1 and "run not complete" in status.stdout
    assert f"{part}: {len(whole) // 2:,} bytes, the manifest says {len(whole):,}" in status.stdout
    refused = engine_main("run", str(cfg))
    assert refused.returncode == 1 and f"error: {part}:" in refused.stderr and "Delete that file" in refused.stderr
    assert "Traceback" not in refused.stderr and part.stat().st_size == len(whole) // 2  # nothing else touched

    part.unlink()  # as the message says
    status = engine_main("status", str(out), "--check")
    assert status.returncode == 1 and f"{part}: missing (the manifest lists it with {N} row(s))" in status.stdout
    resumed = engine_main("run", str(cfg))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{part}: missing" in resumed.stderr and generated(resumed.stdout) == N
    exactly_once(out)
    assert engine_main("status", str(out), "--check", "--deep").returncode == 0


def test_bytes_flipped_inside_a_part_are_found_by_the_deep_check_and_refused_at_resume(tmp_path, tiny_model):
    cfg, out = make_output(tmp_path, tiny_model)
    engine_main("run", str(cfg), check=True)
    part = the_part(out)
    size = part.stat().st_size
    damage(part, size // 2, bytes(b ^ 0x5A for b in part.read_bytes()[size // 2:size // 2 + 16]))
    deep = engine_main("status", str(out), "--check", "--deep")
    assert deep.returncode == 1 and f"{part}: checksum mismatch (damaged on disk)" in deep.stdout
    refused = engine_main("run", str(cfg))
    assert refused.returncode == 1, refused.stderr
    assert f"error: {part}: checksum mismatch" in refused.stderr and "zstd" not in refused.stderr.lower()
    assert "complete:" not in refused.stdout
    part.unlink()
    assert engine_main("run", str(cfg)).returncode == 0
    exactly_once(out)


# ---- 9. damaged bookkeeping names the file; --overwrite always works ---------------------------------------------
def test_a_garbage_fingerprint_is_named_and_overwrite_starts_afresh(tmp_path, tiny_model):
    cfg, out = make_output(tmp_path, tiny_model)
    engine_main("run", str(cfg), check=True)
    fp = out / "_run" / "fingerprint.json"
    fp.write_bytes(b"\xff\xfe\x00garbage" * 10)
    for args in (("run", str(cfg)), ("status", str(out), "--check")):
        p = engine_main(*args)
        assert p.returncode == 1 and f"error: {fp}: damaged" in p.stderr and "--overwrite" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    fresh = engine_main("run", str(cfg), "--overwrite")
    assert fresh.returncode == 0, fresh.stderr
    assert generated(fresh.stdout) == N
    exactly_once(out)
    assert engine_main("status", str(out), "--check").returncode == 0


def test_a_cut_state_file_marks_its_shard_and_status_shows_the_others(tmp_path, tiny_model):
    cfg, out = make_output(tmp_path, tiny_model)
    for i in range(2):
        engine_main("run", str(cfg), "--shard", f"{i}/2", check=True)
    state = out / "_state" / "s00001-of-00002.json"
    state.write_bytes(state.read_bytes()[:40])
    status = engine_main("status", str(out))
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert any(line.startswith("s00000-of-00002") and line.rstrip().endswith("complete") for line in lines)
    assert any(line.startswith("s00001-of-00002") and "DAMAGED (state file unreadable)" in line for line in lines)
    assert f"{state}: damaged state file" in status.stdout and "run not complete" in status.stdout
    assert engine_main("status", str(out), "--check").returncode == 1
    resumed = engine_main("run", str(cfg), "--shard", "1/2")  # the state is derived: the run writes it again
    assert resumed.returncode == 0 and f"{state}: damaged state file" in resumed.stderr
    assert generated(resumed.stdout) == 0
    assert engine_main("status", str(out), "--check").returncode == 0
    exactly_once(out)


# ---- 10. disk full: one error line naming the path, and the same command resumes ---------------------------------
@contextlib.contextmanager
def tiny_filesystem(where: Path, size: str):
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({mounted.stderr.strip() or 'mount refused'}; needs root)")
    try:
        yield lambda new: subprocess.run(["mount", "-o", f"remount,size={new}", str(where)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def full_disk_message(stderr: str, where: Path) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith(": no space left on device"), stderr
    assert str(where) in errors[0]
    assert "run the same command again: it resumes" in stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr


def test_a_full_disk_is_one_error_line_naming_the_path_and_the_same_command_resumes(tmp_path, tiny_model):
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    n = 2000
    with tiny_filesystem(tmp_path / "small", "400k") as resize:
        cfg, out = make_output(tmp_path, tiny_model, out=tmp_path / "small" / "out", n=n, flush_seconds=0.2)
        full = engine_cli("run", str(cfg), timeout=300)  # its own process: nothing may print at its exit either
        assert full.returncode == 1, full.stderr
        full_disk_message(full.stderr, out)
        resize("20m")
        resumed = engine_main("run", str(cfg))
        assert resumed.returncode == 0, resumed.stderr
        exactly_once(out, n)
        assert engine_main("status", str(out), "--check", "--deep").returncode == 0


def test_a_full_staging_disk_of_a_store_output_is_the_same(tmp_path, tiny_model, s3):  # noqa: F811
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    n = 2000
    with tiny_filesystem(tmp_path / "small", "400k") as resize:
        staging = tmp_path / "small" / "staging"
        cfg, out = make_output(tmp_path, tiny_model, out=f"s3://{BUCKET}/full", n=n, flush_seconds=0.2,
                               staging_dir=str(staging), sync_seconds=0.5)
        full = cli(s3, "run", str(cfg))
        assert full.returncode == 1, full.stderr
        full_disk_message(full.stderr, staging)
        resize("20m")
        resumed = cli(s3, "run", str(cfg))
        assert resumed.returncode == 0, resumed.stderr
        ids = remote_ids(s3, f"{BUCKET}/full")
        assert sorted(ids) == sorted(d["id"] for d in sample_docs(n))
