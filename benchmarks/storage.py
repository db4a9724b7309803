"""Input read speed: the engine's Reader over a local disk against the same files in an S3 store on
loopback (moto's S3 service, tests/support/s3_server.py, through s3fs as on AWS), side by side in one run.

    .venv/bin/python -m benchmarks.storage [--mb 200] [--formats jsonl,jsonl.zst,parquet] [--block-mb 1,8,32]

Reports MB/s of input bytes (the files' size on disk) and documents/s through `Reader.batches()`
(parse + validate, no tokenisation), per format and read-ahead block size, and the raw byte rate of
the store (no parsing) for reference. Loopback has no network latency: against a real store the
request count matters more, so larger blocks help more there than here. moto serves every range
request from a full copy of the object, on the same cores as the reader, so small blocks are slower
here than against S3, and the store figures are a floor.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.machine import cpu_label

ROOT = Path(__file__).resolve().parents[1]


def make_files(folder: Path, mb: int, formats: list[str]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(0)
    words = [f"{rng.getrandbits(24):x}" for _ in range(5000)]
    rows, size = [], 0
    while size < mb * 1e6:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(200, 900)))
        rows.append({"id": f"d{len(rows)}", "text": text, "url": f"https://example.org/{len(rows)}"})
        size += len(text) + 60
    out = {}
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if "jsonl" in formats:
        out["jsonl"] = folder / "docs.jsonl"
        out["jsonl"].write_bytes(lines)
    if "jsonl.zst" in formats:
        out["jsonl.zst"] = folder / "docs.jsonl.zst"
        out["jsonl.zst"].write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
    if "parquet" in formats:
        out["parquet"] = folder / "docs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), out["parquet"], compression="zstd")
    return out


def read_all(url: str, block_mb: int, prefetch: int = 2) -> tuple[float, int]:
    from engine import stores as storage
    from engine.input.reader import Reader

    orig = storage.open_input
    storage.open_input = lambda u, block_size=block_mb << 20, prefetch=prefetch: orig(u, block_size, prefetch)
    try:
        t = time.perf_counter()
        reader = Reader([url], "text", "id", 1024, 10_000_000)
        reader.preflight()
        n = sum(len(b.docs) for b in reader.batches())
        return time.perf_counter() - t, n
    finally:
        storage.open_input = orig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.storage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200, help="approximate input size (MB of text)")
    ap.add_argument("--formats", default="jsonl,jsonl.zst,parquet")
    ap.add_argument("--block-mb", default="4,16", help="read-ahead block sizes to compare (MB)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    formats = args.formats.split(",")
    blocks = [int(b) for b in args.block_mb.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    server = subprocess.Popen([sys.executable, "-m", "tests.support.s3_server", "0"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready = server.stdout.readline()  # "READY <port>": the port it bound
        assert ready.startswith("READY"), ready
        endpoint = f"http://127.0.0.1:{ready.split()[1]}"
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
        import s3fs
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bench")
        files = make_files(work, args.mb, formats)
        for path in files.values():
            fs.put_file(str(path), f"bench/{path.name}")
        print(f"CPU: {cpu_label()}; store: moto S3 on loopback ({endpoint}); input ~{args.mb} MB of text")
        results = []
        for kind, path in files.items():
            size = path.stat().st_size / 1e6
            t_local, n = read_all(str(path), 8)
            t0 = time.perf_counter()
            with fs.open(f"bench/{path.name}", "rb", block_size=32 << 20) as fh:
                while fh.read(32 << 20):
                    pass
            raw = size / (time.perf_counter() - t0)
            row = {"format": kind, "file_mb": round(size, 1), "docs": n, "local_mb_s": round(size / t_local, 1),
                   "store_raw_mb_s": round(raw, 1), "store": {}}
            for b in blocks:
                for ahead in (0, 2):
                    t_store, n2 = read_all(f"s3://bench/{path.name}", b, ahead)
                    assert n2 == n
                    row["store"][f"{b} MB, prefetch {ahead}"] = {"mb_s": round(size / t_store, 1),
                                                                "ratio_to_local": round(t_local / t_store, 2)}
            results.append(row)
            best = max(row["store"].items(), key=lambda kv: kv[1]["mb_s"])
            print(f"{kind:10} {size:8.1f} MB  {n:,} docs  local {row['local_mb_s']:7.1f} MB/s "
                  f"({n / t_local:,.0f} docs/s)  "
                  + f"[raw store read {raw:,.0f} MB/s]")
            for b, v in row["store"].items():
                print(f"{'':12}store, {b:>18}: {v['mb_s']:7.1f} MB/s ({v['ratio_to_local']:.2f}x local, "
                      f"{n * v['mb_s'] / size:,.0f} docs/s)"
                      + ("  <- best" if b == best[0] else ""))
        if args.json:
            Path(args.json).write_text(json.dumps({"cpu": cpu_label(), "results": results}, indent=2))
    finally:
        server.kill()
        server.wait()
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
