"""`engine status` of an output made by workers claiming units (input.unit_rows > 0; output/units.py).

Per prompt: rows, failed rows and useful tokens of the committed units (every worker and attempt). Units:
committed / claimed (by which worker: host, pid, since when, last heartbeat; `QUIET` when it missed two
heartbeats, `stale` once past the lease timeout: the next claim takes it over) / free / failed (its workers died
there MAX_FAILURES times: named with its input rows). The run's rate is the sum of the claimed units' current
rates (their state files), or, when none has one yet, the rows committed over the last RATE_WINDOW seconds;
the ETA is the rows left at that rate. COMPLETE only when every unit is committed and its files published,
no committed part is missing or damaged and no id is stored twice.
"""
from __future__ import annotations

import time
from pathlib import Path

from engine.gate import EXPLAINED
from engine.output.layout import REJECTED, fingerprint_layout, unit_tag
from engine.output.lease import describe
from engine.output.manifest import check_stream
from engine.output.record import load_state, read_states
from engine.output.units import MAX_FAILURES, gen_dir, unit_records, view

RATE_WINDOW = 600.0  # seconds of commits the rate falls back on


def _stamp(ts) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts)) if isinstance(ts, (int, float)) else "?"


def _rows(rec: dict | None) -> str:
    rows = (rec or {}).get("rows")
    return f"rows {rows[0]:,}-{rows[1] - 1:,}" if isinstance(rows, list) and len(rows) == 2 else "rows ?"


def _live_state(out: Path, tag: str, rec: dict):
    """The state file a unit's holder is writing in its own directory (None when there is none yet)."""
    path = gen_dir(out, tag, int(rec.get("gen", -1))) / "_state" / f"{tag}.json"
    try:
        return load_state(path)
    except Exception:  # noqa: BLE001 - not written yet, or being replaced: no figures for it
        return None


