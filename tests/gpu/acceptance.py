"""The first thing to run on a GPU machine: every SGLang check that needs a GPU, PASS/FAIL per item.

    .venv/bin/python -m tests.gpu.acceptance [--model embedded|HUB_ID|DIR] [--docs 256] [--only 16,17]

Each item is a finding of ../shared/reviews/sglang-0.5.23-first-contact.md that cannot be settled
without a real `sglang.Engine`, checked through `engine run` exactly as a user runs it (a subprocess
in its own session, so a SIGKILL or a process left behind is seen). About 12 engine starts: under
10 minutes on one H100/H200 with the embedded SmolLM2-135M. Needs sglang 0.5.23 installed
(`pip install -e '.[sglang]'`) and, for `--model` other than the embedded one, the model on disk or
Hub access. Exit status: 0 when every item passes, 1 otherwise; 0 with "skipped" where there is no
CUDA device (`--no-gpu-check` runs it anyway: tests/test_sglang_backends.py runs every item on CPU
against the SGLang double, tests/doubles/sglang, so the script itself is tested in CI).

Items (review finding numbers):
   2/5  an in-process run end to end: every document once, no error rows, prefix cache hits
   4    our log lines after the Engine has started
   7    generations stop at the model's end of turn (not all `length`)
   29   output tok/s per GPU, divided by every GPU the engine uses (INFO)
   9    a document at the full budget gets every new token (ignore_eos, context 1024)
   11   top_k / min_p / repetition_penalty accepted by SGLang's sampler
   10   the same sampling.seed twice: identical outputs or not (INFO: needs deterministic inference)
   13   NGRAM speculative decoding with 8 draft tokens runs (tok/s as INFO)
   15   runs/tier1.toml and runs/tier2.toml start (memory fraction, CUDA graphs) with this model
   16   a scheduler process killed mid-run: status 4, summary written, resume -> exactly once
   17   Ctrl-C to the whole process group mid-run: status 3 (not a SIGKILL), resume -> exactly once (x2)
   19   no process left in the run's session after each of the above
   20   an argument SGLang rejects at start: status 2, not a resumable 4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.signals import session_processes
from tests.gpu.smoke import available  # the same "can this machine run SGLang" check

REPO = Path(__file__).resolve().parents[2]

RESULTS: list[tuple[str, str, str]] = []


def report(status: str, item: str, detail: str) -> bool:
    RESULTS.append((status, item, detail))
    print(f"{status:4}  {item:<40} {detail}", flush=True)
    return status != "FAIL"


def check(item: str, ok: bool, detail: str) -> bool:
    return report("PASS" if ok else "FAIL", item, detail)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


class Work:
    """A work directory with the documents and one config per item."""

    def __init__(self, root: Path, model: str, docs: int, timeout: float):
        from benchmarks.corpus import make_documents

        self.root, self.model, self.timeout = root, model, timeout
        self.inputs = {}
        for name, n in (("small", docs), ("large", docs * 8)):
            path = root / f"{name}.jsonl"
            path.write_text("".join(json.dumps(d) + "\n" for d in make_documents(n, seed=7)))
            self.inputs[name] = (path, n)
        long = root / "long.jsonl"  # no line or word break: cut to exactly the document budget
        long.write_text("".join(json.dumps({"id": f"long-{i}", "text": "".join(
            f"w{(i * 31 + j) % 997}" for j in range(4000))}) + "\n" for i in range(8)))
        self.inputs["long"] = (long, 8)

    def config(self, name: str, input_name: str = "small", **sections) -> tuple[Path, Path]:
        out = self.root / name
        data = {"input": {"paths": [str(self.inputs[input_name][0])]}, "output": {"dir": str(out), "flush_seconds": 1},
                "model": {"name": self.model}, "sampling": {"max_new_tokens": 256}, "report": {"enabled": True}}
        for sec, keys in sections.items():
            data.setdefault(sec, {}).update(keys)
        lines = [f"# gpu_acceptance item {name}", 'backend = "sglang"', 'prompts = ["faq"]']

        def table(prefix: str, keys: dict) -> None:
            lines.append(f"[{prefix}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items() if not isinstance(v, dict))
            for k, v in keys.items():
                if isinstance(v, dict):
                    table(f"{prefix}.{k}", v)
        for sec, keys in data.items():
            table(sec, keys)
        path = self.root / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path, out

    def start(self, cfg: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
        log = cfg.with_suffix(".log")
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg), *extra], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return proc, log

    def run(self, cfg: Path, *extra: str) -> tuple[int, str]:
        proc, log = self.start(cfg, *extra)
        rc = wait(proc, self.timeout)
        left = reap(proc.pid)
        check(f"19 nothing left after {cfg.stem}", not left, ", ".join(left) or "session empty")
        return rc, log.read_text()


def wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -999


def reap(sid: int, grace: float = 90) -> list[str]:
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not session_processes(sid):
            return []
        time.sleep(0.5)
    left = [f"{p.pid}:{p.info['name']}" for p in session_processes(sid)]
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return left


def rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    parts = sorted((out / "faq").glob("*.parquet"))
    return [r for p in parts for r in pq.read_table(p).to_pylist()]


def stored(out: Path) -> int:
    from engine.errors import ResumeError
    from engine.output.record import read_states
    try:
        return sum(st.stored for st in read_states(out))
    except (OSError, ValueError, ResumeError):
        return 0


def summary(out: Path) -> dict:
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def exactly_once(out: Path, n: int) -> tuple[bool, str]:
    ids = [r["id"] for r in rows(out)]
    return len(ids) == len(set(ids)) == n, f"{len(ids)} rows, {len(set(ids))} distinct ids, {n} documents"


def scheduler_children(pid: int) -> list:
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    named = []
    for k in kids:
        try:
            if "scheduler" in k.name() or "scheduler" in " ".join(k.cmdline()):
                named.append(k)
        except psutil.NoSuchProcess:
            pass
    return named


def wait_rows(proc: subprocess.Popen, out: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if stored(out) > 0:
            return True
        time.sleep(0.2)
    return False


# ---- items ---------------------------------------------------------------------------------------
def item_end_to_end(w: Work) -> dict:
    cfg, out = w.config("e2e")
    rc, log = w.run(cfg)
    s, got = summary(out), rows(out)
    n = w.inputs["small"][1]
    ok_once, detail = exactly_once(out, n)
    errors = sum(r["finish_reason"] == "error" for r in got)
    check("2/5 end to end", rc == 0 and ok_once and errors == 0,
          f"exit {rc}; {detail}; {errors} error rows; cache hit rate {s.get('prefix_cache_hit_rate', 0):.1%}")
    check("5 prefix cache hits", s.get("prefix_cache_hit_rate", 0) > 0.3,
          f"{s.get('prefix_cache_hit_rate', 0):.1%} of prompt tokens cached (shared template)")
    ready = log.find("backend ready")
    check("4 our logging after Engine start", ready >= 0 and "diversity report" in log[ready:],
          "'backend ready' and the report line logged" if ready >= 0 else "no 'backend ready' line in the log")
    stops = sum(r["finish_reason"] == "stop" for r in got)
    check("7 stops at the end of turn", stops > 0, f"{stops} of {len(got)} rows finished 'stop'")
    if rc == 0:
        from engine.bench.worker import gpus_used
        from engine.config.run_config import load_config
        from engine.model.locate import resolve_model

        conf = load_config(cfg)
        gpus = gpus_used(conf, resolve_model(conf.model.name, allow_hub=True)[0], None)
        report("INFO", "29 tok/s per GPU",
               f"{s['output_tokens_per_s'] / gpus:,.0f} output tok/s/GPU over {gpus} GPU(s) "
               f"(wall {s['wall_seconds']:.0f} s with the engine start)")
    return s


def item_token_cap(w: Work) -> None:
    cfg, out = w.config("cap", "long", model={"context": 1024},
                        sampling={"max_new_tokens": 64, "ignore_eos": True, "temperature": 0.0})
    rc, log = w.run(cfg)
    got = rows(out)
    comp = sorted({r["completion_tokens"] for r in got})
    prompt = sorted({r["prompt_tokens"] for r in got})
    check("9 full-budget documents get every token", rc == 0 and comp == [64] and len(got) == 8,
          f"exit {rc}; completion tokens {comp}; prompt tokens {prompt} (budget 1024 - 64 - 2 = 958)")


def item_sampling(w: Work) -> None:
    cfg, out = w.config("sampling", sampling={"max_new_tokens": 128, "top_k": 20, "min_p": 0.05,
                                              "repetition_penalty": 1.1})
    rc, log = w.run(cfg)
    check("11 top_k/min_p/repetition_penalty", rc == 0 and len(rows(out)) == w.inputs["small"][1],
          f"exit {rc}; {len(rows(out))} rows" + ("" if rc == 0 else f"; {tail(log)}"))


def item_seed(w: Work) -> None:
    texts = []
    for i in range(2):
        cfg, out = w.config(f"seed{i}", sampling={"max_new_tokens": 64, "temperature": 0.8, "seed": 1234})
        rc, log = w.run(cfg)
        texts.append({r["id"]: r["generation"] for r in rows(out)} if rc == 0 else None)
    same = texts[0] is not None and texts[0] == texts[1]
    report("INFO", "10 sampling.seed reproducible?", "identical outputs" if same else
           "outputs differ (expected unless enable_deterministic_inference: the README says so)")


def item_ngram(w: Work, base: dict) -> None:
    cfg, out = w.config("ngram", sglang={"server_args": {"speculative_algorithm": "NGRAM",
                                                         "speculative_num_draft_tokens": 8}})
    rc, log = w.run(cfg)
    s = summary(out)
    check("13 NGRAM speculation (8 drafts)", rc == 0 and len(rows(out)) == w.inputs["small"][1],
          f"exit {rc}" + (f"; {s['output_tokens_per_s']:,.0f} tok/s vs {base.get('output_tokens_per_s', 0):,.0f} "
                          "without" if rc == 0 else f"; {tail(log)}"))


def item_presets(w: Work) -> None:
    import tomllib

    for preset in ("tier1", "tier2"):
        data = tomllib.loads((REPO / "runs" / f"{preset}.toml").read_text())
        server = data.get("sglang", {}).get("server_args", {})
        cfg, out = w.config(preset, sglang={"server_args": server}, scheduler=data.get("scheduler", {}),
                            sampling={"max_new_tokens": 128})
        rc, log = w.run(cfg)
        check(f"15 runs/{preset}.toml starts and runs", rc == 0 and len(rows(out)) == w.inputs["small"][1],
              f"exit {rc}" + ("" if rc == 0 else f"; {tail(log)}"))


def item_child_killed(w: Work) -> None:
    cfg, out = w.config("killed", "large", sampling={"max_new_tokens": 512})
    proc, log = w.start(cfg)
    if not wait_rows(proc, out, w.timeout):
        wait(proc, 10)
        check("16 scheduler killed -> 4", False, f"no rows stored before the run ended ({tail(log.read_text())})")
        return
    kids = scheduler_children(proc.pid)
    for k in kids:
        k.kill()
    rc = wait(proc, w.timeout)
    left = reap(proc.pid)
    s = summary(out)
    check("16 scheduler killed -> 4", rc == 4 and s.get("complete") is False,
          f"killed {len(kids)} scheduler process(es); exit {rc}{sigkill(rc)}; "
          f"summary {'written' if s else 'missing'}")
    check("19 nothing left after the kill", not left, ", ".join(left) or "session empty")
    rc, _ = w.run(cfg)
    ok, detail = exactly_once(out, w.inputs["large"][1])
    check("16 resume after the kill", rc == 0 and ok, f"exit {rc}; {detail}")


def item_ctrl_c(w: Work, attempt: int) -> None:
    cfg, out = w.config(f"ctrlc{attempt}", "large", sampling={"max_new_tokens": 512})
    proc, log = w.start(cfg)
    if not wait_rows(proc, out, w.timeout):
        wait(proc, 10)
        check(f"17 Ctrl-C -> 3 (#{attempt})", False, f"no rows stored before the run ended ({tail(log.read_text())})")
        return
    os.killpg(proc.pid, signal.SIGINT)
    rc = wait(proc, w.timeout)
    left = reap(proc.pid)
    s = summary(out)
    check(f"17 Ctrl-C to the group -> 3 (#{attempt})", rc == 3 and bool(s),
          f"exit {rc}{sigkill(rc)}; summary {'written' if s else 'missing'}")
    check("19 nothing left after Ctrl-C", not left, ", ".join(left) or "session empty")
    rc, _ = w.run(cfg)
    ok, detail = exactly_once(out, w.inputs["large"][1])
    check(f"17 resume after Ctrl-C (#{attempt})", rc == 0 and ok, f"exit {rc}; {detail}")


def item_refused(w: Work) -> None:
    cfg, out = w.config("refused", sglang={"server_args": {"schedule_conservativeness": -1.0}})
    rc, log = w.run(cfg)
    check("20 argument refused at start -> 2", rc == 2, f"exit {rc}; {tail(log, 1)}")


def sigkill(rc: int) -> str:
    return " (SIGKILLed: SGLang's SIGQUIT path)" if rc in (-9, 137) else ""


def tail(text: str, n: int = 2) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])


ITEMS = ("2", "9", "11", "10", "13", "15", "16", "17", "20")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.gpu.acceptance", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--docs", type=int, default=256, help="documents per item (x8 for the kill / Ctrl-C items)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one engine run may take")
    ap.add_argument("--only", default="", help=f"comma-separated items (of {', '.join(ITEMS)})")
    ap.add_argument("--no-gpu-check", action="store_true", help="run without CUDA (against the SGLang double)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, outputs)")
    args = ap.parse_args(argv)
    if not args.no_gpu_check:
        why = available()
        if why:
            print(f"skipped: {why}")
            return 0
    only = set(filter(None, args.only.split(","))) or set(ITEMS)
    root = Path(tempfile.mkdtemp(prefix="gpu-acceptance-"))
    t0 = time.monotonic()
    try:
        w = Work(root, args.model, args.docs, args.timeout)
        base = item_end_to_end(w) if "2" in only or "13" in only else {}
        steps = {"9": lambda: item_token_cap(w), "11": lambda: item_sampling(w), "10": lambda: item_seed(w),
                 "13": lambda: item_ngram(w, base), "15": lambda: item_presets(w),
                 "16": lambda: item_child_killed(w), "17": lambda: [item_ctrl_c(w, i) for i in (1, 2)],
                 "20": lambda: item_refused(w)}
        for key in ITEMS[1:]:
            if key in only:
                try:
                    steps[key]()
                except Exception as exc:  # noqa: BLE001 - one broken item must not hide the others
                    report("FAIL", f"{key} (crashed)", f"{type(exc).__name__}: {exc}")
    finally:
        if args.keep:
            print(f"work directory: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    failed = [r for r in RESULTS if r[0] == "FAIL"]
    passed = sum(r[0] == "PASS" for r in RESULTS)
    print(f"\n{passed} passed, {len(failed)} failed in {time.monotonic() - t0:.0f} s"
          + (": " + "; ".join(f[1] for f in failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
