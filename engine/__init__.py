"""synth-engine: rewrite web documents with small LLMs into pretraining text, one shard at a time.

The data path of `engine run` (run.py assembles it, in this order):

    input/reader.py          files (Parquet, JSONL, JSONL.zst; local or a store) -> validated Doc batches
                             (identity.py: file labels of derived ids, the input record of the fingerprint)
      -> render/renderer.py  Doc -> token ids of (chat template + prompt + document), cut to the context
      -> schedule/           producer.py: skip what is done, one Request per (document, prompt), length
                             buckets (buckets.py); retry.py: failed requests back in with backoff
      -> backends/           torch | vllm | sglang | http | instant: Requests in, Completions out (which
                             exist and what each can do: the registry in config/backends.py)
      -> collect.py          the requests in flight (admitted as the backend pulls them, retried, removed
                             when final); Completion + its Doc -> output rows (decoded on the writer thread)
      -> output/             writer.py (thread; reports what it stored through a queue) -> parts.py (journal
                             + atomic zstd Parquet parts, manifest, counts) via sinks.py; record.py (the typed
                             state file and summary: the shard's figures over every attempt); layout.py
                             (directory, schema, fingerprint), remote.py (stores), lease.py + lease_store.py
                             (one writer per shard), card.py, report.py, status.py

Shared by every stage (imports point downstream only: tests/test_architecture.py checks it):
    errors.py (every failure and its exit status), types.py (Doc, Request, Completion, SamplingParams),
    ids.py (id hashes, done sets), atomic.py (crash-safe file writes), signals.py, gate.py (the one quality
    gate: which rows are useful), metrics.py (this process's counters and clock), progress.py (the progress
    bar / line), machine.py (the CPU's and GPUs' facts), stores.py (fsspec URLs, retries), config/
    (RunConfig, the backend registry), model/ (which weights, the tokenizer, sampling defaults, size).

Around the run: cli/ (the `engine` command), ops/ (launch on Slurm / Ray), handoff/ (mix, nanotron export,
lighteval), bench/ (`engine bench`: model x tier sweeps). Peer comparisons and one-off benchmarks are in
benchmarks/ beside the package; test servers and GPU checks in tests/.
"""
