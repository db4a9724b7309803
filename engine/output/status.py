"""`engine status OUTPUT_DIR`: progress of every shard and prompt, from the shards' state files and leases.

A shard is "running" while its lease (output/lease.py) is live; "stopped" when the lease is released,
stale, or held by a process that is gone from this host (with the exit status its state file recorded,
or "killed or crashed" when none was); "complete" once stopped with its work done. Under Slurm (the state file's
`slurm` record: job, array task, restart count) the state names the task and attempt, and a shard
stopped with a resumable status is "requeued" (its task script requeues it). Rows and output
tokens are the shard's over every attempt; duplicate ids found in the stored parts are flagged.
"""
from __future__ import annotations

import time
from pathlib import Path

import orjson

from engine.errors import RESUMABLE, ConfigError, ExitCode
from engine.output.layout import read_states, shard_tag
from engine.output.lease import read_lease, stale_reason


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
    if not Path(out).is_dir():
        raise ConfigError(f"{out}: no such directory (give the output.dir of an `engine run`)")
    return _render(Path(out))


def _part_rows(folder: Path, tag: str) -> int:
    """Rows of a shard's committed parts, from their footers (a local output; 0 for a store's)."""
    import pyarrow.parquet as pq

    total = 0
    for part in folder.glob(f"part-{tag}-*.parquet"):
        try:
            total += pq.ParquetFile(part).metadata.num_rows
        except Exception:  # noqa: BLE001 - a part being replaced just now: the state file's count stands
            continue
    return total


def shard_state(out: Path, st: dict) -> tuple[str, bool]:
    """(state text, running) of one shard from its state file and its lease."""
    lease = read_lease(out, st["shard"])
    live = lease is not None and stale_reason(lease, float(lease.get("timeout", 60.0))) is None
    if live:
        return "running", True
    if st.get("complete"):
        return "complete", False
    code = st.get("exit_status")
    if code is None:
        why = "killed or crashed: no exit status recorded"
    else:
        name = ExitCode(code).name.lower().replace("_", " ") if code in ExitCode._value2member_map_ else "?"
        why = f"exit {code}, {name}"
    if lease is not None:
        why += f"; lease stale: {stale_reason(lease, float(lease.get('timeout', 60.0)))}"
    if code in RESUMABLE and "slurm" in st:  # the task script requeues a resumable status: Slurm runs it again
        return f"requeued ({why})", False
    return f"stopped ({why})", False


def slurm_note(st: dict) -> str:
    """The Slurm task and attempt of the shard's last process (its state file), for the state column."""
    s = st.get("slurm")
    return f"  [Slurm task {s['task']}, attempt {s.get('restart_count', 0) + 1}]" if s else ""


def _render(out: Path) -> tuple[str, bool]:
    fp_path = out / "_run" / "fingerprint.json"
    if not fp_path.exists():
        return f"{out}: no run here (no _run/fingerprint.json)", False
    fp = orjson.loads(fp_path.read_bytes())
    shards = fp.get("shard_count", 1)
    states = {st["shard"]: st for st in read_states(out)}
    lines = [f"{out}  model {fp.get('model')}  prompts {', '.join(fp.get('prompts', {}))}  shards {shards}",
             f"{'shard':<18}{'prompt':<14}{'done':>10}{'rows':>10}{'failed':>8}{'useful tok':>12}{'rejected':>9}"
             f"{'out tok':>12}"
             f"{'tok/s':>9}{'ETA':>7}  {'updated':<10}state"]
    complete = running = stopped = 0
    dupes: list[str] = []
    tokens = rate = 0.0
    etas = []
    for i in range(shards):
        tag = shard_tag(i, shards)
        st = states.get(tag)
        if st is None:
            lines.append(f"{tag:<18}{'-':<14}{'':>10}{'':>10}{'':>8}{'':>12}{'':>9}{'':>12}{'':>9}{'':>7}  {'':<10}"
                         "not started")
            continue
        state, live = shard_state(out, st)
        if live:
            running += 1
            rate += st.get("output_tokens_per_s", 0)
        elif state == "complete":
            complete += 1
        else:
            stopped += 1
        rows_in = st.get("input_rows")
        for prompt, c in st["prompts"].items():
            stored = max(c["done"], _part_rows(out / prompt, tag))  # the parts' footers: rows a state may miss
            extra = stored + st["rejected"] - rows_in if rows_in is not None else 0
            n = max(c.get("duplicates", 0), extra)
            if n > 0:
                dupes.append(f"{tag}/{prompt}: {n:,} duplicate row(s) (ids stored more than once)")
        if dupes and state == "complete":
            state = "DUPLICATES"
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
            shard_cols = (tag, st["rejected"], tok_s, rate_s, eta_s, _age(st["updated_at"]), state + slurm_note(st)) \
                if j == 0 \
                else ("", "", "", "", "", "", "")
            t, rej, tk, rt, et, age, stt = shard_cols
            lines.append(f"{t:<18}{prompt:<14}{c['done']:>10,}{rows_s:>10}{c['failed']:>8,}"
                         f"{c.get('useful_tokens', 0):>12,}{rej:>9}{tk:>12}"
                         f"{rt:>9}{et:>7}  {age:<10}{stt}")
    is_complete = complete == shards and not dupes
    eta_all = _duration(max(etas)) if etas and None not in etas else "?"
    totals = [st.get("totals", {}) for st in states.values()]
    this = sum(st.get("this_process", {}).get("output_tokens", 0) for st in states.values())
    useful = sum(c.get("useful_tokens", 0) for st in states.values() for c in st["prompts"].values())
    useful_rate = sum(st.get("useful_output_tokens_per_s", 0) for st in states.values() if shard_state(out, st)[1])
    lines += [f"WARNING DUPLICATES: {d}; `engine mix` / `export` use the first copy of each" for d in dupes]
    requeued = sum(shard_state(out, st)[0].startswith("requeued") for st in states.values())
    lines.append(f"{complete}/{shards} shards complete, {running} running, {stopped} stopped"
                 f"{f' ({requeued} requeued by Slurm)' if requeued else ''}, "
                 f"{shards - len(states)} not started; output tokens (every attempt, from the stored parts) "
                 f"{tokens:,.0f}, useful {useful:,} ({useful / max(tokens, 1):.0%}: rows finished by the model) "
                 f"over {sum(t.get('attempts', 1) for t in totals):,} attempt(s), "
                 f"{sum(t.get('generation_s', 0) for t in totals) / 60:,.1f} min generating; the last process of "
                 f"each shard {this:,}; {rate:,.0f} tok/s now ({useful_rate:,.0f} useful); "
                 f"ETA {eta_all if running else '-'}; "
                 f"run {'COMPLETE' if is_complete else 'not complete'}")
    return "\n".join(lines), is_complete
