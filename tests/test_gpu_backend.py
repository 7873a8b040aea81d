"""The GPU path without a GPU (issue 13): the shared CUDA probe (both cuda-python layouts, real CUDA errors),
the TensorRT backend's shape checks, launch checks and frees, against fake tensorrt/cudart modules (gpu_fakes.py).
"""

from __future__ import annotations

import gc
import importlib.metadata
import sys
from types import ModuleType

import numpy as np
import pytest
from gpu_fakes import FakeCudart, FakeEngine, tensorrt_11

from ldm_rt.export.errors import TensorRTUnavailable
from ldm_rt.export.tensorrt_build import probe_tensorrt
from ldm_rt.runtime.artifacts import Artifacts
from ldm_rt.runtime.backends import cuda_probe, tensorrt_backend
from ldm_rt.runtime.backends.base import BackendError
from ldm_rt.runtime.backends.tensorrt_backend import TrtComponent
from ldm_rt.runtime.contracts import ModelFacts, ShapeProfile, build_contracts
from ldm_rt.runtime.pipeline import Pipeline

FACTS = ModelFacts(
    latent_channels=4, latent_factor=2, unet_factor=2, unet_in_channels=4, unet_out_channels=4, context_length=8,
    context_dim=16, vocab_size=100, num_classes=None, autoencoder_kind="kl", scale_factor=0.18215,
)  # fmt: skip


def install_cuda(monkeypatch, cudart, layout: str = "bindings", trt: ModuleType | None = None) -> None:
    """Put fake modules where `import tensorrt` and cuda-python's `layout` would find them, and the other layout absent."""
    monkeypatch.setitem(sys.modules, "tensorrt", trt if trt is not None else tensorrt_11())
    monkeypatch.setitem(sys.modules, "cuda", ModuleType("cuda"))
    if layout == "bindings":  # cuda-python >= 12.6 (13 has only this)
        monkeypatch.setitem(sys.modules, "cuda.bindings", ModuleType("cuda.bindings"))
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
        monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    else:  # older cuda-python
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)
        monkeypatch.setitem(sys.modules, "cuda.cudart", cudart)


@pytest.mark.parametrize("layout", ["bindings", "cudart"])
def test_the_probe_finds_either_cuda_python_layout(monkeypatch, layout):
    cudart = FakeCudart()
    install_cuda(monkeypatch, cudart, layout)
    assert cuda_probe.import_cudart() is cudart
    trt, found = cuda_probe.probe()
    assert found is cudart and trt.__version__.startswith("11.")
    assert tensorrt_backend.import_tensorrt()[1] is cudart
    assert probe_tensorrt("art").gpu.name == "Fake GPU"


@pytest.mark.parametrize("layout", ["bindings", "cudart"])
def test_the_gpu_marker_uses_the_probe(monkeypatch, layout):
    # Before: conftest imported `from cuda import cudart`, gone in cuda-python 13, so every GPU test skipped on a GPU.
    from conftest import _have_tensorrt_and_cuda

    install_cuda(monkeypatch, FakeCudart(), layout)
    assert _have_tensorrt_and_cuda() == (True, "")
    install_cuda(monkeypatch, FakeCudart(error=35, driver=12040), layout)
    ok, reason = _have_tensorrt_and_cuda()
    assert not ok and "too old" in reason


def test_missing_or_broken_cuda_python_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda", None)
    with pytest.raises(cuda_probe.GpuUnavailable, match="^the cuda-python package is not installed$"):
        cuda_probe.import_cudart()
    broken = ModuleNotFoundError("No module named 'cuda.bindings._lib'", name="cuda.bindings._lib")
    monkeypatch.setitem(sys.modules, "cuda", ModuleType("cuda"))
    monkeypatch.setattr(cuda_probe.importlib, "import_module", lambda name: (_ for _ in ()).throw(broken))
    expected = r"^the cuda-python package cannot be imported \(No module named 'cuda.bindings._lib'\)$"
    with pytest.raises(cuda_probe.GpuUnavailable, match=expected):
        cuda_probe.import_cudart()


def cuda_version_of(monkeypatch, versions: dict[str, str]) -> None:
    real = importlib.metadata.version

    def version(dist: str) -> str:
        if dist in ("cuda-bindings", "cuda-python"):
            if dist not in versions:
                raise importlib.metadata.PackageNotFoundError(dist)
            return versions[dist]
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)


