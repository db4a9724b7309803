"""`engine status OUTPUT_DIR`: progress of every shard and prompt, from the shards' state files and leases.

A shard is "running" while its lease (output/lease.py) is live; "stopped" when the lease is released,
stale, or held by a process that is gone from this host (with the exit status its state file recorded,
or "killed or crashed" when none was); "complete" once stopped with its work done. Under Slurm (the state file's
`slurm` record: job, array task, restart count) the state names the task and attempt, and a shard
stopped with a resumable status is "requeued" (its task script requeues it). Rows and output
tokens are the shard's over every attempt; duplicate ids found in the stored parts are flagged.

A local output's committed parts are checked against their manifests (output/manifest.py): a part missing,
truncated or replaced (its size), unreadable, or with other row counts (`deep`: also its CRC-32) marks its
shard DAMAGED, named with what to do; so does a state file that does not read. Neither is complete.
"""
from __future__ import annotations

import time
from pathlib import Path

from engine.errors import RESUMABLE, ConfigError, ExitCode
from engine.gate import EXPLAINED
from engine.output.layout import REJECTED, fingerprint_layout, read_fingerprint, shard_tag
from engine.output.lease import read_lease, stale_reason
from engine.output.manifest import check_stream
from engine.output.record import ShardState, read_states
from engine.output.unit_status import render_units


def _age(ts: float) -> str:
    s = max(0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s / 60:.0f}m" if s < 6000 else f"{s / 3600:.1f}h"


def shard_eta(st: ShardState) -> float | None:
    rows, rate = st.input_rows, st.rates.requests_per_s
    if st.complete:
        return 0.0
    if rows is None or rate <= 0:
        return None
    n = len(st.prompts)
    left = rows * n - st.stored - st.rejected * n
    return max(left, 0) / rate


def render_status(out: Path | str, deep: bool = False) -> tuple[str, bool]:
    """The status table of a local output directory or of one in a store (read from anywhere); a local one's
    parts are checked (`deep`: their checksums too; a store's parts are not read)."""
    from engine.output.remote import fetch_progress
    from engine.stores import is_remote

    if is_remote(str(out)):
        import tempfile
        with tempfile.TemporaryDirectory(prefix="engine-status-") as tmp:
            text, complete = _render(fetch_progress(str(out), Path(tmp)), parts=None)
        return text.replace(tmp, str(out)), complete
    if not Path(out).is_dir():
        raise ConfigError(f"{out}: no such directory (give the output.dir of an `engine run`)")
    return _render(Path(out), parts="deep" if deep else "quick")


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


def shard_state(out: Path, st: ShardState) -> tuple[str, bool]:
    """(state text, running) of one shard from its state file and its lease."""
    lease = read_lease(out, st.shard)
    live = lease is not None and stale_reason(lease, float(lease.get("timeout", 60.0))) is None
    if live:
        return "running", True
    if st.complete:
        return "complete", False
    code = st.exit_status
    if code is None:
        why = "killed or crashed: no exit status recorded"
    else:
        name = ExitCode(code).name.lower().replace("_", " ") if code in ExitCode._value2member_map_ else "?"
        why = f"exit {code}, {name}"
    if lease is not None:
        why += f"; lease stale: {stale_reason(lease, float(lease.get('timeout', 60.0)))}"
    if code in RESUMABLE and st.slurm is not None:  # the task script requeues a resumable status: Slurm runs it again
        return f"requeued ({why})", False
    return f"stopped ({why})", False


def slurm_note(st: ShardState) -> str:
    """The Slurm task and attempt of the shard's last process (its state file), for the state column."""
    s = st.slurm
    return f"  [Slurm task {s.task}, attempt {s.restart_count + 1}]" if s else ""