def render_units(out: Path, fp: dict, parts: str | None, prompt_tokens_line) -> tuple[str, bool]:
    """The status text and whether the run is complete; `prompt_tokens_line(states, layout)` is status.py's."""
    units = fp["units"]
    count, unit_rows = int(units["count"]), int(units["rows"])
    prompts = list(fp.get("prompts", {}))
    tags = [unit_tag(i, count) for i in range(count)]
    unreadable: dict[str, str] = {}
    states = {st.shard: st for st in read_states(out, unreadable) if st.shard in set(tags)}
    recs = unit_records(out, count)
    views = {t: view(t, recs.get(t)) for t in tags}
    by = {s: [t for t in tags if views[t].state == s] for s in ("committed", "running", "quiet", "stopped",
                                                                  "failed", "free")}
    lines = [f"{out}  model {fp.get('model')}  prompts {', '.join(prompts)}  {count:,} units of {unit_rows:,} input "
             f"rows (claimed by workers: README, \"Elastic scale-out\")",
             f"{'prompt':<14}{'stored':>12}{'failed':>9}{'useful tok':>14}{'out tok':>14}"]
    for p in prompts:
        figs = [st.prompts[p] for st in states.values() if p in st.prompts]
        lines.append(f"{p:<14}{sum(f.done for f in figs):>12,}{sum(f.failed for f in figs):>9,}"
                     f"{sum(f.useful_tokens for f in figs):>14,}{sum(f.output_tokens for f in figs):>14,}")
    # damage and duplicates of the committed units
    damage, dupes, unpublished = [], [], []
    for t in by["committed"]:
        by_gen = (views[t].record or {}).get("by_gen")
        if t not in states or (isinstance(by_gen, int) and gen_dir(out, t, by_gen).exists()):
            unpublished.append(t)
        if parts:
            damage += [d for s in [*prompts, REJECTED] for d in check_stream(out, s, t, parts == "deep")]
        st = states.get(t)
        for p, c in (st.prompts.items() if st else ()):
            extra = c.done + st.rejected - st.input_rows if st.input_rows is not None else 0
            if max(c.duplicates, extra) > 0:
                dupes.append(f"{t}/{p}: {max(c.duplicates, extra):,} duplicate row(s)")
    damage += [f"{msg}" for t, msg in unreadable.items()]
    # the claimed units, their workers and their rates
    rate = 0.0  # requests per second
    now = time.time()
    lines.append(f"claimed ({len(by['running']) + len(by['quiet']) + len(by['stopped'])}):")
    for t in by["running"] + by["quiet"] + by["stopped"]:
        rec = views[t].record or {}
        live = _live_state(out, t, rec)
        stored = f"{live.stored:,} row(s) stored" if live is not None else "starting"
        if live is not None and views[t].state != "stopped":
            rate += live.rates.requests_per_s
        what = {"running": "running", "quiet": "QUIET (missed two heartbeats)",
                "stopped": "stale: the next claim takes it over (its work is kept)"}[views[t].state]
        lines.append(f"  {t}  {_rows(rec)}  worker {describe(rec, now)}  {stored}  {what}"
                     f"  (attempt {int(rec.get('gen', 0)) + 1})")
    if by["failed"]:
        lines.append(f"failed ({len(by['failed'])}): their workers died there {MAX_FAILURES} times; fix the cause, "
                     f"then delete the lease records named to let workers claim them again:")
        for t in by["failed"]:
            lines.append(f"  {t}  {_rows(views[t].record)}  last worker {describe(views[t].record or {}, now)}  "
                         f"lease {out / '_lease'}/{t}.*.json")
    n = max(len(prompts), 1)
    total_rows = int(units.get("input_rows", count * unit_rows))
    if rate <= 0:  # nothing claimed reports a rate yet: the commits of the last minutes
        recent = [r for r in (views[t].record for t in by["committed"]) if r and
                  now - float(r.get("committed_at", 0)) <= RATE_WINDOW]
        first = min((float(r.get("since", now)) for r in recent), default=now)
        span = min(RATE_WINDOW, max(now - first, 1.0))
        rate = sum(r["rows"][1] - r["rows"][0] for r in recent if isinstance(r.get("rows"), list)) * n / span
    stored_requests = sum(st.stored for st in states.values())
    rejected = sum(st.rejected for st in states.values())
    left = 0
    for i, t in enumerate(tags):
        if views[t].state in ("committed", "failed"):
            continue
        left += (min((i + 1) * unit_rows, total_rows) - i * unit_rows) * n
        live = _live_state(out, t, views[t].record) if views[t].record is not None else None
        left -= (live.stored + live.rejected * n) if live is not None else 0
    done_all = len(by["committed"]) + len(by["failed"]) == count
    eta = "-" if done_all else "?" if rate <= 0 else _duration(max(left, 0) / rate)
    is_complete = len(by["committed"]) == count and not unpublished and not damage and not dupes
    lines += [f"WARNING DUPLICATES: {d}; `engine mix` / `export` use the first copy of each" for d in dupes]
    lines += [f"ERROR DAMAGED: {d}" for d in damage]
    if unpublished:
        lines.append(f"committed, files not all moved into the output yet ({len(unpublished)}: "
                     f"{', '.join(unpublished[:4])}): the next worker or `engine run` moves them")
    lines.append(prompt_tokens_line(states.values(), fingerprint_layout(fp)))
    lines.append(EXPLAINED)
    lines.append(f"{len(by['committed'])}/{count} units committed, {len(by['running']) + len(by['quiet'])} claimed "
                 f"({len(by['quiet'])} quiet), {len(by['stopped'])} stale, {len(by['free'])} free, "
                 f"{len(by['failed'])} failed; rows stored {stored_requests:,} (rejected input rows {rejected:,}); "
                 f"rate {rate * 60:,.0f} requests/min (the claimed units' current rates, else the last "
                 f"{RATE_WINDOW / 60:.0f} min of commits); ETA {eta}; "
                 f"run {'COMPLETE' if is_complete else 'not complete'}")
    return "\n".join(lines), is_complete


def _duration(s: float) -> str:
    return f"{s / 60:.0f}m" if s < 6000 else f"{s / 3600:.1f}h"

