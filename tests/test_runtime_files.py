"""runtime/files.py: the one reader of JSON objects and confined paths every layer uses."""

from __future__ import annotations

import os

import pytest

from ldm_rt.reference.checkpoint_errors import CheckpointError
from ldm_rt.reference.model_folder import read_json_object as reference_read_json_object
from ldm_rt.runtime.files import FileFormatError, inside, read_json_object
from ldm_rt.runtime.manifest import ArtifactError, json_object


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"[1]", "holds an array where a JSON object is expected; fix it"),
        (b"{", "is not valid JSON"),
        (b"\xff", "is not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "nests JSON too deeply"),
    ],
)
def test_every_layer_reports_a_bad_json_file_in_one_format(tmp_path, content, expected):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(FileFormatError) as e:
        read_json_object(path, fix="fix it")
    assert str(e.value).startswith(str(path)) and expected in str(e.value)
    # The artifacts reader and the reference loader say the same, each with its own type and advice.
    with pytest.raises(ArtifactError, match="rebuild the artifacts"):
        json_object(content, path)
    with pytest.raises(CheckpointError, match="re-download"):
        reference_read_json_object(path, "re-download it")


def test_sizes_are_bounded_before_reading_and_non_files_refused(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b'{"a": "' + b"x" * 100 + b'"}')
    with pytest.raises(FileFormatError, match="more than a scheduler config may have"):
        read_json_object(big, limit=64, what="scheduler config")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # must be refused at once, not block waiting for a writer
    with pytest.raises(FileFormatError, match="is not a regular file"):
        read_json_object(fifo)
    (tmp_path / "folder.json").mkdir()  # opens fine on Linux; reading it must still be the one-line refusal
    with pytest.raises(FileFormatError, match="is not a regular file"):
        read_json_object(tmp_path / "folder.json")
    with pytest.raises(FileFormatError, match="is missing"):
        read_json_object(tmp_path / "nothing.json")


def test_inside_confines_paths_and_may_let_only_the_last_link_leave(tmp_path):
    folder, elsewhere = tmp_path / "folder", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (elsewhere / "blob").write_text("{}")
    (folder / "link").symlink_to(elsewhere / "blob")
    (folder / "dir").symlink_to(elsewhere, target_is_directory=True)
    assert inside(folder, "a/b.json") == folder / "a" / "b.json"
    for bad in ("../x", "/etc/passwd", "a\\b", "C:x", "", "a\0b", "dir/blob"):
        assert inside(folder, bad) is None and inside(folder, bad, last_link_may_leave=True) is None
    assert inside(folder, "link") is None
    assert inside(folder, "link", last_link_may_leave=True) == folder / "link"  # a Hugging Face cache snapshot
