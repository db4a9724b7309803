"""Object stores through the CLI, against a real S3 API on loopback (moto's S3 service, tests/support/s3_server.py,
through s3fs exactly as on AWS): inputs read from the store, outputs mirrored to it, kill -9 and a
resume on "another machine" (a fresh staging directory), injected 503s, a store that is down at
the end; and the Hub's client (huggingface_hub's HfFileSystem) as far as it goes offline."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import REPO, Watched, engine_main, free_port, reap_session, sample_docs, wait_for, write_config

BUCKET = "synth"


@pytest.fixture(scope="module")
def s3():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.s3_server", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # the server's readiness line
    assert line.startswith("READY"), line
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url}
    import s3fs
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=url, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield type("S3", (), {"url": url, "env": env, "fs": fs,
                          "faults": lambda self, **q: httpx.post(f"{url}/_faults", params=q).json()})()
    proc.kill()
    proc.wait()


def cli(s3, *args, **kw):
    """`engine ARGS` against the test server, in this process (`engine_main`), with a new S3 client: fsspec keeps
    one per set of arguments, and the server's address is in the environment of the call."""
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    return engine_main(*args, env={**s3.env, **kw.pop("env", {})}, **kw)


def put_inputs(s3, prefix: str, docs: list[dict]) -> None:
    """The documents as three files of three formats in the store."""
    third = len(docs) // 3
    s3.fs.pipe(f"{BUCKET}/{prefix}/a.jsonl", "".join(json.dumps(d) + "\n" for d in docs[:third]).encode())
    s3.fs.pipe(f"{BUCKET}/{prefix}/b.jsonl.zst", zstandard.ZstdCompressor().compress(
        "".join(json.dumps(d) + "\n" for d in docs[third:2 * third]).encode()))
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(docs[2 * third:]), buf)
    s3.fs.pipe(f"{BUCKET}/{prefix}/c.parquet", buf.getvalue().to_pybytes())


def remote_ids(s3, out: str, prompt: str = "faq") -> list[str]:
    s3.fs.invalidate_cache()
    ids = []
    for path in sorted(s3.fs.glob(f"{out}/{prompt}/*.parquet")):
        with s3.fs.open(path, "rb") as fh:
            ids += pq.read_table(fh, columns=["id"]).column(0).to_pylist()
    return ids


def test_a_run_reads_from_and_writes_to_a_store(tmp_path, tiny_model, s3):
    docs = sample_docs(30)
    put_inputs(s3, "in1", docs)
    out = f"s3://{BUCKET}/out1"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [f"s3://{BUCKET}/in1/*"], out, backend="instant",
                       output={"staging_dir": str(tmp_path / "staging")})
    p = cli(s3, "run", str(cfg), check=True)
    assert f"output {out}: staging in" in p.stderr and f"uploaded to {out}" in p.stderr
    assert sorted(remote_ids(s3, f"{BUCKET}/out1")) == sorted(d["id"] for d in docs)
    names = {x.split(f"{BUCKET}/out1/", 1)[1] for x in s3.fs.find(f"{BUCKET}/out1")}
    assert {"_run/fingerprint.json", "_state/s00000-of-00001.json", "summary.json", "README.md"} <= names
    assert not any(n.startswith("_journal") for n in names)  # the journal is the local crash buffer
    card = s3.fs.cat(f"{BUCKET}/out1/README.md").decode()
    assert "config_name: faq" in card and "path: faq/*.parquet" in card and "**complete**" in card
    # progress from anywhere: the store alone, no staging directory
    st = cli(s3, "status", out, "--check")
    assert st.returncode == 0 and "1/1 shards complete" in st.stdout and out in st.stdout
    # a bad input URL names itself; an output in a missing bucket is a configuration error
    bad = cli(s3, "run", str(cfg), "--set", f"input.paths=['s3://{BUCKET}/nothing/*.jsonl']")
    assert bad.returncode != 0 and f"s3://{BUCKET}/nothing/*.jsonl" in bad.stderr and "matches no file" in bad.stderr
    nobucket = cli(s3, "run", str(cfg), "--set", "output.dir=s3://no-such-bucket/out",
                   "--set", f"output.staging_dir='{tmp_path / 'st-nb'}'")
    assert nobucket.returncode == 2 and "no-such-bucket" in nobucket.stderr, nobucket.stderr[-2000:]


