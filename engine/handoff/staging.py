"""Hand-off outputs appear whole or not at all.

`engine mix` and `engine export nanotron` write into a hidden folder beside OUT (`.OUT.partial-<pid>`)
and rename it to OUT at the end, so that a kill (the OOM killer, a lost node) leaves nothing a trainer's
glob would read as a dataset; a failure or Ctrl-C removes the folder, and one left by a killed process
is removed by the next attempt. When OUT exists it must be empty or `overwrite` given (each command
checks that first, then `clear`s what an earlier mix or export wrote there, so that a refused or failed
one leaves nothing of either). An empty OUT is replaced by the rename; one that holds other files
(nanotron's `checkpoints`, a user's notes) gets the new entries renamed into it, the record (`_mix.json`,
`_export.json`) last.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.atomic import fsync_dir

PARTIAL = ".partial-"


def work_folder(out: Path) -> Path:
    return out.parent / f".{out.name}{PARTIAL}{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Work folders of `out` left by processes that are gone (a killed mix or export); returns them."""
    found = []
    for p in out.parent.glob(f".{glob.escape(out.name)}{PARTIAL}*"):
        pid = p.name.rsplit(PARTIAL, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            found.append(p)
    return found


def _remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def clear(out: Path, ours: Callable[[str], bool]) -> None:
    """Remove what an earlier run of the command wrote in `out` (`--overwrite`); other entries stay."""
    if out.is_dir():
        for old in list(out.iterdir()):
            if ours(old.name):
                _remove(old)


@contextlib.contextmanager
def staged(out: Path, ours: Callable[[str], bool], last: tuple[str, ...] = ()) -> Iterator[Path]:
    """A hidden work folder beside `out` to write into; when the block ends without an error its entries
    become `out`'s (module doc), else it is removed. `ours(name)`: an entry of `out` an earlier run of the
    command wrote (replaced); `last`: entries moved last (the record that says the output is whole)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    work = work_folder(out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        publish(work, out, ours, last)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def publish(work: Path, out: Path, ours: Callable[[str], bool], last: tuple[str, ...] = ()) -> None:
    """Make the entries of `work` those of `out` (module doc)."""
    clear(out, ours)  # normally done already (overwrite): one written meanwhile is replaced, not mixed in
    if not out.exists() or not any(out.iterdir()):
        os.replace(work, out)  # rename(2): replaces an empty directory in one step
        fsync_dir(out.parent)
        return
    names = sorted((p.name for p in work.iterdir()), key=lambda n: (n in last, last.index(n) if n in last else 0, n))
    for name in names:
        os.replace(work / name, out / name)
    fsync_dir(out)
    work.rmdir()
