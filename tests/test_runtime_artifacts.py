"""Opening an artifacts folder that someone else wrote: every path it names stays inside it, every JSON file is
bounded and of the right kind, and each refusal is one line naming the file (runtime/manifest.py, artifacts.py).

The hostile folders are copies of the shipped default model (engines/default/artifacts; ONNX files hard-linked,
JSON files copied) with one entry or file changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from ldm_rt.runtime.artifacts import Artifacts, default_artifacts_dir
from ldm_rt.runtime.cli import main as cli_main
from ldm_rt.runtime.files import inside
from ldm_rt.runtime.manifest import MANIFEST, MAX_MANIFEST_BYTES, ArtifactError, FileEntry, Manifest
from ldm_rt.runtime.schedulers import SchedulerConfigError
from ldm_rt.runtime.tokenizer import TokenizerError

OUTSIDE = "lies outside the artifacts folder"

# Paths opened while `opened_paths` is active, from Python's "open" audit event (builtins.open, io.open, os.open).
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one records only inside opened_paths()


@contextmanager
def opened_paths():
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


@pytest.fixture
def copy(tmp_path) -> Path:
    """A writable copy of the default model's artifacts in tmp_path/artifacts (ONNX hard-linked: fast, and inside)."""
    dst = tmp_path / "artifacts"

    def link_or_copy(src, dst):
        if str(src).endswith(".json"):
            return shutil.copy2(src, dst)
        try:
            return os.link(src, dst)
        except OSError:  # another filesystem
            return shutil.copy2(src, dst)

    shutil.copytree(default_artifacts_dir(), dst, copy_function=link_or_copy)
    return dst


def edit_manifest(folder: Path, change) -> None:
    d = json.loads((folder / MANIFEST).read_text())
    change(d)
    (folder / MANIFEST).write_text(json.dumps(d))


def rewrite_side_file(folder: Path, key: str, data: bytes) -> Path:
    """Replace the file behind manifest[key] (tokenizer, scheduler) and record its new hash, so only its content is bad."""
    d = json.loads((folder / MANIFEST).read_text())
    path = folder / d[key]["file"]
    path.write_bytes(data)
    d[key].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (folder / MANIFEST).write_text(json.dumps(d))
    return path


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.endswith("rebuild the artifacts"), message
    return message


# ---- paths named by the manifest stay inside the folder ------------------------------------------------------

HOSTILE = ["../secret.json", "../../secret.json", "onnx/../../secret.json", "/etc/shadow", "/etc/passwd", "link.json",
           "onnx/linked_dir/secret.json", "C:/Windows/win.ini", "..\\secret.json", "tokenizer.json\0.txt", ""]


def plant_links(tmp_path: Path, folder: Path) -> None:
    """Symlinks inside the folder that lead out of it, and the secret they lead to."""
    (tmp_path / "secret.json").write_text('{"password": "hunter2"}')
    (folder / "link.json").symlink_to(tmp_path / "secret.json")
    (folder / "onnx" / "linked_dir").symlink_to(tmp_path)


@pytest.mark.parametrize("rel", HOSTILE)
@pytest.mark.parametrize("key", ["tokenizer", "scheduler"])
def test_side_files_outside_the_folder_are_refused_before_they_are_opened(rel, key, copy, tmp_path):
    plant_links(tmp_path, copy)
    edit_manifest(copy, lambda d: d[key].update(file=rel))
    with opened_paths() as opened, pytest.raises(ArtifactError) as e:
        Artifacts.open(copy)
    message = one_line(e)
    assert repr(rel) in message and str(copy / MANIFEST) in message and OUTSIDE in message
    # Nothing outside the folder was opened: the secret's content, size and existence were never looked at.
    assert opened and all(Path(p).is_relative_to(copy) and not Path(p).is_symlink() for p in opened), opened


@pytest.mark.parametrize("rel", ["../secret.json", "absolute", "link.json"])
def test_the_refusal_does_not_tell_whether_the_target_exists(rel, copy, tmp_path):
    plant_links(tmp_path, copy)
    rel = str(tmp_path / "secret.json") if rel == "absolute" else rel
    edit_manifest(copy, lambda d: d["tokenizer"].update(file=rel))
    with pytest.raises(ArtifactError) as exists:
        Artifacts.open(copy)
    (tmp_path / "secret.json").unlink()
    with pytest.raises(ArtifactError) as missing:
        Artifacts.open(copy)
    assert str(exists.value) == str(missing.value)


