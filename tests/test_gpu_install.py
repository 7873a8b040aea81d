"""Issue 13: `pip install 'ldm-rt[gpu]'` ends with exactly one ONNX Runtime distribution.

onnxruntime, onnxruntime-gpu and ONNX Runtime's other builds all write the one `onnxruntime/` import package;
two in one environment overwrite each other (CPU files over the CUDA provider, or a mix). Before, `[gpu]`
listed onnxruntime-gpu beside the base onnxruntime. pip resolves `ldm-rt[gpu]` here for real (dry run,
nothing installed, installed packages ignored) from a clean copy of the sources, with one part scoped out:
NVIDIA's `tensorrt` is an sdist whose metadata step downloads multi-GB wheels from pypi.nvidia.com, so a
stub wheel with no dependencies stands in for it (its real dependencies are NVIDIA's tensorrt_cuXX packages,
never ONNX Runtime). Skipped, with the reason, when the package index cannot be reached.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_runtime_install import ROOT, index_unreachable, source_copy

# ONNX Runtime builds on PyPI that each install the `onnxruntime` import package (not add-ons such as
# onnxruntime-extensions or onnxruntime-genai, which have their own).
ONNXRUNTIME_BUILDS = {
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-rocm",
    "onnxruntime-qnn", "onnxruntime-training", "onnxruntime-silicon", "ort-nightly", "ort-nightly-gpu",
}  # fmt: skip
TENSORRT_STUB = "999.0"


def stub_wheel(folder: Path, name: str, version: str) -> None:
    """A wheel named `name` with no files and no dependencies."""
    dist = f"{name}-{version}"
    folder.mkdir(exist_ok=True)
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel = "Wheel-Version: 1.0\nGenerator: ldm-rt tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        zf.writestr(f"{dist}.dist-info/WHEEL", wheel)
        zf.writestr(f"{dist}.dist-info/RECORD", "")


def test_a_gpu_install_resolves_to_one_onnxruntime(tmp_path):
    if reason := index_unreachable():
        pytest.skip(reason)
    gpu = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]]
    tensorrt = next(r for r in gpu if r.name == "tensorrt")
    assert tensorrt.specifier.contains(TENSORRT_STUB), f"raise TENSORRT_STUB to fit {tensorrt}"
    stub_wheel(tmp_path / "stubs", "tensorrt", TENSORRT_STUB)
    (tmp_path / "constraints.txt").write_text(f"tensorrt=={TENSORRT_STUB}\n")
    src = source_copy(tmp_path / "src")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-build-isolation", "--no-input",
         "-q", "--find-links", tmp_path / "stubs", "-c", tmp_path / "constraints.txt", "--report", report, f"{src}[gpu]"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = {canonicalize_name(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
    assert {"ldm-rt", "tensorrt", "cuda-python"} <= resolved, sorted(resolved)
    # The CPU build: the default backend runs on it, and TensorRT (the GPU path) needs no ONNX Runtime.
    assert resolved & ONNXRUNTIME_BUILDS == {"onnxruntime"}, sorted(resolved)
