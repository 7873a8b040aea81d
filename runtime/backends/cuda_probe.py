"""Whether TensorRT and a CUDA GPU can be used here, and if not, the one reason why.

One probe for the TensorRT backend, the engine builder (export/tensorrt_build.py) and the `gpu` test marker
(tests/conftest.py). cuda-python moved the runtime API to `cuda.bindings.runtime` in 12.6 and removed the
old `cuda.cudart` module in 13; both layouts are tried, the new one first. A CUDA error is reported with its
real cause: a driver older than the installed cuda-bindings (cudaErrorInsufficientDriver) is not "no GPU".

NOTE: unverified on a GPU (there is none where this was written); tests/test_gpu_backend.py runs it
against fake modules of both layouts and fake CUDA errors.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

# The CUDA runtime API module, newest layout first: cuda-python >= 12.6 (cuda-bindings), then older releases.
RUNTIME_MODULES = ("cuda.bindings.runtime", "cuda.cudart")
# cudaError_t values (CUDA runtime API, stable across releases).
CUDA_SUCCESS = 0
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_NO_DEVICE = 100


class GpuUnavailable(Exception):
    """TensorRT, cuda-python or a usable CUDA GPU is missing; the message is the reason, one line."""


def _missing(e: ImportError, module: str) -> bool:
    """Whether `e` says `module` (or a package above it) is not installed, rather than broken."""
    return isinstance(e, ModuleNotFoundError) and e.name is not None and (module + ".").startswith(e.name + ".")


def import_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except ImportError as e:
        if _missing(e, "tensorrt"):
            raise GpuUnavailable("the tensorrt package is not installed") from None
        raise GpuUnavailable(f"the tensorrt package cannot be imported ({e})") from None
    except OSError as e:  # its shared libraries (libnvinfer) fail to load
        raise GpuUnavailable(f"the tensorrt package cannot be imported ({e})") from None


def import_cudart() -> Any:
    """The CUDA runtime API module of whichever cuda-python layout is installed."""
    broken: Exception | None = None
    for name in RUNTIME_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            if not _missing(e, name):
                broken = broken or e
        except OSError as e:
            broken = broken or e
    if broken is not None:
        raise GpuUnavailable(f"the cuda-python package cannot be imported ({broken})")
    raise GpuUnavailable("the cuda-python package is not installed")


def _cuda_version(encoded: int) -> str:
    return f"{encoded // 1000}.{encoded % 1000 // 10}"  # CUDA encodes 12.4 as 12040


def _bindings_version() -> str:
    for dist in ("cuda-bindings", "cuda-python"):  # cuda-bindings is its own distribution since 12.6
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "the installed cuda-python"


def _version(cudart: Any, call: str) -> int:
    """cudaDriverGetVersion / cudaRuntimeGetVersion (both answer without a usable GPU), 0 when the call fails."""
    err, version = getattr(cudart, call)()
    return int(version) if int(err) == CUDA_SUCCESS else 0


def error_name(cudart: Any, err: Any) -> str:
    name = cudart.cudaGetErrorName(err)[1]
    return name.decode() if isinstance(name, bytes) else str(name)


def explain(cudart: Any, err: Any) -> str:
    """One line naming the real cause of a failed CUDA runtime call and what to do."""
    code = int(err)
    if code == CUDA_ERROR_INSUFFICIENT_DRIVER:
        driver, runtime = _version(cudart, "cudaDriverGetVersion"), _version(cudart, "cudaRuntimeGetVersion")
        if driver == 0:  # CUDA reports no driver at all with the same error
            return ("no NVIDIA driver is installed (cudaErrorInsufficientDriver); install it, or run the container "
                    "with GPU access (docker run --gpus all)")
        built_for = f" (built for CUDA {_cuda_version(runtime)})" if runtime else ""
        older = f" (pip install 'cuda-python<{runtime // 1000}')" if runtime else ""
        return (f"the NVIDIA driver supports CUDA {_cuda_version(driver)}, too old for {_bindings_version()}{built_for} "
                f"(cudaErrorInsufficientDriver); upgrade the driver or install an older cuda-python{older}")
    if code == CUDA_ERROR_NO_DEVICE:
        return "no CUDA GPU is visible (cudaErrorNoDevice); check nvidia-smi and CUDA_VISIBLE_DEVICES"
    return f"CUDA cannot be used ({error_name(cudart, err)})"


def visible_gpus(cudart: Any) -> int:
    """How many CUDA GPUs this process sees (>= 1), or GpuUnavailable naming why none can be used."""
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != CUDA_SUCCESS:
        raise GpuUnavailable(explain(cudart, err))
    if count < 1:
        raise GpuUnavailable("no CUDA GPU is visible; check nvidia-smi and CUDA_VISIBLE_DEVICES")
    return int(count)


def probe() -> tuple[Any, Any]:
    """(tensorrt, cudart) when TensorRT and a CUDA GPU can be used; GpuUnavailable naming why not."""
    trt = import_tensorrt()
    cudart = import_cudart()
    visible_gpus(cudart)
    return trt, cudart
