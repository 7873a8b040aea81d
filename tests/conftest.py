"""Shared test fixtures. Tests build tiny random models in tmp dirs; nothing is downloaded."""

from __future__ import annotations

import os

import pytest

# Two cores: keep torch from oversubscribing when ONNX Runtime also runs in the same process.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def _have_tensorrt_and_cuda() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed (pip install 'ldm-rt[gpu]' on a CUDA machine)"
    try:
        from cuda import cudart  # noqa: F401
    except ImportError:
        return False, "cuda-python is not installed"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return False, "no CUDA GPU visible"
    return True, ""


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    ok, reason = _have_tensorrt_and_cuda()
    if not ok:
        skip = pytest.mark.skip(reason=f"GPU test: {reason}")
        for item in gpu_items:
            item.add_marker(skip)

# Session-scoped tiny models (diffusers-layout, single-file, ldm-rt folder) shared by every test file.
pytest_plugins = ["tiny_models"]
