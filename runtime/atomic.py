"""Write files and folders so that a reader never sees a half-written one: temp path, then rename. An OSError on
the way names the output path, never the hidden temp beside it (`naming`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# mkstemp/mkdtemp create private (0600/0700) entries; artifacts are read by other users (Triton, services).
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


class NotAFileTarget(OSError):
    """The output path exists and is not a regular file (a device, FIFO, socket or folder): renaming over it
    would replace the user's node, so nothing is written."""


def check_file_target(path: str | os.PathLike) -> Path:
    """`path` as a Path when it is new or an existing regular file (a symlink is judged by what it points at);
    else NotAFileTarget naming the path."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise NotAFileTarget(f"{path} cannot be checked ({e.strerror}); choose another output path") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise NotAFileTarget(f"{path} is {kind}; give a new file name or an existing regular file")
    return path


# What to do about a failed read or write, by errno (the rest get their strerror only).
_OS_ERROR_ADVICE = {
    errno.ENOSPC: "the disk is full: free space or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free space or write somewhere else",
    errno.EFBIG: "the file is larger than this file system or the process's file size limit (ulimit -f) allows",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "permission denied: fix the permissions or write somewhere else",
    errno.EPERM: "not permitted: fix the permissions or write somewhere else",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "the path is a folder where a file is expected: choose another path",
    errno.EEXIST: "something is already at the path: choose another path",
    errno.ENOENT: "a part of the path does not exist: check it",
}


def explain_os_error(e: OSError) -> str:
    """One line for a user: the path, what went wrong and what to do (the message alone for our own
    OSErrors such as NotAFileTarget, which already say it)."""
    if e.errno is None:
        return str(e)
    where = f"{e.filename}: " if e.filename is not None else ""
    advice = _OS_ERROR_ADVICE.get(e.errno)
    return f"{where}{e.strerror}" + (f"; {advice}" if advice else "")


def _about(e: OSError, temp: str | os.PathLike) -> bool:
    """Whether `e` concerns `temp` (names it or something under it) or names nothing (a write on an open file)."""
    names = [n for n in (e.filename, e.filename2) if n is not None]
    temp = Path(os.path.abspath(temp))
    for name in names:
        if not isinstance(name, (str, bytes, os.PathLike)):  # a file descriptor: ours, opened on the temp path
            return True
        if Path(os.path.abspath(os.fsdecode(name))).is_relative_to(temp):
            return True
    return not names


@contextlib.contextmanager
def naming(path: str | os.PathLike, temp: str | os.PathLike | None = None) -> Iterator[None]:
    """Re-raise an OSError met while writing `path` as one of the same errno whose filename is `path`: the user
    acts on the path they gave, not on the hidden temp file behind it, and explain_os_error still finds the fix.

    With `temp`, only errors about it are renamed (its name or anything under it, or no name at all: a write
    through an open file); others, such as a source file the block reads, keep their own name. Our own
    OSErrors (errno None: NotAFileTarget, NotAFolderTarget, ...) already name the path and pass unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno is None or (temp is not None and not _about(e, temp)):
            raise
        raise OSError(e.errno, e.strerror, os.fspath(path)) from None


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """`data` into the file `path`, flushed to disk before returning: a rename after it cannot reach the disk
    before the data it names (a power cut would leave an empty file under the final name)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        write_synced(tmp, data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path beside `path` for a writer that wants a file name (safetensors, onnx);
    renamed over `path` only if the block finishes."""
    path = check_file_target(path)
    with naming(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with naming(path, tmp):
            yield Path(tmp)
        with naming(path):
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class NotAFolderTarget(OSError):
    """The output path exists and is not a folder (a file, device, FIFO or socket): a folder is never swapped
    in over it, so nothing is replaced."""


# renameat2(2) flag: swap two existing paths in one step (Linux >= 3.15; ext4, xfs, btrfs, tmpfs, overlayfs, ...).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# What renameat2 answers where the kernel, libc or file system cannot exchange: then two renames are used.
_NO_EXCHANGE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths atomically (renameat2 RENAME_EXCHANGE): every reader of either path sees the
    old or the new entry, never none. False where the platform or file system cannot; OSError otherwise."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk, so the folder swapped in is whole after a power cut
    too (a rename can reach the disk before the data it names)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(folder)


def _fsync_dir(folder: str | os.PathLike) -> None:
    if os.name != "posix":  # only POSIX opens a folder to flush it
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def directory_leftovers(path: str | os.PathLike) -> list[Path]:
    """Hidden folders that `atomic_directory(path)` leaves beside `path` when its process is killed: a temp
    folder being written (`.NAME.*.tmp`; after a swap it holds the previous folder until removed), or, where
    no atomic swap exists, the previous folder renamed away (`.NAME.*.old`). Whether one is complete only
    its format can tell (e.g. a hash file written last)."""
    path = Path(path)
    # mkdtemp's random part has no dot, so `.NAME.x.abc.tmp` (a leftover of a sibling `NAME.x`) is not ours.
    pattern = re.compile(re.escape(f".{path.name}.") + r"[^.]+\.(tmp|old)")
    try:
        entries = sorted(os.listdir(path.parent))
    except FileNotFoundError:
        return []
    found = [path.parent / name for name in entries if pattern.fullmatch(name)]
    return [p for p in found if p.is_dir() and not p.is_symlink()]


def _check_folder_target(path: Path) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise NotAFolderTarget(f"{path} exists and is not a folder; give a new path or an existing folder of this kind")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temp folder beside `path`; on success it replaces `path` whole, so `path` always names
    a complete folder: the old one until the swap, the new one after.

    Where renameat2(RENAME_EXCHANGE) works (Linux) the two are swapped in one step and the old folder is then
    removed. Elsewhere the old folder is renamed away (`.NAME.*.old`) and the new one renamed in: a process
    killed between the two leaves `path` absent with both folders beside it (see `directory_leftovers`;
    training checkpoints recover from that state on resume). An existing `path` that is not a folder is
    refused (NotAFolderTarget) before anything is written."""
    path = Path(path)
    _check_folder_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming(path):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old: Path | None = None
    try:
        with naming(path, tmp):
            yield tmp
        with naming(path):
            os.chmod(tmp, DIR_MODE)
            _fsync_tree(tmp)
            _check_folder_target(path)  # again: it may have appeared while the block ran
            if os.path.lexists(path) and exchange_paths(tmp, path):
                old = tmp  # the temp name now holds the previous folder
            elif os.path.lexists(path):
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
                os.rmdir(old)
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old, path)  # put the previous folder back rather than leave `path` absent
                    old = None
                    raise
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
    finally:
        for leftover in (old, tmp):
            if leftover is None or not os.path.lexists(leftover):
                continue
            if os.path.islink(leftover):  # a symlinked `path` that was swapped out: drop the link, not its target
                os.unlink(leftover)
            else:
                shutil.rmtree(leftover, ignore_errors=True)
