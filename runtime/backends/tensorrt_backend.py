"""TensorRT backend: the serialized engines the manifest lists, run on one CUDA stream.

tensorrt and cuda-python are imported when this backend is opened, never at import time, so the
runtime installs and runs without them (cuda_probe.py finds them and says why not). An engine is used
only if its cache key still describes this machine and these artifacts (TensorRT version, GPU, ONNX hash,
precision, profile): a mismatch is a one-line error naming the field, never a silent load of a stale
engine. Device buffers are allocated once at the contract's maximum shapes; a request outside the
engine's profile (e.g. batch B on a --static-shape UNet built for 2B) is refused in one line before any
copy. An engine built with a static profile (--static-shape) has its launch captured into a CUDA graph
once and replayed. `close()` (or `with`) frees the device buffers, stream and graphs.

NOTE: written against TensorRT 10/11 and cuda-python 12/13 but unverified: there is no GPU where it was
written. tests/test_gpu_backend.py runs its logic against fake tensorrt/cudart modules; the tests marked
`gpu` run it for real where a GPU exists.
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
from ..lora import LoraFile, patched_initializers, run_time_deltas
from ..manifest import ArtifactError, FileEntry, Manifest
from . import cuda_probe
from .base import BackendError, HostOptions, precision_entry

log = logging.getLogger(__name__)

MISSING = "TensorRT/CUDA not found ({what}); use --backend onnxruntime"


def import_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, cudart) with a CUDA GPU visible, or BackendError with the one-line hint."""
    try:
        return cuda_probe.probe()
    except cuda_probe.GpuUnavailable as e:
        raise BackendError(MISSING.format(what=e)) from None


