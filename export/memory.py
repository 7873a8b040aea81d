"""Memory a parity run needs at a shape, known before running it, and the memory there is to spend.

A parity case runs the exported graph in ONNX Runtime (and the reference in torch) at one point of the
profile; at the profile's maximum the activations can be far larger than the machine (attention scores grow
with the square of the pixel count: a VAE decoder's attention at 4096 x 4096 px needs terabytes). The
estimate is made on the exported fp32 graph without running it: ONNX Runtime's symbolic shape inference
gives every tensor's shape as a formula of the input dims; walking the nodes in graph order, a tensor is
live from the node that makes it to its last reader (views such as Reshape share their input's buffer),
and the peak of the live bytes, plus a 2-D convolution's unfolded input (im2col), is the estimate.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import onnx
import sympy
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from ldm_rt.export.graph_cleanup import weightless

log = logging.getLogger(__name__)

# Ops whose output ONNX Runtime's CPU provider hands out as a view of (or in place over) the input.
VIEW_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
# What a parity case holds at its peak, beyond what the process holds already: the weights of its heaviest phase
# beside the activations' peak (GraphMemory.peak_bytes). The phases run one after another: the torch reference on
# its weights (views of the checkpoint file, given back by release_weight_pages before the ONNX Runtime sessions
# open), then each session, one at a time, on its own copy (GraphMemory.session_weight_bytes). Torch weights that
# are not views of a file (a legacy pickle, an fp16 file widened to fp32) stay resident beside the sessions, but
# they are resident already when the budget is read: available_memory() has left them out.
TORCH_WEIGHT_COPIES = 1.0
# The fp16 search runs a float16 copy of the model beside the fp32 model it measures blocks against (export/fp16.py).
TORCH_WEIGHT_COPIES_FP16 = 1.5
# Copies of a weight an open ONNX Runtime session holds (ORT_ENABLE_ALL, as the runtime opens it), measured as the
# session's anonymous memory per weight byte: one of every weight (MatMul's packed copy replaces its source: 1.00x
# for a Linear stack with external data; SD 1.5's UNet 1.01x); a Conv weight once more (the NCHWc layout's
# reordered copy beside it: 2.07x for a Conv + GroupNorm stack, 0.02x with that optimisation off); a weight stored
# in the .onnx file itself, not as external data, once more again (the model's bytes kept beside the tensors: a
# Conv stack 3.0x; SD 1.5's VAE decoder 2.78x, its text encoder 1.27x). An upper bound, not always reached: SD 1.5's
# UNet, 69% of its weight bytes in Conv weights, held 1.01x where this counts 1.69x. The fp16 file's session is
# counted as the fp32 file's (not measured: half the bytes, and ONNX Runtime's inserted Casts widen some back).
SESSION_COPIES = 1
CONV_EXTRA_COPIES = 1
INLINE_EXTRA_COPIES = 1
# The share of the available memory one parity case may need (run_bytes). The weights are counted as the phases
# hold them, and the activations' estimate is already above what ONNX Runtime uses, arena rounding included (SD
# 1.5's UNet at 2x4x64x64: 1.15 GiB used, 2.06 GiB estimated); this share leaves room for what neither counts:
# the inputs and reference outputs of the other cases, kept beside the run (each a small part of its own run's
# activations), allocator slack, and the other processes of the machine growing meanwhile. (It was 0.5, with the
# weights counted once, and had to cover a torch copy beside the session too: an SDXL-sized UNet's 9.6 GiB of
# weights fit only with more than 19.3 GiB available, its 1024 px check not on this 24 GB machine.)
MEMORY_FRACTION = 0.85
# A container's memory limit (cgroup v2, then v1) and its current use; /proc/meminfo shows the host's.
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)
# Where the system reports no available memory (not Linux, no sysconf): assume this much.
FALLBACK_AVAILABLE = 4 << 30


class EstimateError(RuntimeError):
    """The graph's tensor shapes cannot be inferred (an op the shape inference does not know)."""


