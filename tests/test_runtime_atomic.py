"""atomic_directory: the output path names a complete folder at every moment, and nothing but a folder is
replaced; explain_os_error: one line with the path and the fix."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from ldm_rt.runtime import atomic
from ldm_rt.runtime.atomic import NotAFileTarget, NotAFolderTarget, atomic_directory, directory_leftovers, exchange_paths, explain_os_error


def _folder(path, text):
    path.mkdir()
    (path / "data.txt").write_text(text)
    return path


def _exchange_works(tmp_path) -> bool:
    a, b = _folder(tmp_path / "probe_a", "a"), _folder(tmp_path / "probe_b", "b")
    return exchange_paths(a, b) and (a / "data.txt").read_text() == "b"


def test_replacing_swaps_in_one_step_and_never_renames_the_old_folder_away(tmp_path, monkeypatch):
    if not _exchange_works(tmp_path):
        pytest.skip("this platform or file system has no renameat2(RENAME_EXCHANGE); the fallback is tested below")
    out = _folder(tmp_path / "out", "old")
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(os.fspath(src)), real_replace(src, dst))[1])
    with atomic_directory(out) as tmp:
        (tmp / "data.txt").write_text("new")
    assert (out / "data.txt").read_text() == "new"
    assert str(out) not in renamed  # the two-rename window (old away, new in) is never opened
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "probe_a", "probe_b"]  # the old folder is gone


def test_without_exchange_a_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange_paths", lambda a, b: False)
    out = _folder(tmp_path / "out", "old")
    real_replace = os.replace

    def failing(src, dst):
        if os.fspath(dst) == str(out) and os.fspath(src).endswith(".tmp"):
            raise OSError(errno.EIO, "injected failure")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        with atomic_directory(out) as tmp:
            (tmp / "data.txt").write_text("new")
    assert (out / "data.txt").read_text() == "old"
    assert directory_leftovers(out) == []
    monkeypatch.setattr(os, "replace", real_replace)
    with atomic_directory(out) as tmp:  # and the fallback itself replaces
        (tmp / "data.txt").write_text("new")
    assert (out / "data.txt").read_text() == "new" and directory_leftovers(out) == []


def test_a_failing_block_leaves_the_old_folder_and_no_temp(tmp_path):
    out = _folder(tmp_path / "out", "old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "data.txt").write_text("half")
            raise RuntimeError("writer failed")
    assert (out / "data.txt").read_text() == "old" and directory_leftovers(out) == []


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_a_path_that_is_not_a_folder_is_refused_before_writing(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("user's file")
    else:
        os.mkfifo(out)
    with pytest.raises(NotAFolderTarget, match="not a folder"):
        with atomic_directory(out):
            raise AssertionError("the block must not run")
    assert (out.read_text() == "user's file") if kind == "file" else out.is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_symlinked_folder_becomes_the_new_folder_and_its_target_is_kept(tmp_path):
    target = _folder(tmp_path / "elsewhere", "old")
    out = tmp_path / "out"
    out.symlink_to(target)
    with atomic_directory(out) as tmp:
        (tmp / "data.txt").write_text("new")
    assert not out.is_symlink() and (out / "data.txt").read_text() == "new"
    assert (target / "data.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]


def test_leftovers_are_this_paths_hidden_temp_and_old_folders_only(tmp_path):
    for name in (".out.ab12cd34.tmp", ".out.zz99yy88.old", ".out.x.ab12cd34.tmp", ".outer.ab12cd34.tmp", ".out.ab12cd34.txt"):
        (tmp_path / name).mkdir()
    (tmp_path / ".out.file0000.tmp").write_text("a file, not a folder")
    assert [p.name for p in directory_leftovers(tmp_path / "out")] == [".out.ab12cd34.tmp", ".out.zz99yy88.old"]


def test_exchange_of_a_missing_path_is_an_oserror(tmp_path):
    if not _exchange_works(tmp_path):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    with pytest.raises(FileNotFoundError):
        exchange_paths(tmp_path / "probe_a", tmp_path / "missing")


def test_explain_os_error_names_the_path_and_the_fix():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/checkpoint")
    assert explain_os_error(full) == "/runs/x/checkpoint: No space left on device; the disk is full: free space or write somewhere else"
    assert explain_os_error(OSError(errno.EROFS, os.strerror(errno.EROFS))).endswith("read-only: write somewhere else")
    ours = NotAFileTarget("/dev/full is not a regular file; give a new file name")
    assert explain_os_error(ours) == str(ours)


def test_a_failed_atomic_write_names_the_target_not_the_temp(tmp_path, monkeypatch):
    """The user acts on the path they gave: every failure keeps its errno (so explain_os_error finds the fix)
    and names that path, never the hidden `.NAME.*.tmp` beside it; nothing is left behind."""
    out = tmp_path / "image.png"
    real_replace = os.replace

    def failing_replace(src, dst):  # as the real one words it: both names, the temp first
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), os.fspath(src), None, os.fspath(dst))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError) as e:
        atomic.atomic_write_bytes(out, b"data")
    assert (e.value.errno, e.value.filename, e.value.filename2) == (errno.EXDEV, str(out), None)
    monkeypatch.setattr(os, "replace", real_replace)

    def failing_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError) as e:  # a failed write through an open file names nothing at all
        atomic.atomic_write_bytes(out, b"data")
    assert explain_os_error(e.value) == f"{out}: Input/output error"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_folder_write_names_the_folder_and_leaves_other_files_their_names(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError) as e:
        with atomic_directory(out) as tmp:
            (tmp / "sub" / "data.txt").write_text("x")  # a file in the temp folder: named as the output
    assert e.value.filename == str(out)
    source = tmp_path / "missing-source.json"
    with pytest.raises(FileNotFoundError) as e:
        with atomic_directory(out):
            source.read_text()  # a file the block reads keeps its own name
    assert e.value.filename == str(source)
    with pytest.raises(NotAFolderTarget):  # our own errors pass unchanged
        with atomic_directory(out):
            out.write_text("a file appeared where the folder goes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(os.name != "posix", reason="needs RLIMIT_FSIZE")
def test_a_real_file_size_limit_names_the_output(tmp_path):
    """The kernel's own EFBIG from write(2) (Python ignores SIGXFSZ): one line naming the output and the fix."""
    out = tmp_path / "big.bin"
    code = (
        "import resource, sys; from ldm_rt.runtime.atomic import atomic_write_bytes, explain_os_error\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        f"try: atomic_write_bytes({str(out)!r}, bytes(1 << 16))\n"
        "except OSError as e: print(explain_os_error(e))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == f"{out}: File too large; the file is larger than this file system or the process's file size limit (ulimit -f) allows"
    assert list(tmp_path.iterdir()) == []