@pytest.mark.parametrize("rel", ["../secret.json", "/etc/passwd", "link.json", "onnx/linked_dir/secret.json"])
@pytest.mark.parametrize("slot", ["onnx", "external_data", "ort"])
def test_onnx_external_data_and_ort_variant_paths_are_confined(rel, slot, copy, tmp_path):
    plant_links(tmp_path, copy)
    entry = {"file": rel, "sha256": "0" * 64, "bytes": 23}
    if slot == "ort":
        entry = {"onnx": entry}
    edit_manifest(copy, lambda d: d["components"]["unet"]["precisions"]["fp32"].update({slot: entry}))
    m = Manifest.read(copy)
    pe = m.components["unet"].precisions["fp32"]
    target = {"onnx": pe.onnx, "external_data": pe.external_data, "ort": pe.ort and pe.ort.onnx}[slot]
    with opened_paths() as opened, pytest.raises(ArtifactError, match=OUTSIDE) as e:
        m.verify_file(copy, target)
    one_line(e)
    assert opened == []


def test_a_hostile_manifest_through_the_cli_is_one_line_exit_2(copy, tmp_path, capsys):
    (tmp_path / "secret.json").write_text("{}")
    # The ONNX Runtime variant: the file the onnxruntime backend opens for the shipped UNet.
    edit_manifest(copy, lambda d: d["components"]["unet"]["precisions"]["fp32"]["ort"]["onnx"].update(file="../secret.json"))
    out = tmp_path / "out.png"
    code = cli_main(["sample", "--model", str(copy), "--prompt", "a red circle", "--steps", "1", "--out", str(out)])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.count("\n") == 1 and OUTSIDE in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_a_manifest_that_is_a_symlink_out_of_the_folder_is_refused(copy, tmp_path):
    (tmp_path / "manifest.json").write_bytes((copy / MANIFEST).read_bytes())
    (copy / MANIFEST).unlink()
    (copy / MANIFEST).symlink_to(tmp_path / "manifest.json")
    with opened_paths() as opened, pytest.raises(ArtifactError, match=OUTSIDE) as e:
        Artifacts.open(copy)
    one_line(e)
    assert opened == []


def test_inside_decides_from_names_and_links(tmp_path):
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "blob").write_text("x")
    (folder / "sub" / "file_link").symlink_to(tmp_path / "blob")  # a file linked out, as in a Hugging Face cache
    (folder / "dir_link").symlink_to(tmp_path)  # a folder linked out
    assert inside(folder, "sub/a.json") == folder / "sub" / "a.json"
    for rel in ("../blob", "/etc/passwd", "sub/../../blob", "dir_link/blob", "sub/file_link", "a\\b", "C:/a", "a\0b", "", 5):
        assert inside(folder, rel) is None, rel
    # Only the folders must stay inside: the file itself may link out, a folder still may not.
    assert inside(folder, "sub/file_link", last_link_may_leave=True) == folder / "sub" / "file_link"
    assert inside(folder, "dir_link/blob", last_link_may_leave=True) is None


def test_symlinks_that_stay_inside_the_folder_are_followed(copy):
    """Confinement is about where a file is, not how it is named: an internal symlink still works."""
    (copy / "tok.json").symlink_to(copy / "tokenizer.json")
    edit_manifest(copy, lambda d: d["tokenizer"].update(file="tok.json"))
    assert Artifacts.open(copy).tokenizer is not None


# ---- JSON files: bounded, UTF-8, valid, and an object where one is expected ------------------------------------

@pytest.mark.parametrize("content, says", [
    (b"[1, 2]", "holds an array where a JSON object is expected"),
    (b'"format"', "holds a string where a JSON object is expected"),
    (b"5", "holds a number where a JSON object is expected"),
    (b"null", "holds null where a JSON object is expected"),
    (b'{"format": "ldm-rt-artifacts", \xff}', "is not UTF-8 text"),
    (b'{"format": ', "is not valid JSON"),
    (b"[" * 200_000 + b"]" * 200_000, "nests JSON too deeply"),
    (b'{"n": ' + b"9" * 5000 + b"}", "is not valid JSON"),
])
def test_a_manifest_of_the_wrong_kind_is_one_line_naming_it(content, says, copy):
    (copy / MANIFEST).write_bytes(content)
    with pytest.raises(ArtifactError) as e:
        Artifacts.open(copy)
    message = one_line(e)
    assert message.startswith(f"{copy / MANIFEST} ") and says in message


