"""A shard's counters over every process that worked on it, beside this process's own.

The state file (`_state/<shard>.json`) and the summary carry both, labelled:
    "totals"        the shard over every attempt: rows and output tokens read from the stored parts
                    (PartSink counts: so they equal what the Parquet files hold, whatever crashed), wall
                    and generation seconds summed over attempts, the number of attempts
    "this_process"  this process alone: requests generated, output tokens, wall and generation seconds
The sums of earlier attempts come from the state file found at start (after a kill -9 its last write,
a flush interval old at most). Timing fields other helpers add to "this_process" (numbers ending in
`_s`) are summed the same way.
"""
from __future__ import annotations

from pathlib import Path

import orjson

SUMMED = ("wall_s", "generation_s")


def read_state(out: Path, tag: str) -> dict | None:
    path = Path(out) / "_state" / f"{tag}.json"
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def earlier(state: dict | None) -> dict:
    """The sums over the attempts before this one, from the state file found at start."""
    if not state:
        return {"attempts": 0}
    if "totals" in state:
        t = state["totals"]
        return {k: v for k, v in t.items() if k == "attempts" or (k.endswith("_s") and isinstance(v, (int, float)))}
    # a state file of an earlier version: one attempt, its wall clock (generation time was not recorded)
    wall = float(state.get("elapsed_s") or 0.0)
    return {"attempts": 1, "wall_s": wall, "generation_s": wall}


def this_process(m) -> dict:
    """This process's own figures, from its Metrics (the timing fields it has)."""
    out = {"requests": m.requests_done, "output_tokens": m.completion_tokens, "wall_s": round(m.elapsed, 1)}
    for k in ("startup_s", "generation_s", "finishing_s"):
        if hasattr(m, k):
            out[k] = round(getattr(m, k), 1)
    return out


def shard_totals(before: dict, this: dict, sinks) -> dict:
    """The shard over every attempt: rows and output tokens from the stored parts (ShardSinks), seconds summed."""
    prompts = sinks.per_prompt().values()
    tokens = sum(c.get("output_tokens", 0) for c in prompts)
    return totals(before, this, rows=sinks.stored(), output_tokens=tokens)


def totals(before: dict, this: dict, rows: int, output_tokens: int) -> dict:
    out = {"rows": rows, "output_tokens": output_tokens, "attempts": int(before.get("attempts", 0)) + 1}
    keys = set(SUMMED) | {k for k, v in this.items() if k.endswith("_s") and isinstance(v, (int, float))}
    for k in sorted(keys):
        out[k] = round(float(before.get(k, 0.0)) + float(this.get(k, 0.0)), 1)
    return out
