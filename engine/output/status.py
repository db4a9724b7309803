"""`engine status OUTPUT_DIR`: progress of every shard and prompt, from the shards' state files."""
from __future__ import annotations

import time
from pathlib import Path

import orjson

from engine.output.layout import read_states, shard_tag

STALL_SECONDS = 120  # a shard whose state is older than this (and not complete) is stalled or stopped


def _age(ts: float) -> str:
    s = max(0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s / 60:.0f}m" if s < 6000 else f"{s / 3600:.1f}h"


def shard_eta(st: dict) -> float | None:
    rows, rate = st.get("input_rows"), st.get("requests_per_s") or 0
    if st["complete"]:
        return 0.0
    if rows is None or rate <= 0:
        return None
    n = len(st["prompts"])
    left = rows * n - sum(c["done"] for c in st["prompts"].values()) - st["rejected"] * n
    return max(left, 0) / rate


def render_status(out: Path | str) -> tuple[str, bool]:
    """The status table of a local output directory or of one in a store (read from anywhere)."""
    from engine.output.remote import fetch_progress
    from engine.stores import is_remote

    if is_remote(str(out)):
        import tempfile
        with tempfile.TemporaryDirectory(prefix="engine-status-") as tmp:
            text, complete = _render(fetch_progress(str(out), Path(tmp)))
        return text.replace(tmp, str(out)), complete
    return _render(Path(out))


def _render(out: Path) -> tuple[str, bool]:
    fp_path = out / "_run" / "fingerprint.json"
    if not fp_path.exists():
        return f"{out}: no run here (no _run/fingerprint.json)", False
    fp = orjson.loads(fp_path.read_bytes())
    shards = fp.get("shard_count", 1)
    states = {st["shard"]: st for st in read_states(out)}
    now = time.time()
    lines = [f"{out}  model {fp.get('model')}  prompts {', '.join(fp.get('prompts', {}))}  shards {shards}",
             f"{'shard':<18}{'prompt':<14}{'done':>10}{'rows':>10}{'failed':>8}{'rejected':>9}{'out tok':>12}"
             f"{'tok/s':>9}{'ETA':>7}  {'updated':<10}state"]
    complete = running = stalled = 0
    tokens = rate = 0.0
    etas = []
    for i in range(shards):
        tag = shard_tag(i, shards)
        st = states.get(tag)
        if st is None:
            lines.append(f"{tag:<18}{'-':<14}{'':>10}{'':>10}{'':>8}{'':>9}{'':>12}{'':>9}{'':>7}  {'':<10}not started")
            continue
        if st["complete"]:
            state, complete = "complete", complete + 1
        elif now - st["updated_at"] > max(STALL_SECONDS, 10 * st.get("flush_seconds", 2)):
            state, stalled = "STALLED/stopped", stalled + 1
        else:
            state, running = "running", running + 1
            rate += st.get("output_tokens_per_s", 0)
        tokens += st.get("output_tokens", 0)
        eta = shard_eta(st)
        if state == "running":
            etas.append(eta)
        rows = st.get("input_rows")
        rows_s = f"{rows:,}" if rows is not None else "?"
        tok_s = f"{st.get('output_tokens', 0):,}"
        rate_s = f"{st.get('output_tokens_per_s', 0):,.0f}" if state == "running" else ""
        eta_s = _duration(eta) if state != "complete" else ""
        for j, (prompt, c) in enumerate(st["prompts"].items()):
            shard_cols = (tag, st["rejected"], tok_s, rate_s, eta_s, _age(st["updated_at"]), state) if j == 0 \
                else ("", "", "", "", "", "", "")
            t, rej, tk, rt, et, age, stt = shard_cols
            lines.append(f"{t:<18}{prompt:<14}{c['done']:>10,}{rows_s:>10}{c['failed']:>8,}{rej:>9}{tk:>12}"
                         f"{rt:>9}{et:>7}  {age:<10}{stt}")
    is_complete = complete == shards
    eta_all = _duration(max(etas)) if etas and None not in etas else "?"
    lines.append(f"{complete}/{shards} shards complete, {running} running, {stalled} stalled or stopped, "
                 f"{shards - len(states)} not started; output tokens this session {tokens:,.0f}; "
                 f"{rate:,.0f} tok/s now; ETA {eta_all if running else '-'}; "
                 f"run {'COMPLETE' if is_complete else 'not complete'}")
    return "\n".join(lines), is_complete
