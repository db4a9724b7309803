"""Every failure the engine reports, and the exit status each one ends a command with.

The exception tree (each class says when it is raised; `exit_code` is what `engine` exits with):

    EngineError                      1  base of every error the engine raises on purpose
    ├── ConfigError                  2  a bad run config, --set or command-line value; nothing generated
    │   ├── PromptError              2  a prompt file that is missing or malformed
    │   ├── RenderError              2  a prompt and context that leave no room for the document
    │   ├── ResumeError              2  output.dir holds results of another configuration or input
    │   └── ProbeError               2  a server that answers, but not as the config says (http.model, http.api)
    ├── InputError                   1  a bad input file (named, with the row where there is one)
    │   └── InputChanged             1  an input file changed, was cut or removed while a run read it
    ├── WriterError                  1  writing the output failed (disk full, permissions): names the file
    ├── DamagedOutput                1  a file the engine wrote earlier is damaged (named, with what to do)
    ├── ModelError                   1  a model that cannot be found or converted
    ├── StoreError                   2  an object store refused (credentials, bucket); 4 when it stayed down
    ├── BackendDead                  4  the backend can serve no more requests (resumable)
    ├── TooManyErrors                5  more error rows than retry.max_error_fraction allows
    ├── LeaseHeld                    6  another live process holds this shard's lease (output/lease.py)
    ├── RunFailed                    *  a run that stopped with one of the above, carrying its summary
    ├── ShardFailed / ShardInterrupted  1 / 3  a shard run by `engine launch ray`
    └── SourceError, TokenFileError, CoverageError, CompareError, SweepError   1  hand-off and benchmarks

    Interrupted (a BaseException)    3  SIGTERM / SIGINT before there was work to finish (signals.py)

`ExitCode` is the one list of statuses; the README's exit-status table is tested against it
(tests/test_architecture.py). The CLI has one handler (engine/cli/__init__.py): it prints `error: ...`
(and the error's `hint`) and exits with `exit_code`.
"""
from __future__ import annotations

import errno
from enum import IntEnum

__all__ = [
    "ExitCode", "EngineError", "ConfigError", "PromptError", "RenderError", "ResumeError", "ProbeError",
    "InputError", "InputChanged", "WriterError", "DamagedOutput", "ModelError", "StoreError", "BackendDead",
    "TooManyErrors", "RunFailed",
    "ShardFailed", "ShardInterrupted", "SourceError", "TokenFileError", "CoverageError", "CompareError",
    "SweepError", "LeaseHeld", "RESUMABLE",
]


class ExitCode(IntEnum):
    """Exit statuses of `engine run` (and of every other subcommand where they apply)."""
    OK = 0  # complete
    ERROR = 1  # error: bad input file, writing failed (disk full, permissions)
    CONFIG = 2  # bad configuration or prompt; nothing generated
    INTERRUPTED = 3  # interrupted (SIGTERM, SIGINT): what finished is committed
    BACKEND_DEAD = 4  # the backend died or became unreachable
    TOO_MANY_ERRORS = 5  # finished, but error rows exceed retry.max_error_fraction: not complete
    LEASE_HELD = 6  # another live run holds this shard's lease: nothing was read or written


# a shard that ends so resumes by running again (LEASE_HELD: a requeued attempt whose old one still held the lease)
RESUMABLE = (ExitCode.INTERRUPTED, ExitCode.BACKEND_DEAD, ExitCode.LEASE_HELD)


class EngineError(Exception):
    """Base of every error the engine raises on purpose; `exit_code` is the status it ends a command with,
    `hint` an optional line printed after the message (what to do next)."""
    exit_code: int = ExitCode.ERROR
    hint: str | None = None


class ConfigError(EngineError, ValueError):
    """A bad value in a run config or on the command line; the message names the key."""
    exit_code = ExitCode.CONFIG


class PromptError(ConfigError):
    """A prompt name or file that cannot be loaded, or lacks a required key."""


class RenderError(ConfigError):
    """A prompt, context and max_new_tokens that leave no room for the document."""


class ResumeError(ConfigError):
    """output.dir holds results of a different configuration or input: resuming into it would mix them."""


class ProbeError(ConfigError):
    """A server that answers at start-up, but not as the config says (unknown model, wrong API)."""


class InputError(EngineError, ValueError):
    """Bad input that stops the run before generation; the message names the file (and row)."""


class InputChanged(InputError):
    """The input changed under a running run (a file cut, replaced or removed, or fewer or more rows read than
    counted at its start): what it stored is kept, but the run is not complete."""
    hint = ("What finished is saved, but it was made from an input that is not the recorded one. Put the recorded "
            "input back and run the same command again to resume, or start afresh (--overwrite, or another "
            "output.dir).")