@pytest.mark.parametrize(
    "cudart, versions, expected",
    [
        (FakeCudart(error=35, driver=12040, runtime=13000), {"cuda-bindings": "13.0.2"},
         "the NVIDIA driver supports CUDA 12.4, too old for cuda-bindings 13.0.2 (built for CUDA 13.0) "
         "(cudaErrorInsufficientDriver); upgrade the driver or install an older cuda-python (pip install 'cuda-python<13')"),
        (FakeCudart(error=35, driver=11080, runtime=12040), {"cuda-python": "12.4.0"},
         "the NVIDIA driver supports CUDA 11.8, too old for cuda-python 12.4.0 (built for CUDA 12.4) "
         "(cudaErrorInsufficientDriver); upgrade the driver or install an older cuda-python (pip install 'cuda-python<12')"),
        (FakeCudart(error=35, driver=0), {}, "no NVIDIA driver is installed (cudaErrorInsufficientDriver); install it, "
         "or run the container with GPU access (docker run --gpus all)"),
        (FakeCudart(error=100), {}, "no CUDA GPU is visible (cudaErrorNoDevice); check nvidia-smi and CUDA_VISIBLE_DEVICES"),
        (FakeCudart(device_count=0), {}, "no CUDA GPU is visible; check nvidia-smi and CUDA_VISIBLE_DEVICES"),
        (FakeCudart(error=999), {}, "CUDA cannot be used (cudaErrorUnknown)"),
    ],
)  # fmt: skip
def test_cuda_errors_name_their_real_cause(monkeypatch, tmp_path, cudart, versions, expected):
    # Before: a driver too old for cuda-bindings (error 35) was reported as "no CUDA GPU is visible".
    cuda_version_of(monkeypatch, versions)
    install_cuda(monkeypatch, cudart)
    with pytest.raises(cuda_probe.GpuUnavailable) as probe_error:
        cuda_probe.probe()
    assert str(probe_error.value) == expected
    with pytest.raises(BackendError) as backend_error:
        tensorrt_backend.import_tensorrt()
    assert str(backend_error.value) == f"TensorRT/CUDA not found ({expected}); use --backend onnxruntime"
    with pytest.raises(TensorRTUnavailable) as export_error:
        probe_tensorrt(tmp_path)
    assert str(export_error.value).startswith(f"TensorRT/CUDA not found: {expected}; the exported ONNX models in {tmp_path}")


# ---- TrtComponent --------------------------------------------------------------------------------------------
def unet_contract(profile: ShapeProfile):
    return build_contracts(FACTS, profile)["unet"]


def unet_inputs(batch: int, h: int = 8, w: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((batch, 4, h, w)).astype(np.float32),
        "timestep": np.full((batch,), 10.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 8, 16)).astype(np.float32),
    }


def static_unet(cudart: FakeCudart, **engine) -> TrtComponent:
    """A --static-shape UNet engine for 1 image at 16x16 pixels: batch 2 (guidance > 1) only."""
    contract = unet_contract(ShapeProfile.static(1, 16, 16))
    profile = {name: [list(s)] * 3 for name, s in contract.shapes_at("opt").items()}
    return TrtComponent(tensorrt_11(), cudart, FakeEngine(cudart, contract, **engine), contract, profile, use_cuda_graph=True)


def test_a_shape_outside_the_engine_profile_is_refused_before_any_copy():
    # Before: set_input_shape's False was ignored; batch B went into a 2B static engine.
    cudart = FakeCudart()
    unet = static_unet(cudart)
    out = unet.run(unet_inputs(2))["out_sample"]  # guidance > 1: batch 2B fits
    np.testing.assert_array_equal(out, 2 * unet_inputs(2)["sample"])
    copies = cudart.calls["cudaMemcpyAsync"]
    with pytest.raises(BackendError) as info:
        unet.run(unet_inputs(1))  # guidance <= 1 sends B; the contract allows it, this engine does not
    assert str(info.value) == (
        "the unet TensorRT engine's profile takes sample shapes (2, 4, 8, 8) to (2, 4, 8, 8), asked (1, 4, 8, 8); "
        "a --static-shape engine takes only the shapes it was built for (the UNet gets batch 2B only with guidance > 1): "
        "ask for those or rebuild without --static-shape, or use --backend onnxruntime"
    )
    assert cudart.calls["cudaMemcpyAsync"] == copies  # nothing was copied
    unet.close()