def _render(out: Path, parts: str | None) -> tuple[str, bool]:
    """The table; `parts`: how the committed parts are checked ("quick", "deep", None: not at all)."""
    fp = read_fingerprint(out)
    if fp is None:
        return f"{out}: no run here (no _run/fingerprint.json)", False
    if fp.get("units"):  # workers claiming units (input.unit_rows > 0)
        return render_units(out, fp, parts, prompt_tokens_line)
    shards = fp.get("shard_count", 1)
    unreadable: dict[str, str] = {}
    states = {st.shard: st for st in read_states(out, unreadable)}
    damage: list[str] = []
    lines = [f"{out}  model {fp.get('model')}  prompts {', '.join(fp.get('prompts', {}))}  shards {shards}  "
             f"(columns left of | are per prompt, right of it per shard)",
             f"{'shard':<18}{'prompt':<14}{'stored':>10}{'failed':>8}{'useful tok':>12} |{'input rows':>11}"
             f"{'rejected':>9}{'out tok':>12}{'tok/s':>9}{'ETA':>7}  {'updated':<10}state"]
    complete = running = stopped = damaged = 0
    dupes: list[str] = []
    tokens = rate = 0.0
    etas = []
    for i in range(shards):
        tag = shard_tag(i, shards)
        st = states.get(tag)
        problems = [p for s in [*fp.get("prompts", {}), REJECTED] for p in check_stream(out, s, tag, parts == "deep")] \
            if parts else []
        damage += problems
        if tag in unreadable:
            damage.append(f"{unreadable[tag]}; `engine status` shows the other shards")
        if st is None:
            damaged += bool(problems) or tag in unreadable
            lines.append(f"{tag:<18}{'-':<14}{'':>10}{'':>8}{'':>12} |{'':>11}{'':>9}{'':>12}{'':>9}{'':>7}  {'':<10}"
                         + ("DAMAGED (state file unreadable)" if tag in unreadable else
                            "DAMAGED (parts)" if problems else "not started"))
            continue
        state, live = shard_state(out, st)
        if live:
            running += 1
            rate += st.rates.output_tokens_per_s
        elif problems:
            damaged += 1
        elif state == "complete":
            complete += 1
        else:
            stopped += 1
        rows_in = st.input_rows
        for prompt, c in st.prompts.items():
            stored = max(c.done, _part_rows(out / prompt, tag))  # the parts' footers: rows a state may miss
            extra = stored + st.rejected - rows_in if rows_in is not None else 0
            n = max(c.duplicates, extra)
            if n > 0:
                dupes.append(f"{tag}/{prompt}: {n:,} duplicate row(s) (ids stored more than once)")
        if dupes and state == "complete":
            state = "DUPLICATES"
        if problems and not live:
            state = f"DAMAGED ({len(problems)} part(s); {state})"
        tokens += st.output_tokens
        eta = shard_eta(st)
        if state == "running":
            etas.append(eta)
        rows_s = f"{rows_in:,}" if rows_in is not None else "?"
        tok_s = f"{st.output_tokens:,}"
        rate_s = f"{st.rates.output_tokens_per_s:,.0f}" if state == "running" else ""
        eta_s = _duration(eta) if state == "running" else ""  # a stopped shard has no ETA: it is not moving
        for j, (prompt, c) in enumerate(st.prompts.items()):
            shard_cols = (tag, rows_s, f"{st.rejected:,}", tok_s, rate_s, eta_s, _age(st.updated_at),
                          state + slurm_note(st)) if j == 0 else ("",) * 8
            t, rows_c, rej, tk, rt, et, age, stt = shard_cols
            lines.append(f"{t:<18}{prompt:<14}{c.done:>10,}{c.failed:>8,}{c.useful_tokens:>12,} |{rows_c:>11}"
                         f"{rej:>9}{tk:>12}{rt:>9}{et:>7}  {age:<10}{stt}")
    is_complete = complete == shards and not dupes and not damage
    eta_all = _duration(max(etas)) if etas and None not in etas else "?"
    totals = [st.totals for st in states.values()]
    this = sum(st.this_process.output_tokens for st in states.values())
    useful = sum(st.useful_tokens for st in states.values())
    useful_rate = sum(st.rates.useful_output_tokens_per_s for st in states.values() if shard_state(out, st)[1])
    lines += [f"WARNING DUPLICATES: {d}; `engine mix` / `export` use the first copy of each" for d in dupes]
    lines += [f"ERROR DAMAGED: {d}" for d in damage]
    lines.append(prompt_tokens_line(states.values(), fingerprint_layout(fp)))
    requeued = sum(shard_state(out, st)[0].startswith("requeued") for st in states.values())
    lines.append(EXPLAINED)  # the totals line stays last (scripts read it)
    lines.append(f"{complete}/{shards} shards complete, {running} running, {stopped} stopped"
                 f"{f', {damaged} DAMAGED' if damaged else ''}"
                 f"{f' ({requeued} requeued by Slurm)' if requeued else ''}, "
                 f"{shards - len(states) - len(unreadable)} not started; output tokens (every attempt, from the "
                 f"stored parts) "
                 f"{tokens:,.0f}, useful {useful:,} ({useful / max(tokens, 1):.0%}) "
                 f"over {sum(t.attempts for t in totals):,} attempt(s), "
                 f"{sum(t.generation_s for t in totals) / 60:,.1f} min generating; each shard's latest process "
                 f"alone: {this:,} output tokens; {rate:,.0f} tok/s now ({useful_rate:,.0f} useful); "
                 f"ETA {eta_all if running else '-'}; "
                 f"run {'COMPLETE' if is_complete else 'not complete'}")
    return "\n".join(lines), is_complete


def prompt_tokens_line(states, layout: str) -> str:
    """Prompt tokens of the stored rows per prompt and in all (every shard and attempt), and how many the backends
    served from their prefix caches (their own counts) or computed."""
    per: dict[str, list[int]] = {}
    for st in states:
        for prompt, c in st.prompts.items():
            acc = per.setdefault(prompt, [0, 0])
            acc[0] += c.prompt_tokens
            acc[1] += c.cached_prompt_tokens
    total, cached = sum(a for a, _ in per.values()), sum(b for _, b in per.values())
    each = "; ".join(f"{p} {a:,} (cached {b:,}, computed {a - b:,})" for p, (a, b) in per.items())
    return (f"prompt tokens ({layout}; the backends' own cache counts): {each or '-'}; all {total:,}, cached "
            f"{cached:,} ({cached / max(total, 1):.0%}), computed {total - cached:,}")
