"""atomic_directory: the output path names a complete folder at every moment, and nothing but a folder is
replaced; explain_os_error: one line with the path and the fix."""

from __future__ import annotations

import errno
import os

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
