"""`engine status OUTPUT_DIR`: per shard and per prompt progress, from the shards' state files."""
from __future__ import annotations

import time
from pathlib import Path

import orjson

from .output import read_states


def _age(ts: float) -> str:
    s = max(0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def render_status(out: Path) -> tuple[str, bool]:
    fp_path = out / "_run" / "fingerprint.json"
    if not fp_path.exists():
        return f"{out}: no run here (no _run/fingerprint.json)", False
    fp = orjson.loads(fp_path.read_bytes())
    shard_count = fp.get("shard_count", 1)
    states = read_states(out)
    lines = [f"{out}  model {fp.get('model')}  prompts {', '.join(fp.get('prompts', {}))}  shards {shard_count}"]
    header = f"{'shard':<18}{'prompt':<14}{'done':>10}{'total':>10}{'failed':>8}{'rejected':>10}  {'updated':<12}state"
    lines.append(header)
    for st in states:
        rows = st.get("input_rows")
        for i, (prompt, c) in enumerate(st["prompts"].items()):
            state = "complete" if st["complete"] else "running/stopped"
            lines.append(f"{st['shard'] if i == 0 else '':<18}{prompt:<14}{c['done']:>10,}"
                         f"{(f'{rows:,}' if rows is not None else '?'):>10}{c['failed']:>8,}"
                         f"{(st['rejected'] if i == 0 else ''):>10}  {_age(st['updated_at']) if i == 0 else '':<12}"
                         f"{state if i == 0 else ''}")
    done_shards = sum(1 for st in states if st["complete"])
    complete = done_shards == shard_count and len(states) == shard_count
    lines.append(f"{done_shards}/{shard_count} shards complete; run {'COMPLETE' if complete else 'not complete'}")
    return "\n".join(lines), complete