def _itemsize(elem_type: int) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, TypeError, ValueError):  # an element type numpy has no dtype for: count it wide
        return 8


class GraphMemory:
    """Peak bytes of the tensors of one ONNX graph, as a function of its input shapes."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        model = onnx.load(str(path), load_external_data=False)  # shapes only: the weights stay on disk
        weights = {t.name: (list(t.dims), t.data_type) for t in model.graph.initializer}
        try:
            # Weightless: the inference reads initializer values it meets, which for external data is a file
            # it is not told the folder of (it failed on every model past 2 GiB).
            inferred = SymbolicShapeInference.infer_shapes(weightless(model), auto_merge=True)
        except Exception as e:  # the inference raises bare Exceptions for ops it does not handle
            raise EstimateError(f"symbolic shape inference failed on {path.name}: {e}") from None
        if inferred is None:
            raise EstimateError(f"symbolic shape inference could not finish on {path.name}")
        graph = inferred.graph
        self.weights = {name: dims for name, (dims, _) in weights.items()}
        size = {name: math.prod(dims) * _itemsize(dtype) for name, (dims, dtype) in weights.items()}
        self.weight_bytes = sum(size.values())
        conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}
        inline = {t.name for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
        # What an open ONNX Runtime session holds of them (SESSION_COPIES and the extra copies above).
        self.session_weight_bytes = sum(
            b * (SESSION_COPIES + CONV_EXTRA_COPIES * (name in conv_weights) + INLINE_EXTRA_COPIES * (name in inline))
            for name, b in size.items()
        )
        self.inputs = {v.name: _dims(v) for v in graph.input if v.name not in self.weights}
        symbols = {d: sympy.Symbol(d) for dims in self.inputs.values() for d in dims if isinstance(d, str)}
        self.tensors: dict[str, tuple[int, list[int | str]]] = {}  # name -> (itemsize, dims or dim formulas)
        self._formulas: dict[str, object] = {}
        for v in [*graph.input, *graph.value_info, *graph.output]:
            if v.name in self.weights or not v.type.tensor_type.HasField("shape"):
                continue
            dims = _dims(v)
            self.tensors[v.name] = (_itemsize(v.type.tensor_type.elem_type), dims)
            for d in dims:
                if isinstance(d, str) and d not in self._formulas:
                    self._formulas[d] = _formula(d, symbols)
        self.nodes = [(n.op_type, list(n.input), list(n.output)) for n in graph.node]
        self.outputs = {v.name for v in graph.output}
        # A view's buffer is its source's: follow chains of views to the tensor that owns the memory.
        self.owner: dict[str, str] = {}
        for op, ins, outs in self.nodes:
            if op in VIEW_OPS and ins and ins[0] in self.tensors:
                self.owner[outs[0]] = self.owner.get(ins[0], ins[0])
        self.last_use: dict[str, int] = {}
        for i, (_, ins, _) in enumerate(self.nodes):
            for name in ins:
                if name:
                    self.last_use[self.owner.get(name, name)] = i

    def shapes(self, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, tuple[int, ...]]]:
        """(itemsize, shape) of every non-weight tensor at these input shapes."""
        values: dict[str, int] = {}
        for name, dims in self.inputs.items():
            for d, n in zip(dims, input_shapes[name]):
                if isinstance(d, str):
                    values[d] = int(n)
        # A dim the inference left free (a data-dependent size) is taken as large as the largest input dim.
        fallback = max(values.values(), default=1)
        evaluated = {name: _evaluate(f, values, fallback) for name, f in self._formulas.items()}
        return {
            name: (size, tuple(d if isinstance(d, int) else evaluated[d] for d in dims))
            for name, (size, dims) in self.tensors.items()
        }

    def peak_bytes(self, input_shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Peak bytes of live activations (inputs, intermediates, outputs; not the weights) over one run."""
        shapes = self.shapes(input_shapes)
        size = {name: itemsize * math.prod(shape) for name, (itemsize, shape) in shapes.items()}
        live = sum(size[n] for n in self.inputs)
        peak = live
        for i, (op, ins, outs) in enumerate(self.nodes):
            made = sum(size.get(o, 0) for o in outs if o not in self.owner)
            peak = max(peak, live + made + self._workspace(op, ins, outs, shapes))
            live += made
            for name in {self.owner.get(n, n) for n in [*ins, *outs] if n}:
                ended = self.last_use.get(name, i) <= i
                if ended and name in size and name not in self.outputs and name not in self.inputs:
                    live -= size[name]
        return peak

    def _workspace(self, op: str, ins: list[str], outs: list[str], shapes) -> int:
        """Scratch memory of one node: a 2-D convolution's input unfolded for one image (im2col),
        C_in/groups x kh x kw values per output pixel; none for a 1x1 convolution."""
        if op != "Conv" or len(ins) < 2 or outs[0] not in shapes:
            return 0
        w = self.weights.get(ins[1])
        itemsize, out = shapes[outs[0]]
        if w is None or len(w) != 4 or len(out) != 4 or w[2] * w[3] == 1:
            return 0
        return w[1] * w[2] * w[3] * out[2] * out[3] * itemsize


