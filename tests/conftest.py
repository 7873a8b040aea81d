"""Shared test fixtures. Tests build tiny random models in tmp dirs; nothing is downloaded."""

from __future__ import annotations

import os

import pytest

# Two cores: keep torch from oversubscribing when ONNX Runtime also runs in the same process.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def _have_tensorrt_and_cuda() -> tuple[bool, str]:
    # The probe the TensorRT backend and the engine builder use: both cuda-python layouts, real CUDA errors.
    from ldm_rt.runtime.backends.cuda_probe import GpuUnavailable, probe

    try:
        probe()
    except GpuUnavailable as e:
        return False, f"{e} (the GPU tests need pip install 'ldm-rt[gpu]' on a CUDA machine)"
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

@pytest.fixture(scope="session", autouse=True)
def _cpp_builds_start_with_the_session(request, tmp_path_factory):
    """The C++ builds this session's tests need, started now in the background (tests/cmake_build.py)."""
    from cmake_build import start_with_session

    start_with_session({m for item in request.session.items if (m := getattr(item, "module", None)) is not None}, tmp_path_factory)


# Session-scoped tiny models (diffusers-layout, single-file, ldm-rt folder) shared by every test file, and the
# small SDXL base/refiner exports (small_sdxl_base, small_sdxl_refiner) shared by every SDXL end-to-end test file.
pytest_plugins = ["tiny_models", "sdxl_small_models"]
