"""Servers the tests (and benchmarks/storage.py) start on loopback: s3_server.py, moto's S3 behind a fault
injector (`python -m tests.support.s3_server PORT`, from the repository root)."""
