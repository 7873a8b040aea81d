"""The folders a build writes (the artifacts folder, the Triton repository): never a user's, one build at a time.

A build replaces its output folder whole (runtime/atomic.atomic_directory). Before it starts, the target is
checked: a new path, an empty folder, or a folder this toolchain wrote (it holds our marker file: manifest.json
for artifacts) may be replaced; a file, or a folder with anything else in it, is refused with one line, so
`--out ~/Documents` never swaps a user's folder away.

For the whole build an exclusive `flock` is held on a hidden lock file beside the output
(`.NAME.lock`, removed at the end). A second build of the same output refuses at once instead of racing the first; and while
the lock is held, hidden leftovers of killed builds of that output (`.NAME.*.tmp` / `.NAME.*.old`, see
runtime/atomic.directory_leftovers) cannot belong to a live build, so they are removed. If a build was
killed between the two renames of a folder swap, the output is absent and the previous finished folder
is one of those leftovers: it is put back first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ldm_rt.export.errors import ExportError
from ldm_rt.runtime.atomic import directory_leftovers

log = logging.getLogger(__name__)


class OutputError(ExportError):
    """The output path cannot be used: not ours to replace, or another build holds it."""


def output_path(path: Path) -> Path:
    """An output path made absolute (so `.` and `..` name a real folder and its parent) and, when it is a
    symlink, resolved: the build replaces what it points at, not the link."""
    path = Path(os.path.abspath(path))
    return path.resolve() if path.is_symlink() else path


def _is_empty_folder(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


def check_output(path: Path, is_ours: Callable[[Path], bool], what: str) -> None:
    """Refuse `path` (one line) unless it is new, an empty folder, or a folder `is_ours` (an earlier `what`)."""
    if path.is_dir():
        if _is_empty_folder(path) or is_ours(path):
            return
        raise OutputError(
            f"{path} is a folder with other files in it, not an {what}; refusing to replace it: give a new or empty folder"
        )
    if os.path.lexists(path):  # a file, device, FIFO, socket or dangling symlink
        raise OutputError(f"{path} is a file, not a folder; give a new folder path for the {what} (or an existing one to rebuild)")


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _restore_or_remove_leftovers(path: Path, is_ours: Callable[[Path], bool]) -> None:
    """Called with the lock held: no live build of `path` owns any leftover."""
    leftovers = directory_leftovers(path)
    if not os.path.lexists(path):
        finished = [p for p in leftovers if is_ours(p)]
        if finished:
            newest = max(finished, key=lambda p: p.stat().st_mtime)
            os.rename(newest, path)  # a swap killed half-way: the last finished folder goes back in place
            log.warning("restored %s from %s, left by a build that was killed while replacing it", path, newest.name)
            leftovers.remove(newest)
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed %s, left by a killed build", p)


def _lock(path: Path) -> int:
    """An open fd holding the exclusive lock on `path`'s lock file; OutputError when another build holds it."""
    lock = _lock_path(path)
    # O_NOFOLLOW: a symlink planted as the lock file must not make us create a file elsewhere.
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    while True:
        fd = os.open(lock, flags, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputError(
                f"another build is writing {path} (it holds {lock.name}); wait for it to finish or choose another "
                "output folder"
            ) from None
        # The holder before us unlinks the file when it is done: a lock on an unlinked file guards nothing.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def claim_output(path: Path, is_ours: Callable[[Path], bool], what: str) -> Iterator[None]:
    """Hold `path` for one build: exclusive lock, refusal of what is not ours, leftovers cleared.
    OSError (a read-only or missing parent) propagates for the caller to report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(path)
    try:
        check_output(path, is_ours, what)  # again: it may have changed before the lock was ours
        _restore_or_remove_leftovers(path, is_ours)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_lock_path(path))  # while still holding it (see _lock), so no lock file is left behind
        os.close(fd)
