"""`tools/bench SWEEP.toml` (= `python -m engine.bench SWEEP.toml`): run a sweep, then write its report."""
from __future__ import annotations

import argparse
import signal
import sys

from engine.bench.driver import Driver
from engine.bench.report import write_report
from engine.bench.sweep import load_sweep
from engine.errors import ConfigError, EngineError, ExitCode
from engine.signals import stop_requested


def _interrupt(signum, _frame):
    stop_requested(signum)  # noted: seen even where the interpreter swallows the exception (driver._check_stop)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # from the first line: stop the running config's processes too
    ap = argparse.ArgumentParser(prog="tools/bench", description=__doc__)
    ap.add_argument("sweep", help="sweep file, e.g. runs/bench/cpu.toml")
    ap.add_argument("--models", help="comma-separated model labels to run (default: all)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a sweep key, e.g. 'data.paths=[\"/data/fw/*.parquet\"]' or "
                         "run.sampling.max_new_tokens=512")
    ap.add_argument("--retry-failed", action="store_true", help="rerun configs recorded as oom/timeout/failure")
    ap.add_argument("--report-only", action="store_true", help="write the report from the results so far")
    ap.add_argument("--dry-run", action="store_true", help="check every config and list them; run nothing")
    ap.add_argument("--gpu-hour-usd", type=float, help="price for the cost columns (default: the sweep's)")
    try:
        args = ap.parse_args(argv)
        sweep = load_sweep(args.sweep, args.set or [])
        models = sweep.models
        if args.models:
            wanted = [x.strip() for x in args.models.split(",") if x.strip()]
            unknown = set(wanted) - {m.label for m in models}
            if unknown:
                raise ConfigError(f"--models: unknown {', '.join(sorted(unknown))} "
                                  f"(the sweep has {', '.join(m.label for m in models)})")
            models = [m for m in models if m.label in wanted]
        driver = Driver(sweep, args.retry_failed)
        if args.dry_run:
            n = driver.check(models)
            for m in models:
                print(f"{m.label} ({m.name}): baseline + " + ", ".join(
                    f"{t.name} {len(sweep.expand(m, t, dict(m.set)))}" + (f" after {t.after}" if t.after else "")
                    for t in sweep.tiers))
            print(f"{n} configs, each in its own process (timeout {sweep.timeout_s:.0f} s); results in {sweep.results}")
            return 0
        records = driver.run(models, execute=not args.report_only)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        print("interrupted: finished configs are saved; run the same command again to resume.", file=sys.stderr)
        return ExitCode.INTERRUPTED
    files = write_report(sweep, records, args.gpu_hour_usd)
    print((files["markdown"]).read_text())
    print("written: " + ", ".join(str(p) for p in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