def test_shards_share_one_store_output_and_its_card(tmp_path, tiny_model, s3):
    docs = sample_docs(30)
    put_inputs(s3, "in-sh", docs)
    out = f"s3://{BUCKET}/sharded"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [f"s3://{BUCKET}/in-sh/*"], out, backend="instant",
                       report={"enabled": False})
    for i in range(2):  # two machines: a staging directory each
        cli(s3, "run", str(cfg), "--shard", f"{i}/2", "--set", f"output.staging_dir='{tmp_path / f'st{i}'}'",
            check=True)
    assert sorted(remote_ids(s3, f"{BUCKET}/sharded")) == sorted(d["id"] for d in docs)
    card = s3.fs.cat(f"{BUCKET}/sharded/README.md").decode()
    assert "| faq | 30 |" in card and "**complete**" in card  # every shard's rows, read from the store
    st = cli(s3, "status", out, "--check")
    assert st.returncode == 0 and "2/2 shards complete" in st.stdout


def slow_run(tmp_path, tiny_model, s3, name: str, n: int = 900, **output):
    """Enough rows of ~4 kB of random words (the text is stored with the row, zstd-compressed) for parts of
    1 MB to commit mid-run."""
    import random
    rng = random.Random(n)
    docs = [{"id": f"doc-{i:05d}", "text": " ".join(f"{rng.getrandbits(40):x}" for _ in range(400))} for i in range(n)]
    put_inputs(s3, f"in-{name}", docs)
    out = f"s3://{BUCKET}/{name}"
    cfg = write_config(tmp_path / f"{name}.toml", tiny_model, [f"s3://{BUCKET}/in-{name}/*"], out, backend="instant",
                       instant={"delay_ms": 8, "completion_tokens": 32},
                       output={"file_max_mb": 1, "row_group_rows": 50, "flush_seconds": 0.2, "sync_seconds": 0.5,
                               "staging_dir": str(tmp_path / f"staging-{name}"), **output},
                       report={"enabled": False})
    return cfg, out, docs


def test_kill_9_then_resume_on_another_machine_is_exactly_once(tmp_path, tiny_model, s3):
    cfg, out, docs = slow_run(tmp_path, tiny_model, s3, "killed")
    w = Watched(cfg, env=s3.env)
    part = f"{BUCKET}/killed/faq/part-*.parquet"
    wait_for(lambda: (s3.fs.invalidate_cache(), s3.fs.glob(part))[1], "a part uploaded", 300, w.proc)
    os.killpg(w.proc.pid, signal.SIGKILL)
    w.proc.wait()
    assert reap_session(w.proc.pid) == []
    before = len(remote_ids(s3, f"{BUCKET}/killed"))
    assert 0 < before < len(docs)
    # another machine: an empty staging directory; it starts from what the store has committed
    p = cli(s3, "run", str(cfg), "--set", f"output.staging_dir='{tmp_path / 'other-machine'}'", check=True)
    assert "committed part(s) of this shard fetched from the store" in p.stderr and "resuming" in p.stderr
    ids = remote_ids(s3, f"{BUCKET}/killed")
    assert sorted(ids) == sorted(d["id"] for d in docs)  # every document exactly once
    # the first machine comes back: its staging is behind the store; nothing is duplicated
    cli(s3, "run", str(cfg), check=True)
    assert sorted(remote_ids(s3, f"{BUCKET}/killed")) == sorted(d["id"] for d in docs)


# s3fs and botocore retry on their own first (slowly: seconds per fault); fewer of theirs keep the tests
# short and leave more of the work to ours
FEW_CLIENT_RETRIES = {"AWS_MAX_ATTEMPTS": "2"}