def _dims(v: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]


def _formula(dim: str, symbols: dict[str, sympy.Symbol]):
    """A dim formula such as `floor(latent_height/2 - 1/2) + 1` as a function of the input dims; None for a
    fresh symbol of the inference (a size it could not derive)."""
    try:
        expr = sympy.parse_expr(dim, local_dict=dict(symbols))
    except (sympy.SympifyError, SyntaxError, TypeError):
        return None
    free = sorted(expr.free_symbols, key=str)
    if any(str(s) not in symbols for s in free):
        return None
    return free, sympy.lambdify(free, expr, modules="math")


def _evaluate(formula, values: dict[str, int], fallback: int) -> int:
    if formula is None:
        return fallback
    free, fn = formula
    return max(int(fn(*(values[str(s)] for s in free))), 0)


def available_memory() -> int:
    """Bytes this process can still take: MemAvailable (Linux), capped by a cgroup memory limit (a
    container's real ceiling, which /proc/meminfo does not show)."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = FALLBACK_AVAILABLE
    for limit_file, used_file in CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            used = int(Path(used_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # cgroup v2 writes "max" for no limit
            available = min(available, max(int(limit) - used, 0))
    return available


def parity_budget() -> int:
    """Bytes one parity case may need (run_bytes): a share of what is available now."""
    return int(available_memory() * MEMORY_FRACTION)


def run_bytes(graph: GraphMemory, input_shapes: Mapping[str, tuple[int, ...]], torch_copies: float = TORCH_WEIGHT_COPIES) -> int:
    """Bytes one parity case needs at these input shapes: the weights of its heavier phase, the torch model's
    (`torch_copies` of the weight bytes: TORCH_WEIGHT_COPIES_FP16 with the fp16 search) or an ONNX Runtime
    session's (never resident together), and the activations' peak."""
    return max(int(torch_copies * graph.weight_bytes), graph.session_weight_bytes) + graph.peak_bytes(input_shapes)


def _status_bytes(key: str) -> int | None:
    """A `VmRSS:`/`VmHWM:` line of /proc/self/status in bytes; None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident memory now."""
    return _status_bytes("VmRSS:")


def process_peak_rss() -> int | None:
    """This process's peak resident memory so far (the kernel's high-water mark; getrusage where there is no
    procfs). Never reset here: an outer `time -v` measures the same process."""
    peak = _status_bytes("VmHWM:")
    if peak is not None:
        return peak
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except (ImportError, OSError):
        return None


# How often RssWatch samples. Filling a GB takes well over this, so a peak that matters is not missed; a
# C++ call that holds the GIL delays samples, which is why process_peak_rss is recorded beside.
SAMPLE_SECONDS = 0.02


class RssWatch:
    """The peak resident memory of this process while a block runs, sampled by a daemon thread:
    `with RssWatch() as w: ...`, then `w.peak` (bytes; None where there is no procfs) and `w.record()`."""

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        import threading

        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ldm-rt-rss-watch", daemon=True)

    def _sample(self) -> None:
        now = rss_bytes()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssWatch:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def record(self) -> dict[str, int]:
        """What the manifest keeps: the sampled peak of the block and the process's exact peak so far."""
        out = {}
        if self.peak is not None:
            out["peak_rss_bytes"] = self.peak
        process = process_peak_rss()
        if process is not None:  # the kernel's per-thread RSS counters lag by a few pages: never below a sample
            out["process_peak_rss_bytes"] = max(process, self.peak or 0)
        return out


