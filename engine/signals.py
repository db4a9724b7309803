"""SIGTERM and SIGINT at any moment of a command.

Until a run is generating, there is nothing to finish: a signal raises `Interrupted` (a
BaseException, like KeyboardInterrupt, so no `except Exception` swallows it) wherever the main thread
is (argument parsing, imports, model load, backend start), the `finally` blocks close what was
opened, and the command exits with status 3. While a run generates, `Run` replaces these handlers
with its own graceful one (stop admitting work, commit what finished, exit 3). Either way only the
first signal counts: a repeated SIGTERM is the same request, a second SIGINT aborts (`stop_requested`).
Once a run's outcome is decided (its state and summary written), `settle` ignores both: a signal while
the summary prints or the interpreter shuts down (Slurm's time limit, `scancel`) changes nothing.
`reap_children` ends whatever child process is still alive when a command ends (an engine whose
start-up was cut short), so that no engine process outlives us holding memory.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A SIGTERM or SIGINT arrived before there was work to finish; `abort`: a second SIGINT (Ctrl-C
    again) that cuts the clean-up after the first one short."""

    def __init__(self, signame: str, abort: bool = False):
        super().__init__(f"{signame} received")
        self.signame, self.abort = signame, abort


class _Stop:
    """The first stop request of this process. Slurm signals every process of a job (`scontrol requeue`,
    preemption, `scancel -f`) and the task script forwards its own SIGTERM too, and `scancel -b` may
    repeat one: a SIGTERM after the first signal is the same request (logged once, then ignored); a
    SIGINT after it is a user pressing Ctrl-C again, which aborts."""
    first: str | None = None
    repeats_logged = False


def stop_requested(signum: int) -> bool:
    """Note a SIGTERM/SIGINT; True for the first one of the process, False for a repeated SIGTERM (the
    same request). A SIGINT after the first signal raises Interrupted(abort=True)."""
    name = signal.Signals(signum).name
    if _Stop.first is None:
        _Stop.first = name
        return True
    if signum == signal.SIGINT:
        raise Interrupted(name, abort=True)
    if not _Stop.repeats_logged:
        _Stop.repeats_logged = True
        log.info("%s received again: already stopping (%s); the repeat is the same request", name, _Stop.first)
    return False


def first_signal() -> str | None:
    """The first SIGTERM/SIGINT this process noted, if any: also one whose `Interrupted` the interpreter
    swallowed (raised inside a callback whose exceptions are ignored, e.g. an at-fork hook while a
    backend spawns its processes)."""
    return _Stop.first


def _raise(signum, _frame) -> None:
    if stop_requested(signum):
        raise Interrupted(signal.Signals(signum).name)


def raise_on_signals() -> None:
    """Make SIGTERM and SIGINT raise `Interrupted` in the main thread from now on."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _raise)


def settle() -> None:
    """The command's work is done and its status known: ignore SIGTERM and SIGINT from now on (main thread
    only), so that the process ends with that status, quietly, whenever a signal comes: not 3 ("interrupted"),
    not a traceback from an atexit hook, not 143. SIG_IGN rather than a Python handler: CPython resets the
    handlers it installed to SIG_DFL while the interpreter finalises, never an ignored signal."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def signal_on_parent_death(sig: int):
    """A `preexec_fn` for subprocesses: Linux sends `sig` to the child when its parent dies (prctl
    PR_SET_PDEATHSIG), so that a killed sweep or Ray worker takes its engine run with it."""
    def preexec() -> None:
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    return preexec


def reap_children(grace_s: float = 10.0) -> list[str]:
    """Terminate (then kill) every descendant process still alive; return what was found."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return []
    try:
        children = psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for c in children:
        try:
            found.append(f"{c.pid} {c.name()}")
            c.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for c in alive:
        try:
            c.kill()
        except psutil.Error:
            pass
    if found:
        log.warning("ended %d child process(es) left behind: %s", len(found), ", ".join(found))
    return found


def session_processes(sid: int) -> list:
    """Every live process of session `sid` (a run started with start_new_session: it and all it spawned)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "name"]):
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, PermissionError):
            pass
    return out
