"""The `engine` command line: parse, run one subcommand, and turn every failure into `error: ...` and its
exit status, in one place (`_handle`; the statuses and the exception tree are in engine/errors.py).

    parser.py     the subcommands, their options and defaults
    commands.py   run, status, report, launch, bench (the sweep of engine/bench), prompts
    handoff.py    mix, export nanotron / lighteval, compare
"""
from __future__ import annotations

import errno
import logging
import os
import sys

from engine.errors import EngineError, ExitCode, RunFailed, WriterError
from engine.signals import Interrupted, raise_on_signals, reap_children

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    raise_on_signals()  # from the first line: a SIGTERM or Ctrl-C at any moment ends with a documented status
    try:
        try:
            return _main(argv)
        finally:
            reap_children()
    except Interrupted as exc:  # also a second Ctrl-C during the clean-up: a message, never a traceback
        if exc.abort:
            print(f"aborted ({exc.signame} again): what was committed is kept and finished results still in the "
                  f"journal are recovered; run the same command again to resume.", file=sys.stderr)
        else:
            print(f"interrupted ({exc.signame}) before any work was in flight: nothing is lost; run the same "
                  f"command again to resume.", file=sys.stderr)
        return ExitCode.INTERRUPTED


def _main(argv: list[str] | None) -> int:
    from engine.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        return int(args.fn(args))
    except BrokenPipeError:  # `engine prompts show faq | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.OK
    except Exception as exc:  # noqa: BLE001 - the one handler: a message and a status, never a traceback
        return _handle(exc, args.verbose)


def _handle(exc: Exception, verbose: bool) -> int:
    """Print `error: ...` (and what to do next) for a failure; return its exit status."""
    if verbose:
        log.exception("%s", exc)
    exc = _disk_full(exc)
    if isinstance(exc, RunFailed):
        from engine.cli.commands import print_summary
        print_summary(exc.summary)
        cause = _disk_full(exc.cause)
        exc = _with_hint(cause, cause.hint if isinstance(cause, EngineError) and cause.hint else exc.hint,
                         exc.exit_code)
    if isinstance(exc, EngineError):
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(exc.hint, file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, (OSError, ValueError, RuntimeError)):  # e.g. a file that cannot be read: name it, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    raise exc  # a bug: the traceback is the report


def _disk_full(exc: BaseException) -> BaseException:
    """A full disk wherever it struck (a state file, the summary): one line naming the file, and how to resume."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return WriterError.writing(exc.filename or "the output directory", exc)
    return exc


def _with_hint(cause: BaseException, hint: str, code: int) -> EngineError:
    err = EngineError(str(cause))
    err.hint, err.exit_code = hint, code
    return err