def check(cudart: Any, result: Any) -> Any:
    """cuda-python returns (err, *values); raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != cuda_probe.CUDA_SUCCESS:
        raise BackendError(f"CUDA call failed: {cuda_probe.error_name(cudart, err)}")
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
    """One engine with device buffers sized for its contract's maximum shapes, one stream, one lock (an
    execution context and its buffers serve one call at a time). `profile` is the engine's optimisation
    profile as its manifest record states it ({input: [min, opt, max]}); requests outside it are refused."""

    def __init__(self, trt: Any, cudart: Any, engine: Any, contract: ComponentContract,
                 profile: dict[str, list[list[int]]], use_cuda_graph: bool) -> None:
        self.trt, self.cudart, self.engine, self.contract, self.profile = trt, cudart, engine, contract, profile
        self.lock = threading.Lock()
        self.use_cuda_graph = use_cuda_graph
        self.graphs: dict[tuple, Any] = {}  # input shapes -> instantiated CUDA graph
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)
        self.stream: Any = None
        try:
            self.context = engine.create_execution_context()
            self.stream = check(cudart, cudart.cudaStreamCreate())
            sizes = {d.name: d.max for d in contract.dims}
            for spec in contract.inputs + contract.outputs:
                nbytes = int(np.prod(spec.resolve(sizes))) * np.dtype(DTYPES[spec.dtype]).itemsize
                self.buffers[spec.name] = (check(cudart, cudart.cudaMalloc(nbytes)), nbytes)
                self.context.set_tensor_address(spec.name, self.buffers[spec.name][0])
        except BaseException:
            self.close()  # what was allocated before the failure
            raise

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.contract.check_inputs(inputs)
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self.lock:
            if self.stream is None:
                raise BackendError(f"the {self.contract.name} TensorRT engine is closed")
            arrays = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
            self._set_shapes(arrays)  # refuses what the engine cannot take, before any copy
            for name, arr in arrays.items():
                check(cudart, cudart.cudaMemcpyAsync(self.buffers[name][0], arr.ctypes.data, arr.nbytes, h2d, self.stream))
            self._execute(tuple((k, a.shape) for k, a in sorted(arrays.items())))
            outs = {}
            for spec in self.contract.outputs:
                shape = tuple(self.context.get_tensor_shape(spec.name))
                out = np.empty(self._fitting(spec.name, shape, DTYPES[spec.dtype]), dtype=DTYPES[spec.dtype])
                check(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[spec.name][0], out.nbytes, d2h, self.stream))
                outs[spec.name] = out
            check(cudart, cudart.cudaStreamSynchronize(self.stream))
        return outs

    def _set_shapes(self, arrays: dict[str, np.ndarray]) -> None:
        for name, arr in arrays.items():
            if name in self.profile:
                lo, _, hi = (tuple(s) for s in self.profile[name])
                if len(arr.shape) != len(lo) or not all(a <= n <= b for n, a, b in zip(arr.shape, lo, hi)):
                    fix = ("a --static-shape engine takes only the shapes it was built for (the UNet gets batch 2B only "
                           "with guidance > 1): ask for those or rebuild without --static-shape") if lo == hi else (
                           "rebuild the engines with a profile that covers it")
                    raise BackendError(
                        f"the {self.contract.name} TensorRT engine's profile takes {name} shapes {lo} to {hi}, "
                        f"asked {arr.shape}; {fix}, or use --backend onnxruntime"
                    )
            self._fitting(name, arr.shape, arr.dtype)
            if not self.context.set_input_shape(name, arr.shape):
                raise BackendError(
                    f"TensorRT refused {name} shape {arr.shape} for the {self.contract.name} engine (its profile: "
                    f"{self.profile.get(name, 'not recorded')}); rebuild the engines or use --backend onnxruntime"
                )

    def _fitting(self, name: str, shape: tuple[int, ...], dtype: Any) -> tuple[int, ...]:
        """`shape`, after checking it fits the device buffer of `name` (a larger copy would overrun it)."""
        if any(int(n) < 0 for n in shape) or int(np.prod(shape)) * np.dtype(dtype).itemsize > self.buffers[name][1]:
            raise BackendError(f"{self.contract.name}.{name}: shape {shape} does not fit its device buffer "
                               f"({self.buffers[name][1]} bytes, the contract's maximum)")
        return shape

    def _launch(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise BackendError(f"TensorRT failed to run {self.contract.name} (its log above says why)")

    def _execute(self, shapes: tuple) -> None:
        cudart = self.cudart
        if not self.use_cuda_graph:
            self._launch()
            return
        graph = self.graphs.get(shapes)
        if graph is None:
            self._launch()  # one plain launch first: TensorRT finishes lazy set-up there, outside the capture
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
            check(cudart, cudart.cudaStreamBeginCapture(self.stream, mode))
            launched = False
            try:
                launched = self.context.execute_async_v3(self.stream)
            finally:  # the stream leaves capture mode whatever the launch did
                captured = check(cudart, cudart.cudaStreamEndCapture(self.stream))
            try:
                if not launched:
                    raise BackendError(f"TensorRT failed to run {self.contract.name} while capturing its CUDA graph")
                graph = self.graphs[shapes] = check(cudart, cudart.cudaGraphInstantiate(captured, 0))
            finally:
                check(cudart, cudart.cudaGraphDestroy(captured))  # the instantiated graph does not need it
        check(cudart, cudart.cudaGraphLaunch(graph, self.stream))

    def close(self) -> None:
        """Free the CUDA graphs, device buffers and stream; idempotent. A failed free is logged, the rest still freed."""
        cudart = self.cudart
        with self.lock:
            releases = [(cudart.cudaGraphExecDestroy, g) for g in self.graphs.values()]
            releases += [(cudart.cudaFree, ptr) for ptr, _ in self.buffers.values()]
            if self.stream is not None:
                releases.append((cudart.cudaStreamDestroy, self.stream))
            self.graphs, self.buffers, self.stream = {}, {}, None
            for release, handle in releases:
                err = release(handle)[0]
                if int(err) != cuda_probe.CUDA_SUCCESS:
                    log.warning("%s failed for %s: %s", release.__name__, self.contract.name, cuda_probe.error_name(cudart, err))

    def __enter__(self) -> TrtComponent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Safety net for a component nobody closed; an interpreter shutting down has torn CUDA down already.
        if getattr(self, "buffers", None) or getattr(self, "stream", None) is not None:
            self.close()


def refit_engine(trt: Any, engine: Any, weights: dict[str, np.ndarray], where: str) -> None:
    """Replace the named weights of a refittable engine in place (trt.Refitter; TensorRT names an ONNX model's
    refittable weights after its initializers). Every weight is set before the one refit call, and the arrays
    stay referenced until it returns (trt.Weights does not copy). UNVERIFIED: no GPU has run this."""
    refitter = trt.Refitter(engine, trt.Logger(trt.Logger.WARNING))
    held = {name: np.ascontiguousarray(w) for name, w in weights.items()}
    refused = [name for name, w in held.items() if not refitter.set_named_weights(name, trt.Weights(w))]
    if refused:
        raise BackendError(
            f"{where}: TensorRT cannot refit {', '.join(refused[:3])}{' ...' if len(refused) > 3 else ''}; "
            "fuse the LoRA at export (--lora) or use --backend onnxruntime"
        )
    missing = list(refitter.get_missing_weights())
    if missing:  # weights TensorRT fused with the ones set, which it needs together
        raise BackendError(f"{where}: refitting needs weights the LoRA does not change ({', '.join(missing[:3])}); fuse the LoRA at export (--lora)")
    if not refitter.refit_cuda_engine():
        raise BackendError(f"{where}: TensorRT refused the refit; fuse the LoRA at export (--lora) or use --backend onnxruntime")


def open_components(
    artifacts_dir: Path, manifest: Manifest, precision: str, providers: Sequence[str] | None = None, host: HostOptions = HostOptions(),
    loras: Sequence[tuple[LoraFile, float]] = (),
) -> dict[str, TrtComponent]:
    """Engines for every component at `precision`; `providers` and `host` are unused (the GPU computes).
    `loras`: (file, scale) pairs; the engines they adapt must be refittable (built with --refit) and are refit
    in place with the patched weights, read from the ONNX file each engine was built from and computed one
    module at a time (runtime/lora.py, as the other backends). The LoRA files, the components they adapt and
    the engines' --refit are checked before any engine is read."""
    deltas: dict = {}
    if loras:  # the same checks as ONNX Runtime and OpenVINO: files, targets, components the artifacts lack
        targets, deltas = run_time_deltas(artifacts_dir, manifest, loras)
    trt, cudart = import_tensorrt()
    gpu = device_description(cudart)
    chosen = {}
    for name, entry in manifest.components.items():
        onnx_sha256 = precision_entry(artifacts_dir, manifest, name, precision).onnx.sha256
        chosen[name] = record = select_engine(name, precision, entry.engines, onnx_sha256, trt.__version__, gpu)
        if deltas.get(name) and not record.get("flags", {}).get("refittable"):
            raise BackendError(
                f"{record['engine']['file']} was built without --refit, so a LoRA cannot be applied to it; "
                "rebuild with --refit or fuse the LoRA at export (--lora)"
            )
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    components: dict[str, TrtComponent] = {}
    try:
        for name, entry in manifest.components.items():
            engine_entry = chosen[name]
            path = manifest.verify_file(artifacts_dir, FileEntry(**engine_entry["engine"]))
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ArtifactError(f"{path} is not a TensorRT engine this TensorRT can load; rebuild the engines")
            if deltas.get(name):
                pe = precision_entry(artifacts_dir, manifest, name, precision)
                onnx_path = manifest.verify_file(artifacts_dir, pe.onnx)
                if pe.external_data is not None:
                    manifest.verify_file(artifacts_dir, pe.external_data)  # the base weights are read from it
                refit_engine(trt, engine, patched_initializers(onnx_path, pe.onnx.file, pe.onnx.sha256, targets, deltas), path.name)
                del deltas[name]  # in the engine now; its patched weights lived only for the refit call
            profile = engine_entry.get("profile", {})
            log.info("opened %s (%s) engine %s: %s", name, precision, path.name, json.dumps(profile))
            static = bool(engine_entry.get("flags", {}).get("static"))  # one shape per input: replay a CUDA graph
            components[name] = TrtComponent(trt, cudart, engine, entry.contract, profile, use_cuda_graph=static)
    except BaseException:
        for component in components.values():  # nothing half-opened stays on the device
            component.close()
        raise
    return components
