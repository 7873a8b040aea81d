"""TensorRT backend: the serialized engines the manifest lists, run on one CUDA stream.

tensorrt and cuda-python are imported when this backend is opened, never at import time, so the
runtime installs and runs without them. An engine is used only if its cache key still describes this
machine and these artifacts (TensorRT version, GPU, ONNX hash, precision, profile): a mismatch is a
one-line error naming the field, never a silent load of a stale engine. Device buffers are allocated
once at the profile's maximum shapes; an engine built with a static profile (--static-shape) has its
launch captured into a CUDA graph once and replayed.

NOTE: written against TensorRT 10 and cuda-python 12; this machine has no GPU, so it is not run by the
test suite (tests marked `gpu` cover it where a GPU exists).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts import DTYPES, ComponentContract
from ..manifest import ArtifactError, FileEntry, Manifest
from .base import BackendError, HostOptions

log = logging.getLogger(__name__)

MISSING = "TensorRT/CUDA not found ({what}); use --backend onnxruntime"


def import_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, cudart), or BackendError with the one-line hint."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(MISSING.format(what="python package tensorrt is not installed")) from None
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendError(MISSING.format(what="python package cuda-python is not installed")) from None
    return trt, cudart


def check(cudart: Any, result: Any) -> Any:
    """cuda-python returns (err, *values); raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA call failed: {cudart.cudaGetErrorName(err)[1].decode()}")
    return values[0] if len(values) == 1 else values


