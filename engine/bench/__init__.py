"""The benchmark sweep users run: `engine bench SWEEP.toml` (also `tools/bench`, `python -m engine.bench`).

    sweep.py   the SWEEP.toml file: models x optimisation tiers over one fixed sample of documents
    driver.py  sample the documents, run each config in its own process, keep results (resumable)
    worker.py  one config in that process: warm-up, then a measured `Run`
    report.py  Markdown, CSV and the Pareto plot of the results

Peer comparisons and one-off measurements live outside the package, in `benchmarks/` at the top of the
repository (`python -m benchmarks.<name>`); the GPU acceptance checks are in `tests/gpu/`.
"""
