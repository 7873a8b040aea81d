"""Stand-ins for tensorrt and cuda-python's runtime module: the GPU code paths tested where there is no GPU.

FakeCudart hands out host memory as "device" memory, so copies really move bytes, and every copy is checked
to stay inside one allocation; it counts what is created and destroyed. FakeEngine's execution context
computes each output as 2 x the first input (`sample` -> `out_sample`). fake_tensorrt() builds a tensorrt
module whose BuilderFlag and NetworkDefinitionCreationFlag hold only the members a given TensorRT release
has, so asking for a removed flag is an AttributeError, as with the real module.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
from collections import Counter
from types import ModuleType, SimpleNamespace

import numpy as np

ERROR_NAMES = {0: b"cudaSuccess", 35: b"cudaErrorInsufficientDriver", 100: b"cudaErrorNoDevice", 2: b"cudaErrorMemoryAllocation"}


class FakeCudart:
    """cuda-python's runtime API as cuda.bindings.runtime / cuda.cudart expose it: every call returns (err, *values)."""

    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h")
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeGlobal="global")

    def __init__(self, device_count: int = 1, error: int = 0, driver: int = 13000, runtime: int = 13000,
                 fail_malloc_after: int | None = None) -> None:
        self.device_count, self.error, self.driver, self.runtime = device_count, error, driver, runtime
        self.fail_malloc_after = fail_malloc_after  # the n-th cudaMalloc onwards fails (out of memory)
        self.memory: dict[int, np.ndarray] = {}  # device pointer -> the host buffer standing in for it
        self.streams: set[int] = set()
        self.graphs: dict[int, list] = {}  # captured graphs
        self.execs: dict[int, list] = {}  # instantiated graphs
        self.capture: list | None = None  # launches recorded while a stream is being captured
        self.calls: Counter[str] = Counter()
        self._ids = itertools.count(1000)

    # ---- discovery -------------------------------------------------------------------------------------------
    def cudaGetDeviceCount(self):
        return (self.error, self.device_count if self.error == 0 else 0)

    def cudaDriverGetVersion(self):
        return (0, self.driver)

    def cudaRuntimeGetVersion(self):
        return (0, self.runtime)

    def cudaGetErrorName(self, err):
        return (0, ERROR_NAMES.get(int(err), b"cudaErrorUnknown"))

    def cudaGetDevice(self):
        return (0, 0)

    def cudaGetDeviceProperties(self, device):
        return (0, SimpleNamespace(name=b"Fake GPU\0\0\0", major=8, minor=9))

    # ---- memory and streams ----------------------------------------------------------------------------------
    def cudaMalloc(self, nbytes: int):
        self.calls["cudaMalloc"] += 1
        if self.fail_malloc_after is not None and self.calls["cudaMalloc"] >= self.fail_malloc_after:
            return (2, 0)
        buf = np.zeros(nbytes, np.uint8)
        self.memory[buf.ctypes.data] = buf
        return (0, buf.ctypes.data)

    def cudaFree(self, ptr: int):
        self.calls["cudaFree"] += 1
        del self.memory[ptr]  # a double free is a KeyError
        return (0,)

    def _check_device_range(self, ptr: int, nbytes: int) -> None:
        for base, buf in self.memory.items():
            if base <= ptr and ptr + nbytes <= base + buf.nbytes:
                return
        raise AssertionError(f"a copy of {nbytes} bytes at {ptr:#x} is outside every device allocation")

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: str, stream: int):
        self.calls["cudaMemcpyAsync"] += 1
        assert stream in self.streams
        self._check_device_range(dst if kind == "h2d" else src, nbytes)
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamCreate(self):
        stream = next(self._ids)
        self.streams.add(stream)
        return (0, stream)

    def cudaStreamDestroy(self, stream: int):
        self.streams.remove(stream)
        return (0,)

    def cudaStreamSynchronize(self, stream: int):
        return (0,)

    # ---- CUDA graphs -----------------------------------------------------------------------------------------
    def cudaStreamBeginCapture(self, stream: int, mode):
        assert self.capture is None, "a capture is already under way"
        self.capture = []
        return (0,)

    def cudaStreamEndCapture(self, stream: int):
        graph = next(self._ids)
        self.graphs[graph], self.capture = self.capture, None
        return (0, graph)

    def cudaGraphInstantiate(self, graph: int, flags: int):
        exec_ = next(self._ids)
        self.execs[exec_] = list(self.graphs[graph])
        return (0, exec_)

    def cudaGraphDestroy(self, graph: int):
        del self.graphs[graph]
        return (0,)

    def cudaGraphExecDestroy(self, exec_: int):
        del self.execs[exec_]
        return (0,)

    def cudaGraphLaunch(self, exec_: int, stream: int):
        self.calls["cudaGraphLaunch"] += 1
        for launch in self.execs[exec_]:
            launch()
        return (0,)

    def held(self) -> dict[str, int]:
        """What is still allocated on the fake device."""
        return {"buffers": len(self.memory), "streams": len(self.streams), "graphs": len(self.graphs), "execs": len(self.execs)}