@pytest.mark.parametrize("change, says", [
    (lambda d: d.update(components=[]), "components must be a JSON object"),
    (lambda d: d["components"].update(unet=[]), "components.unet must be a JSON object"),
    (lambda d: d["components"]["unet"]["precisions"]["fp32"].update(onnx=None), "components.unet.precisions.fp32.onnx must be a JSON object"),
    (lambda d: d["components"]["unet"]["precisions"]["fp32"]["onnx"].update(file=7), "file and sha256 must be strings"),
    (lambda d: d["components"]["unet"]["precisions"]["fp32"]["onnx"].update(bytes="7"), "bytes must be a non-negative integer"),
    (lambda d: d["facts"].update(latent_factor="4"), "ModelFacts field latent_factor has the wrong type"),
    (lambda d: d["profile"].update(batch=[1, 4]), "profile.batch must be [min, opt, max]"),
    (lambda d: d.update(source=["x"]), "source must be a JSON object"),
    (lambda d: d["source"].update(sha256=5), "source.sha256 must be a string"),
])
def test_manifest_fields_of_the_wrong_kind_are_one_line(change, says, copy):
    edit_manifest(copy, change)
    with pytest.raises(ArtifactError, match="is malformed") as e:
        Artifacts.open(copy)
    assert says in one_line(e)


def test_an_oversized_manifest_is_refused_without_reading_it(copy):
    with open(copy / MANIFEST, "r+b") as f:
        f.truncate(2 << 30)  # a sparse 2 GB file: costs no disk, and would cost 2 GB of memory if read
    with opened_paths(), pytest.raises(ArtifactError) as e:
        Artifacts.open(copy)
    assert f"is {2 << 30} bytes, more than a manifest may have ({MAX_MANIFEST_BYTES})" in one_line(e)


def test_an_oversized_side_file_is_refused_before_it_is_touched(copy):
    big = 10**10
    edit_manifest(copy, lambda d: d["tokenizer"].update(bytes=big))
    with opened_paths() as opened, pytest.raises(ArtifactError) as e:
        Artifacts.open(copy)
    assert f"at {big} bytes, more than a tokenizer.json may have" in one_line(e)
    assert opened == [str(copy / MANIFEST)]


@pytest.mark.parametrize("content", [b"[1]", b'"tokenizer"', b"3"])
def test_a_tokenizer_json_of_the_wrong_kind_is_one_line_naming_it(content, copy):
    path = rewrite_side_file(copy, "tokenizer", content)
    with pytest.raises(TokenizerError) as e:
        Artifacts.open(copy)
    assert str(e.value).startswith(f"{path} is not a valid tokenizer.json (") and "\n" not in str(e.value)


def test_a_tokenizer_json_that_is_not_utf8_is_one_line(copy):
    path = rewrite_side_file(copy, "tokenizer", (default_artifacts_dir() / "tokenizer.json").read_bytes() + b"\xff\xfe")
    with pytest.raises(ArtifactError) as e:
        Artifacts.open(copy)
    assert one_line(e).startswith(f"{path} is not UTF-8 text")


@pytest.mark.parametrize("content, error, says", [
    (b'["DDIMScheduler"]', ArtifactError, "holds an array where a JSON object is expected"),
    (b"1.5", ArtifactError, "holds a number where a JSON object is expected"),
    (b'{"beta_start": 0.1,', ArtifactError, "is not valid JSON"),
    (b'{"beta_start": "0.1"}', SchedulerConfigError, "scheduler config field beta_start has the wrong type"),
])
def test_a_scheduler_config_of_the_wrong_kind_is_one_line_naming_it(content, error, says, copy):
    path = rewrite_side_file(copy, "scheduler", content)
    with pytest.raises(error) as e:
        Artifacts.open(copy)
    message = str(e.value)
    assert message.startswith(f"{path}") and says in message and "\n" not in message


def test_a_side_file_is_parsed_from_the_bytes_that_were_hashed(copy):
    """A scheduler config changed after the manifest was written is refused, not parsed."""
    (copy / "scheduler_config.json").write_text('{"prediction_type": "epsilon"}')
    with pytest.raises(ArtifactError, match="does not match the manifest's hash"):
        Artifacts.open(copy)


def test_file_entries_are_typed_where_they_are_made():
    with pytest.raises(TypeError):
        FileEntry(["a"], "0" * 64, 1)
    with pytest.raises(TypeError):
        FileEntry("a", "0" * 64, True)