class WriterError(EngineError, RuntimeError):
    """Writing the output failed (disk full, permissions); what was committed before stays readable."""

    @classmethod
    def writing(cls, path, exc: OSError) -> WriterError:
        """`exc`, raised while writing `path`, as a message naming the file; a full disk says how to go on."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            err = cls(f"{path}: no space left on device")
            err.hint = ("Free some space there (or give output.dir / output.staging_dir more room), then run the "
                        "same command again: it resumes, keeping every committed part and journaled row.")
            return err
        return cls(f"{path}: {exc.strerror or exc}")


class DamagedOutput(EngineError, RuntimeError):
    """A file the engine wrote and reads back (a committed part, the fingerprint, a state file) is damaged or
    missing; the message names it and says what to do."""


class ModelError(EngineError, RuntimeError):
    """A model that cannot be found, loaded or converted."""


class StoreError(EngineError, RuntimeError):
    """The store failed for good: after retries (`gave_up`: try again later, status 4), or a permanent error
    (credentials, a missing bucket or repository: fix the configuration, status 2)."""

    def __init__(self, message: str, gave_up: bool = False):
        super().__init__(message)
        self.gave_up = gave_up

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return ExitCode.BACKEND_DEAD if self.gave_up else ExitCode.CONFIG

    @property
    def hint(self) -> str | None:  # type: ignore[override]
        return "The store did not answer; nothing is lost: run the same command again to resume." \
            if self.gave_up else None


class BackendDead(EngineError, RuntimeError):
    """The backend cannot serve any more requests; the run ends, resumable."""
    exit_code = ExitCode.BACKEND_DEAD


class TooManyErrors(EngineError, RuntimeError):
    """More requests failed than `retry.max_error_fraction` allows: the cause is rarely the documents."""
    exit_code = ExitCode.TOO_MANY_ERRORS


class LeaseHeld(EngineError, RuntimeError):
    """Another live process holds the lease of this (output, shard): the message names it (host, pid, since,
    last heartbeat). Raised before anything in the output is read or written."""
    exit_code = ExitCode.LEASE_HELD
    hint = ("Only one run may write a shard. Wait for that run to end (or stop it), or raise "
            "output.lease_wait_seconds to wait for it; a lease whose holder died is taken over by the next run.")


class UnitTakenOver(LeaseHeld):
    """A worker's unit was taken over by another worker while this one was frozen or cut off (its heartbeat
    stalled past output.lease_timeout_seconds): its commit was refused and nothing it wrote is in the output."""
    hint = ("The unit is finished by the worker that holds it now. Raise output.lease_timeout_seconds if workers "
            "stall that long without being dead.")


class UnitsFailed(EngineError, RuntimeError):
    """Every unit of a run is committed or failed, and some failed: their workers died there MAX_FAILURES times.
    Not resumable as it is: a worker would die there again."""
    exit_code = ExitCode.ERROR
    hint = ("Look at the failed units' rows (their documents are what the workers died on: a memory blow-up, a "
            "crash of the engine), fix the cause, then delete their lease records (the files named above) and run "
            "again: the units are claimed afresh.")


class RunFailed(EngineError, RuntimeError):
    """A run that stopped with an error after its output was set up; carries the run's summary (printed
    before the message) and the status its cause maps to."""

    def __init__(self, code: int, summary, cause: BaseException):  # summary: output.record.RunSummary
        super().__init__(str(cause))
        self.code, self.summary, self.cause = code, summary, cause

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return self.code

    @property
    def hint(self) -> str:  # type: ignore[override]
        if getattr(self.cause, "hint", None):  # the cause knows better (a changed input, a store that gave up)
            return self.cause.hint
        if self.code == ExitCode.CONFIG:
            return "Nothing was generated; fix the configuration and run again."
        if self.code == ExitCode.TOO_MANY_ERRORS:
            return "The run is not complete."
        return "The run stopped; what finished is saved. Run the same command again to resume."


class ShardInterrupted(EngineError, RuntimeError):
    """`engine launch ray`: a shard was interrupted (resumable)."""
    exit_code = ExitCode.INTERRUPTED


class ShardFailed(EngineError, RuntimeError):
    """`engine launch ray`: a shard failed for good."""


class SourceError(EngineError, ValueError):
    """`engine mix` / `export` / `report`: a folder that is not an engine output, the output of an incomplete run
    (without --allow-incomplete), or a mix-in source that cannot be used as asked."""


class TokenFileError(EngineError, ValueError):
    """`engine export nanotron`: token files that cannot be written or read back."""


class CoverageError(EngineError, ValueError):
    """`engine export nanotron`: a training plan larger than the token folders (args: message, result)."""

    def __str__(self) -> str:
        return str(self.args[0])


class CompareError(EngineError, ValueError):
    """`engine compare`: results that cannot be compared as asked."""


class SweepError(EngineError, RuntimeError):
    """`engine bench`: a sweep file or a benchmark run that failed."""