def test_injected_503s_are_survived(tmp_path, tiny_model, s3):
    cfg, out, docs = slow_run(tmp_path, tiny_model, s3, "flaky", n=600)
    s3.faults(status=503, every=5)  # every 5th request: the client's own retries absorb most of these
    try:
        w = Watched(cfg, env={**s3.env, **FEW_CLIENT_RETRIES})
        part = f"{BUCKET}/flaky/faq/part-*.parquet"
        wait_for(lambda: (s3.fs.invalidate_cache(), s3.fs.glob(part))[1], "a part uploaded", 300, w.proc)
        s3.faults(status=503, next=40)  # a burst longer than the client's retries: ours take over with backoff
        code, _, err = w.finish(timeout=600)
    finally:
        counts = s3.faults(status=503, every=0, next=0)
    assert code == 0, err[-3000:]
    # The burst outlasted the client's own retries at least once, and ours took over (the run may end before
    # all 40 are consumed, so count our retry lines, not the faults)
    assert counts["injected"] > 2 and "; retry " in err
    assert sorted(remote_ids(s3, f"{BUCKET}/flaky")) == sorted(d["id"] for d in docs)


def test_a_store_down_at_the_end_is_status_4_and_the_next_run_uploads(tmp_path, tiny_model, s3):
    cfg, out, docs = slow_run(tmp_path, tiny_model, s3, "down", n=60, store_give_up_seconds=2)
    w = Watched(cfg, env={**s3.env, **FEW_CLIENT_RETRIES})
    wait_for(lambda: (tmp_path / "staging-down" / "_state").exists(), "the run started", 300, w.proc)
    s3.faults(status=503, next=10**6)
    try:
        code, _, err = w.finish(timeout=600)
    finally:
        s3.faults(status=503, next=0)
    assert code == 4, err[-3000:]
    assert "the results are safe in" in err
    p = cli(s3, "run", str(cfg), check=True)
    assert "uploaded to" in p.stderr
    assert sorted(remote_ids(s3, f"{BUCKET}/down")) == sorted(d["id"] for d in docs)


def test_retry_errors_rewrites_the_stores_parts(tmp_path, tiny_model, s3):
    docs = sample_docs(40)
    put_inputs(s3, "in-re", docs)
    out = f"s3://{BUCKET}/re"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [f"s3://{BUCKET}/in-re/*"], out, backend="instant",
                       instant={"fail_rate": 0.3}, retry={"max_attempts": 1, "max_error_fraction": 0.9},
                       output={"staging_dir": str(tmp_path / "st")}, report={"enabled": False})
    cli(s3, "run", str(cfg), check=True)

    def reasons():
        s3.fs.invalidate_cache()
        rows = []
        for path in s3.fs.glob(f"{BUCKET}/re/faq/*.parquet"):
            with s3.fs.open(path, "rb") as fh:
                rows += pq.read_table(fh, columns=["id", "finish_reason"]).to_pylist()
        return rows
    assert any(r["finish_reason"] == "error" for r in reasons())
    cli(s3, "run", str(cfg), "--retry-errors", "--set", "instant.fail_rate=0.0", check=True)
    rows = reasons()
    assert not any(r["finish_reason"] == "error" for r in rows)
    assert sorted(r["id"] for r in rows) == sorted(d["id"] for d in docs)  # exactly once in the store


def test_overwrite_clears_the_store_copy(tmp_path, tiny_model, s3):
    docs = sample_docs(6)
    put_inputs(s3, "in-ow", docs)
    out = f"s3://{BUCKET}/ow"
    cfg = write_config(tmp_path / "r.toml", tiny_model, [f"s3://{BUCKET}/in-ow/*"], out, backend="instant",
                       output={"staging_dir": str(tmp_path / "st")}, report={"enabled": False})
    cli(s3, "run", str(cfg), check=True)
    changed = cli(s3, "run", str(cfg), "--set", "sampling.max_new_tokens=8",
                  "--set", f"output.staging_dir='{tmp_path / 'st2'}'")
    assert changed.returncode == 2 and "different run configuration" in changed.stderr  # the store's fingerprint
    cli(s3, "run", str(cfg), "--set", "sampling.max_new_tokens=8", "--overwrite", check=True)
    assert sorted(remote_ids(s3, f"{BUCKET}/ow")) == sorted(d["id"] for d in docs)


