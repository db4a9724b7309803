"""`python -m engine.bench SWEEP.toml ...` (and tools/bench): the same as `engine bench SWEEP.toml ...`.

The process becomes `python -m engine.cli bench ...` (same pid: a signal sent to it reaches the sweep), so
the command line's one error handler and signal handling serve both spellings."""
import os
import sys

os.execv(sys.executable, [sys.executable, "-m", "engine.cli", "bench", *sys.argv[1:]])