def test_the_engine_refusing_a_shape_is_an_error_too():
    cudart = FakeCudart()
    contract = unet_contract(ShapeProfile((1, 1, 2), (16, 16, 32), (16, 16, 32)))
    # The manifest's profile says 1..4, the engine itself only takes batch 2: TensorRT's own answer counts.
    profile = {"sample": [[1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 16, 16]]}
    engine = FakeEngine(cudart, contract, accepts={"sample": ((2, 4, 8, 8), (2, 4, 16, 16))})
    with TrtComponent(tensorrt_11(), cudart, engine, contract, profile, use_cuda_graph=False) as unet:
        with pytest.raises(BackendError, match=r"^TensorRT refused sample shape \(1, 4, 8, 8\) for the unet engine \(its profile: "):
            unet.run(unet_inputs(1))
        assert cudart.calls["cudaMemcpyAsync"] == 0
        assert unet.run(unet_inputs(2, 16, 16))["out_sample"].shape == (2, 4, 16, 16)  # dynamic: no graph
        assert cudart.graphs == {} and cudart.execs == {}


@pytest.mark.parametrize("use_cuda_graph", [False, True])
def test_a_failed_launch_is_an_error(use_cuda_graph):
    # Before: with CUDA graphs execute_async_v3's result was ignored (warm-up and capture).
    cudart = FakeCudart()
    contract = unet_contract(ShapeProfile.static(1, 16, 16))
    unet = TrtComponent(tensorrt_11(), cudart, FakeEngine(cudart, contract, launch_ok=False), contract, {}, use_cuda_graph)
    with pytest.raises(BackendError, match="^TensorRT failed to run unet"):
        unet.run(unet_inputs(2))
    assert cudart.capture is None and cudart.execs == {}  # no stream left capturing, no graph kept
    unet.close()
    assert cudart.held() == {"buffers": 0, "streams": 0, "graphs": 0, "execs": 0}


def test_a_failed_capture_ends_the_capture():
    cudart = FakeCudart()
    unet = static_unet(cudart)
    context = unet.context
    real = context.execute_async_v3
    launches = iter([True, False])  # the warm-up launch works, the captured one fails
    context.execute_async_v3 = lambda stream: real(stream) and next(launches)
    with pytest.raises(BackendError, match="while capturing its CUDA graph"):
        unet.run(unet_inputs(2))
    assert cudart.capture is None and cudart.graphs == {} and cudart.execs == {}
    unet.close()


def test_cuda_graph_replays_and_close_frees_everything():
    # Before: no cudaFree, cudaStreamDestroy or cudaGraphExecDestroy anywhere.
    cudart = FakeCudart()
    unet = static_unet(cudart)
    buffers = len(cudart.memory)
    assert buffers == 4 and len(cudart.streams) == 1  # 3 inputs + 1 output
    for _ in range(3):
        np.testing.assert_array_equal(unet.run(unet_inputs(2))["out_sample"], 2 * unet_inputs(2)["sample"])
    assert cudart.calls["cudaGraphLaunch"] == 3 and len(cudart.execs) == 1
    assert cudart.graphs == {}  # the captured graph is destroyed once instantiated
    unet.close()
    assert cudart.held() == {"buffers": 0, "streams": 0, "graphs": 0, "execs": 0}
    assert cudart.calls["cudaFree"] == buffers
    unet.close()  # idempotent: nothing freed twice
    assert cudart.calls["cudaFree"] == buffers
    with pytest.raises(BackendError, match="the unet TensorRT engine is closed"):
        unet.run(unet_inputs(2))


def test_an_unclosed_component_is_freed_when_collected():
    cudart = FakeCudart()
    unet = static_unet(cudart)
    unet.run(unet_inputs(2))
    del unet
    gc.collect()
    assert cudart.held() == {"buffers": 0, "streams": 0, "graphs": 0, "execs": 0}


def test_a_failed_allocation_frees_what_was_allocated():
    cudart = FakeCudart(fail_malloc_after=3)
    with pytest.raises(BackendError, match="CUDA call failed: cudaErrorMemoryAllocation"):
        static_unet(cudart)
    assert cudart.held() == {"buffers": 0, "streams": 0, "graphs": 0, "execs": 0}
    assert cudart.calls["cudaFree"] == 2


def test_closing_a_pipeline_closes_its_tensorrt_components():
    cudart = FakeCudart()
    artifacts = Artifacts.open()  # the shipped default model's contracts, TensorRT components on a fake GPU
    components = {
        name: TrtComponent(tensorrt_11(), cudart, FakeEngine(cudart, entry.contract), entry.contract, {}, use_cuda_graph=False)
        for name, entry in artifacts.manifest.components.items()
    }
    assert cudart.held()["buffers"] > 0 and cudart.held()["streams"] == len(components)
    with Pipeline.from_artifacts(artifacts, components, "tensorrt", "fp32") as pipe:
        assert pipe.components["unet"] is components["unet"]
    assert cudart.held() == {"buffers": 0, "streams": 0, "graphs": 0, "execs": 0}
