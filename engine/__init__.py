"""synth-engine: rewrite web documents with small LLMs into pretraining text, one shard at a time.

The data path of `engine run` (run.py assembles it, in this order):

    input/reader.py          files (Parquet, JSONL, JSONL.zst; local or a store) -> validated Doc batches
                             (identity.py: file labels of derived ids, the input record of the fingerprint)
      -> render/renderer.py  Doc -> token ids of (chat template + prompt + document), cut to the context
      -> schedule/           producer.py: skip what is done, one Request per (document, prompt), length
                             buckets (buckets.py); retry.py: failed requests back in with backoff
      -> backends/           torch | vllm | sglang | sglang-http | instant: Requests in, Completions out
      -> collect.py          Completion + its Doc -> output rows (decoded on the writer thread)
      -> output/             writer.py (thread) -> parts.py (journal + atomic zstd Parquet parts, manifest)
                             layout.py (directory, schema, fingerprint, state files), remote.py (stores),
                             lease.py + lease_store.py (one writer per shard), totals.py (the shard's
                             counters over every attempt), card.py, report.py, status.py

Shared by every stage (imports point downstream only: tests/test_architecture.py checks it):
    errors.py (every failure and its exit status), types.py (Doc, Request, Completion, SamplingParams),
    ids.py (id hashes, done sets), atomic.py (crash-safe file writes), signals.py, metrics.py, stores.py
    (fsspec URLs, retries), config/ (RunConfig), model/ (model store, tokenizer, sampling defaults).

Around the run: cli/ (the `engine` command), ops/ (launch on Slurm / Ray, a test server), handoff/ (mix,
nanotron export, lighteval), bench/ (every benchmark: model x tier sweeps, host, CPU engines, storage, GPU checks).
"""