def device_description(cudart: Any) -> dict[str, str]:
    """{"name", "compute_capability"} of the current GPU, as the engine records store it."""
    device = check(cudart, cudart.cudaGetDevice())
    props = check(cudart, cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


def engine_key(component: str, precision: str, onnx_sha256: str, tensorrt_version: str, gpu: dict[str, str],
               profile: dict[str, Any], flags: dict[str, Any]) -> str:
    """The engine cache key: sha256 of everything an engine depends on, as export/tensorrt_build.py's
    EngineSpec.key computes it (tests/test_runtime_backends.py checks the two agree)."""
    spec = {
        "component": component, "precision": precision, "onnx_sha256": onnx_sha256, "tensorrt_version": tensorrt_version,
        "gpu": gpu, "profile": profile, "flags": flags,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def select_engine(component: str, precision: str, records: dict[str, dict[str, Any]], onnx_sha256: str,
                  tensorrt_version: str, gpu: dict[str, str]) -> dict[str, Any]:
    """The engine record of `precision` whose cache key matches this machine and this ONNX file; an
    ArtifactError naming what differs when none does (a stale engine is never loaded)."""
    candidates = [r for r in records.values() if r.get("precision") == precision]
    if not candidates:
        raise BackendError(
            f"no {precision} TensorRT engine for {component} in the artifacts; build engines with "
            "python export/build_engines.py on this GPU, or use --backend onnxruntime"
        )
    for record in candidates:
        key = engine_key(component, precision, onnx_sha256, tensorrt_version, gpu, record.get("profile", {}), record.get("flags", {}))
        if key == record.get("key"):
            return record
    record = candidates[0]
    if record.get("tensorrt_version") != tensorrt_version:
        what = f"TensorRT {record.get('tensorrt_version')}, this is {tensorrt_version}"
    elif record.get("gpu") != gpu:
        what = f"GPU {record.get('gpu')}, this is {gpu}"
    else:
        what = "another ONNX file or build settings"
    raise ArtifactError(
        f"the {component} {precision} TensorRT engine was built for {what}; rebuild the engines "
        "(python export/build_engines.py) or use --backend onnxruntime"
    )


class TrtComponent:
    """One engine with device buffers sized for its profile's maximum shapes, one stream, one lock (an
    execution context and its buffers serve one call at a time)."""

    def __init__(self, trt: Any, cudart: Any, engine: Any, contract: ComponentContract, use_cuda_graph: bool) -> None:
        self.trt, self.cudart, self.engine, self.contract = trt, cudart, engine, contract
        self.context = engine.create_execution_context()
        self.stream = check(cudart, cudart.cudaStreamCreate())
        self.lock = threading.Lock()
        self.use_cuda_graph = use_cuda_graph
        self.graphs: dict[tuple, Any] = {}  # input shapes -> instantiated CUDA graph
        sizes = {d.name: d.max for d in contract.dims}
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        for spec in contract.inputs + contract.outputs:
            nbytes = int(np.prod(spec.resolve(sizes))) * np.dtype(DTYPES[spec.dtype]).itemsize
            self.buffers[spec.name] = (check(cudart, cudart.cudaMalloc(nbytes)), nbytes)
            self.context.set_tensor_address(spec.name, self.buffers[spec.name][0])

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.contract.check_inputs(inputs)
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self.lock:
            arrays = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
            for name, arr in arrays.items():
                self.context.set_input_shape(name, arr.shape)
                check(cudart, cudart.cudaMemcpyAsync(self.buffers[name][0], arr.ctypes.data, arr.nbytes, h2d, self.stream))
            self._execute(tuple((k, a.shape) for k, a in sorted(arrays.items())))
            outs = {}
            for spec in self.contract.outputs:
                out = np.empty(tuple(self.context.get_tensor_shape(spec.name)), dtype=DTYPES[spec.dtype])
                check(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[spec.name][0], out.nbytes, d2h, self.stream))
                outs[spec.name] = out
            check(cudart, cudart.cudaStreamSynchronize(self.stream))
        return outs

    def _execute(self, shapes: tuple) -> None:
        cudart = self.cudart
        if not self.use_cuda_graph:
            if not self.context.execute_async_v3(self.stream):
                raise BackendError(f"TensorRT failed to run {self.contract.name}")
            return
        graph = self.graphs.get(shapes)
        if graph is None:
            # One plain launch first (TensorRT finishes lazy set-up there), then capture the same launch.
            self.context.execute_async_v3(self.stream)
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
            check(cudart, cudart.cudaStreamBeginCapture(self.stream, mode))
            self.context.execute_async_v3(self.stream)
            captured = check(cudart, cudart.cudaStreamEndCapture(self.stream))
            graph = self.graphs[shapes] = check(cudart, cudart.cudaGraphInstantiate(captured, 0))
        check(cudart, cudart.cudaGraphLaunch(graph, self.stream))


def open_components(
    artifacts_dir: Path, manifest: Manifest, precision: str, providers: Sequence[str] | None = None, host: HostOptions = HostOptions()
) -> dict[str, TrtComponent]:
    """Engines for every component at `precision`; `providers` and `host` are unused (the GPU computes)."""
    trt, cudart = import_tensorrt()
    if check(cudart, cudart.cudaGetDeviceCount()) == 0:
        raise BackendError(MISSING.format(what="no CUDA GPU visible"))
    gpu = device_description(cudart)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    components = {}
    for name, entry in manifest.components.items():
        if precision not in entry.precisions:
            raise BackendError(f"{artifacts_dir} has no {precision} {name}; rebuild with --fp16 or use --precision fp32")
        onnx_sha256 = entry.precisions[precision].onnx.sha256
        engine_entry = select_engine(name, precision, entry.engines, onnx_sha256, trt.__version__, gpu)
        path = manifest.verify_file(artifacts_dir, FileEntry(**engine_entry["engine"]))
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ArtifactError(f"{path} is not a TensorRT engine this TensorRT can load; rebuild the engines")
        log.info("opened %s (%s) engine %s: %s", name, precision, path.name, json.dumps(engine_entry.get("profile", {})))
        static = bool(engine_entry.get("flags", {}).get("static"))  # one shape per input: replay a CUDA graph
        components[name] = TrtComponent(trt, cudart, engine, entry.contract, use_cuda_graph=static)
    return components
