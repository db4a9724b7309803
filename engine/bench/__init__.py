"""tools/bench: model x optimisation-tier sweeps driving the same engine code as `engine run`.

sweep.py (the SWEEP.toml file) -> driver.py (sample, one process per config, resumable results)
-> worker.py (warm-up + measured `Run` in that process) -> report.py (Markdown, CSV, PNG).
"""