# madvise(2) advice: reclaim these pages now (Linux 5.4+). Clean file pages are dropped (read again from the file
# when next touched), dirty ones written back, anonymous ones swapped out if there is swap and kept otherwise:
# the data is never lost, so it is safe on weights a LoRA fusion has written to as well.
MADV_PAGEOUT = 21
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed mappings (/proc/self/maps lines that name a file)."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    start, end = fields[0].split("-")
                    spans.append((int(start, 16), int(end, 16)))
    except OSError:
        pass
    return spans


def _merged(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def release_weight_pages(tensors: Iterable) -> int:
    """Hand the resident pages of these torch tensors' file-backed storage back to the kernel; returns the bytes
    advised. The reference models load safetensors weights as views of the file (reference/model_folder.py
    load_strict(assign=True)), so a component whose torch weights are not needed for a while (its ONNX parity
    runs, the next component's export) need not keep them resident: they are read from the file again where they
    are next used. Anonymous memory (weights converted or copied at load) is left alone. A kernel without
    MADV_PAGEOUT, or a system without procfs, releases nothing."""
    mapped = _file_mappings()
    if not mapped:
        return 0
    storages = _merged(
        (t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
        for t in tensors if t.device.type == "cpu" and t.untyped_storage().nbytes() > 0
    )
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for start, end in storages:
        for m_start, m_end in mapped:
            # Whole pages of the storage inside one file mapping: a page shared with a neighbour tensor goes too,
            # which is harmless (it is read again when touched).
            lo = max(start, m_start) // PAGE_BYTES * PAGE_BYTES
            hi = min(end, m_end)
            hi = -(-hi // PAGE_BYTES) * PAGE_BYTES
            hi = min(hi, m_end)
            if hi <= lo:
                continue
            if madvise(lo, hi - lo, MADV_PAGEOUT) != 0:
                log.debug("madvise(MADV_PAGEOUT) failed (errno %d); weights stay resident", ctypes.get_errno())
                return advised
            advised += hi - lo
    return advised


# How often ReleaseWhileRunning gives the pages back: reading more than a GB of weights takes longer than this.
RELEASE_SECONDS = 0.5


class ReleaseWhileRunning:
    """`with ReleaseWhileRunning(tensors): ...` calls release_weight_pages(tensors) every RELEASE_SECONDS while the
    block runs, and once at its end. For torch.onnx.export of a model past 2 GiB: its constant folding makes a
    transposed copy of every bias-free Linear weight (MatMul takes W^T) while the trace has read every weight of the
    model, so the file's pages and the copies were resident together (SDXL's UNet: 10.3 GB of weights, the trace
    passed 15 GB); given back as it goes, each weight is resident only while it is read."""

    def __init__(self, tensors: Iterable, interval: float = RELEASE_SECONDS) -> None:
        import threading

        self.tensors = list(tensors)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ldm-rt-release-weights", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            release_weight_pages(self.tensors)

    def __enter__(self) -> ReleaseWhileRunning:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        release_weight_pages(self.tensors)