# ---- the Hugging Face Hub, offline -----------------------------------------------------------------

def test_hub_output_is_one_commit_per_sync_with_its_errors_retried(tmp_path, monkeypatch):
    """hf://datasets/... goes through huggingface_hub's own HfFileSystem; the commit itself needs the
    network, so HfApi.create_commit is replaced by a recorder that fails like the Hub does first."""
    import httpx as hx
    from huggingface_hub import HfFileSystem
    from huggingface_hub.errors import HfHubHTTPError

    from engine import stores as storage
    from engine.output import remote

    fs, path = storage.filesystem("hf://datasets/acme/rewrites/faq-run")
    assert isinstance(fs, HfFileSystem) and path == "datasets/acme/rewrites/faq-run"
    monkeypatch.setattr(fs, "resolve_path", lambda p, **k: type("R", (), {
        "repo_id": "acme/rewrites", "repo_type": "dataset", "revision": None, "path_in_repo": "faq-run"})())
    calls, failures = [], [412, 503, "lfs"]

    def create_commit(**kw):
        if failures:
            f = failures.pop(0)
            if f == "lfs":
                raise RuntimeError("LFS verification failed for faq/part-s00000-of-00001-00000.parquet")
            resp = hx.Response(f, request=hx.Request("POST", "https://huggingface.co/api/datasets/acme/rewrites/commit"))
            raise HfHubHTTPError(f"{f} from the Hub", response=resp)
        calls.append(kw)

    monkeypatch.setattr(fs, "_api", type("Api", (), {"create_commit": staticmethod(create_commit)})())
    monkeypatch.setattr(storage, "filesystem", lambda url: (fs, "datasets/acme/rewrites/faq-run"))
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    staging = tmp_path / "st"
    (staging / "faq").mkdir(parents=True)
    (staging / "faq" / "part-s00000-of-00001-00000.parquet").write_bytes(b"PAR1")
    (staging / "_state").mkdir()
    (staging / "_state" / "s00000-of-00001.json").write_text("{}")
    (staging / "_journal").mkdir()
    (staging / "_journal" / "x.arrows").write_bytes(b"")
    remote = remote.RemoteOutput("hf://datasets/acme/rewrites/faq-run", staging)
    assert remote.hub
    assert remote.sync() == 2
    (call,) = calls  # after a 412 (commit race), a 503 and an LFS failure: one commit
    assert call["repo_id"] == "acme/rewrites" and call["repo_type"] == "dataset"
    paths = [op.path_in_repo for op in call["operations"]]
    assert paths == ["faq-run/faq/part-s00000-of-00001-00000.parquet", "faq-run/_state/s00000-of-00001.json"]
    assert remote.sync() == 0  # nothing changed since
    forbidden = hx.Response(403, request=hx.Request("POST", "https://huggingface.co"))
    assert not storage.transient(HfHubHTTPError("403", response=forbidden))  # bad token: no retries


def test_transient_and_permanent_store_errors():
    import errno

    from engine.errors import StoreError
    from engine.stores import retrying, transient

    assert transient(OSError(errno.EBUSY, "Please reduce your request rate.")) and transient(ConnectionResetError())
    assert transient(OSError(errno.EBUSY, "injected by the test server"))  # how s3fs raises SlowDown / 503
    assert not transient(PermissionError("Access Denied")) and not transient(FileNotFoundError("no such bucket"))
    tries = []

    def flaky():
        tries.append(1)
        if len(tries) < 3:
            raise TimeoutError("read timed out")
        return "ok"
    assert retrying(flaky, "x", sleep=lambda s: None) == "ok" and len(tries) == 3
    with pytest.raises(StoreError) as e:
        retrying(lambda: (_ for _ in ()).throw(PermissionError("denied")), "x", sleep=lambda s: None)
    assert not e.value.gave_up
    start = time.monotonic()
    with pytest.raises(StoreError) as e:
        retrying(lambda: (_ for _ in ()).throw(TimeoutError("t")), "x", give_up_after=0.05, first=0.01)
    assert e.value.gave_up and time.monotonic() - start < 5
