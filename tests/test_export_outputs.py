"""What build_engines.py writes to, and how it fails: never a user's file or folder, one build of an output at a
time, leftovers of killed builds cleared, OS errors and a missing export extra as one line (issues 13, 14)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_export_build import PROFILE, _one_line_error, run_cli

import ldm_rt.export.build as build_module
from ldm_rt.export.build import ARTIFACTS, is_artifacts_folder
from ldm_rt.export.output import OutputError, claim_output
from ldm_rt.runtime.manifest import FORMAT, MANIFEST

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "export" / "build_engines.py"


def _hidden_siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_an_output_path_that_is_a_file_is_refused_untouched(tiny_ldm_rt_model, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    line = _one_line_error(run_cli(["--model", str(tiny_ldm_rt_model), "--out", str(target), "--onnx-only", *PROFILE]))
    assert line == (
        f"build_engines.py: error: {target} is a file, not a folder; give a new folder path for the "
        f"{ARTIFACTS} (or an existing one to rebuild)"
    )
    assert target.read_text() == "my notes" and _hidden_siblings(target) == []


def test_a_users_folder_is_refused_untouched_and_an_empty_one_is_fine(tiny_ldm_rt_model, tmp_path):
    mine = tmp_path / "Documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("...")
    line = _one_line_error(run_cli(["--model", str(tiny_ldm_rt_model), "--out", str(mine), "--onnx-only", *PROFILE]))
    assert f"{mine} is a folder with other files in it, not an {ARTIFACTS}; refusing to replace it" in line
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and _hidden_siblings(mine) == []
    # A Triton repository that is not ours is refused too, before any work.
    line = _one_line_error(
        run_cli(["--model", str(tiny_ldm_rt_model), "--out", str(tmp_path / "new"), "--triton-repo", str(mine), *PROFILE])
    )
    assert f"{mine} is a folder with other files in it, not an ldm-rt Triton model repository" in line
    assert not (tmp_path / "new").exists()
    # An empty folder and an earlier artifacts folder (any format version) may be replaced.
    empty = tmp_path / "empty"
    empty.mkdir()
    with claim_output(empty, is_artifacts_folder, ARTIFACTS):
        pass
    (mine / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": 0}))
    assert is_artifacts_folder(mine)
    (mine / MANIFEST).write_text(json.dumps([FORMAT]))
    assert not is_artifacts_folder(mine)


def test_a_model_json_holding_a_list_is_one_line(tiny_ldm_rt_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_ldm_rt_model, model)
    (model / "ldm_rt_model.json").write_text("[]")
    line = _one_line_error(run_cli(["--model", str(model), "--out", str(tmp_path / "out"), "--onnx-only", *PROFILE]))
    assert f"{model / 'ldm_rt_model.json'} holds an array where a JSON object is expected" in line
    # The Triton repository may not be the artifacts folder or inside it.
    line = _one_line_error(run_cli(["--model", str(model), "--out", str(tmp_path / "out"), "--triton-repo", str(tmp_path / "out" / "t")]))
    assert "must not contain each other" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_second_build_of_the_same_output_refuses_while_the_first_runs(tiny_ldm_rt_model, tmp_path):
    out = tmp_path / "artifacts"
    with claim_output(out, is_artifacts_folder, ARTIFACTS):  # as a running build holds it
        assert (tmp_path / ".artifacts.lock").exists()
        line = _one_line_error(run_cli(["--model", str(tiny_ldm_rt_model), "--out", str(out), "--onnx-only", *PROFILE]))
        assert f"another build is writing {out} (it holds .artifacts.lock)" in line
        with pytest.raises(OutputError, match="another build is writing"):
            with claim_output(out, is_artifacts_folder, ARTIFACTS):
                pass
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the build


def test_leftovers_of_killed_builds_are_cleared_and_a_half_swapped_output_is_restored(tmp_path):
    out = tmp_path / "artifacts"
    # Killed between the two renames of a swap: the output is absent, the previous finished folder renamed
    # away (.old) and a half-written one (.tmp) beside it.
    previous = tmp_path / ".artifacts.a1b2c3d4.old"
    previous.mkdir()
    (previous / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": 1}))
    (tmp_path / ".artifacts.e5f6g7h8.tmp").mkdir()
    other = tmp_path / ".artifacts.v2.i9j0k1l2.tmp"  # a leftover of the sibling output "artifacts.v2": not ours
    other.mkdir()
    with claim_output(out, is_artifacts_folder, ARTIFACTS):
        assert is_artifacts_folder(out)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".artifacts.lock", ".artifacts.v2.i9j0k1l2.tmp", "artifacts"]


def test_profiles_no_model_can_use_are_refused_before_anything_is_loaded(tmp_path):
    for flag, value, words in (
        ("--height-range", "64:64:100000", "profile height up to 100000 px is above 4096 px"),
        ("--width-range", "64:64:8192", "profile width up to 8192 px is above 4096 px"),
        ("--batch-range", "1:1:1000", "profile images per prompt up to 1000 is above 64"),
    ):
        line = _one_line_error(run_cli(["--model", str(tmp_path / "never-read"), "--out", str(tmp_path / "out"), flag, value]))
        assert words in line and flag in line
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_path_and_leaves_nothing(tiny_ldm_rt_model, tmp_path, monkeypatch):
    """In process: the disk fills up while the first component's parity check writes (fault injected)."""
    out = tmp_path / "artifacts"

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "onnx" / "fp32" / "text_encoder.onnx"))

    monkeypatch.setattr(build_module, "check_onnx", full)
    line = _one_line_error(run_cli(["--model", str(tiny_ldm_rt_model), "--out", str(out), "--onnx-only", *PROFILE]))
    assert line == (
        f"build_engines.py: error: {out}/onnx/fp32/text_encoder.onnx: No space left on device; "
        "the disk is full: free space or write somewhere else"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_file_size_limit_hit_while_writing_is_one_line(tiny_ldm_rt_model, tmp_path):
    """A real failed write, without root: RLIMIT_FSIZE makes the first ONNX file fail with EFBIG (Python
    ignores SIGXFSZ, so the write returns the error instead of killing the process)."""
    out = tmp_path / "artifacts"
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        "from ldm_rt.export.build_engines import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["--model", str(tiny_ldm_rt_model), "--out", str(out), "--onnx-only", *PROFILE]
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "report" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("build_engines.py: error: ") and str(out) in last
    assert "File too large; the file is larger than this file system or the process's file size limit" in last
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: a 0555 folder does not stop root from writing")
def test_a_read_only_folder_is_one_line(tiny_ldm_rt_model, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        line = _one_line_error(
            run_cli(["--model", str(tiny_ldm_rt_model), "--out", str(parent / "artifacts"), "--onnx-only", *PROFILE])
        )
    finally:
        parent.chmod(0o755)
    assert f"{parent}/.artifacts.lock: Permission denied; permission denied: fix the permissions or write somewhere else" in line
    assert list(parent.iterdir()) == []


def test_a_runtime_only_install_gets_the_extra_to_install(tmp_path):
    """torch cannot be imported (as in `pip install ldm-rt`): one line naming the extra, not a traceback."""
    code = (
        "import runpy, sys; sys.modules['torch'] = None; "
        f"sys.argv = [{str(SCRIPT)!r}, '--model', 'm', '--out', {str(tmp_path / 'out')!r}]; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "build_engines.py: error: the export toolchain needs torch, which cannot be imported (a runtime-only "
        "install?); pip install 'ldm-rt[export]'"
    ]
    assert "'ldm-rt[export]'" in (ROOT / "README.md").read_text().split("## Export", 1)[1].split("\n## ", 1)[0]