def _device_array(ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype).reshape(shape)


class FakeContext:
    """An IExecutionContext: shapes within the engine's own profile, out = 2 x the first input."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.launches = 0

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        lo, hi = self.engine.accepts.get(name, (None, None))
        if lo is not None and not all(a <= n <= b for n, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[self.engine.first_input]  # every fake output has its first input's shape

    def _compute(self) -> None:
        self.launches += 1
        src, shape = self.addresses[self.engine.first_input], self.shapes[self.engine.first_input]
        out = 2 * _device_array(src, shape, np.float32)
        for name in self.engine.outputs:
            ctypes.memmove(self.addresses[name], np.ascontiguousarray(out).ctypes.data, out.nbytes)

    def execute_async_v3(self, stream: int) -> bool:
        if not self.engine.launch_ok:
            return False
        cudart = self.engine.cudart
        if cudart.capture is not None:
            cudart.capture.append(self._compute)  # runs when the graph is launched
        else:
            self._compute()
        return True


class FakeEngine:
    """An ICudaEngine. `accepts`: {input: (min shape, max shape)} the engine itself takes (default: anything)."""

    def __init__(self, cudart: FakeCudart, contract, accepts: dict | None = None, launch_ok: bool = True) -> None:
        self.cudart, self.accepts, self.launch_ok = cudart, accepts or {}, launch_ok
        self.first_input = contract.inputs[0].name
        self.outputs = [t.name for t in contract.outputs]
        self.contexts: list[FakeContext] = []

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


# ---- the TensorRT builder API -------------------------------------------------------------------------------
# BuilderFlag members of TensorRT 10.x (the Python enum's names).
TRT10_BUILDER_FLAGS = (
    "FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS", "SAFETY_SCOPE",
    "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS",
    "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8", "ERROR_ON_TIMING_CACHE_MISS", "BF16", "DISABLE_COMPILATION_CACHE",
    "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING", "INT4", "REFIT_INDIVIDUAL", "STRICT_NANS", "MONITOR_MEMORY", "FP4",
)  # fmt: skip
# Removed in TensorRT 11 (its migration guide): the weak-typing precision flags and what only they needed.
TRT11_REMOVED = {
    "FP16", "INT8", "FP8", "BF16", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO",
}  # fmt: skip
PRECISION_FLAGS = TRT11_REMOVED | {"STRICT_TYPES"}  # STRICT_TYPES went in TensorRT 10 already


class FakeBuildLog:
    """What the fake builder was asked for."""

    def __init__(self) -> None:
        self.network_flags: list[int] = []
        self.set_flags: list[str] = []
        self.cleared_flags: list[str] = []
        self.shapes: dict[str, tuple] = {}
        self.parsed: list[str] = []
        self.timing_cache_in: list[bytes] = []


def fake_tensorrt(version: str, builder_flags, network_flags, parse_errors: tuple[str, ...] = ()) -> ModuleType:
    """A tensorrt module with only the given BuilderFlag / NetworkDefinitionCreationFlag members; `.log` records calls."""
    trt = ModuleType("tensorrt")
    trt.__version__ = version
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", list(builder_flags), start=0)
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", list(network_flags), start=0)
    log = trt.log = FakeBuildLog()

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data + b"+timings"

    class Config:
        def __init__(self) -> None:
            self.profiles: list = []
            self.cache: TimingCache | None = None

        def set_flag(self, flag) -> None:
            log.set_flags.append(trt.BuilderFlag(flag).name)

        def clear_flag(self, flag) -> None:
            log.cleared_flags.append(trt.BuilderFlag(flag).name)

        def add_optimization_profile(self, profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache:
            log.timing_cache_in.append(bytes(data))
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            return self.cache

    class Profile:
        def set_shape(self, name: str, lo, opt, hi) -> None:
            log.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> SimpleNamespace:
            log.network_flags.append(flags)
            return SimpleNamespace(flags=flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network, config: Config) -> bytes | None:
            return b"PLAN " + str(sorted(log.shapes.items())).encode() if config.profiles else None

    class OnnxParser:
        def __init__(self, network, logger: Logger) -> None:
            self.num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            log.parsed.append(path)
            self.num_errors = len(parse_errors)
            return not parse_errors

        def get_error(self, i: int) -> str:
            return parse_errors[i]

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


def tensorrt_10() -> ModuleType:
    return fake_tensorrt("10.13.3.9", TRT10_BUILDER_FLAGS, ("EXPLICIT_BATCH", "STRONGLY_TYPED"))


def tensorrt_11() -> ModuleType:
    # No TF32 either: nothing in our build may depend on a flag that a later release could drop.
    flags = [f for f in TRT10_BUILDER_FLAGS if f not in TRT11_REMOVED | {"TF32"}]
    return fake_tensorrt("11.4.0.106", flags, ("STRONGLY_TYPED",))
