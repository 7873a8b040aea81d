"""At export: which ONNX initializer holds each weight a LoRA may adapt, so the runtime can patch it (lora_targets.json).

The tracer names a Conv's weight after its parameter (`unet.input_blocks.1.0.in_layers.2.weight`) but a
bias-free Linear becomes a MatMul on an anonymous, transposed constant (`onnx::MatMul_1581`, W^T), and a
Linear with a bias may become a Gemm on W itself; the fp16 file holds the same weights in fp16 (or fp32 in
the blocks export/fp16.py kept in fp32). Names cannot be trusted, so each weight is found by content: the
initializer whose bytes equal W or W^T, in float32 or float16. A weight found in no initializer, or in more
than one, or an initializer two weights claim, is left out (the runtime then says to fuse that LoRA at export
instead). Our attention export keeps q, k and v as three MatMuls (export/ort_attention.py fuses only the
attention core and never touches initializers), so no packed projections occur. A weight found nowhere because
the outputs do not depend on it (a text encoder read at its penultimate layer: SD 2.x, SDXL's first; the
exporter drops the last layer) is listed as unused: a LoRA on it changes nothing, so the runtime skips it, as
adapting it in diffusers changes nothing. Unused means autograd's gradient of the outputs never reaches it.

The file lists, per ONNX file (path relative to the artifacts folder, with its sha256): the component and, per
module (our name, runtime/lora.ModuleTable), its initializer and layout; plus the module table itself (names
and shapes), so the runtime resolves LoRA keys without torch.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ldm_rt.export.graph_cleanup import external_span
from ldm_rt.export.memory import release_weight_pages
from ldm_rt.reference.export_wrappers import export_wrappers
from ldm_rt.reference.ldm import LatentDiffusion
from ldm_rt.reference.lora import lora_module_table
from ldm_rt.runtime.atomic import atomic_write_text
from ldm_rt.runtime.lora import TARGETS_FILE, LoraTargets, Target
from ldm_rt.runtime.manifest import ComponentEntry


# Values sampled from each tensor for its fingerprint: distinct weights of one shape almost never agree on all of
# them, and a shared fingerprint costs only one more full comparison (the comparison, not the sample, decides).
SAMPLES = 32
# Elements compared at a time in the exact check: a few tens of MB beside the one weight being looked for.
CHUNK_ELEMENTS = 1 << 22


def sample_positions(count: int) -> np.ndarray:
    """The flat positions a tensor of `count` elements is sampled at: half evenly strided, half scattered by a
    fixed multiplicative (golden-ratio) hash, so neither a regular layout nor a constant block makes them alike."""
    if count == 0:
        return np.zeros(0, np.int64)
    strided = np.linspace(0, count - 1, SAMPLES // 2).astype(np.int64)
    scattered = (np.arange(SAMPLES // 2, dtype=np.int64) * 0x9E3779B1 + 7) % count
    return np.unique(np.concatenate([strided, scattered]))


def fingerprint(values: np.ndarray, dtype: np.dtype) -> bytes:
    """The bytes of `values` (a tensor in its stored layout, any strides) at sample_positions, cast to `dtype`."""
    samples = values[np.unravel_index(sample_positions(values.size), values.shape)]
    return samples.astype(dtype).tobytes()


class _Initializers:
    """The float initializers (2-D and 4-D) of one ONNX file, their values read a span at a time from where the
    file keeps them: the external data file (past 2 GiB) or the loaded proto. The model is loaded without its
    external data, so the weights are never all in memory at once beside the torch ones."""

    def __init__(self, path: Path, files: ExitStack) -> None:
        self.model = onnx.load(str(path), load_external_data=False)
        self.base = path.parent
        self.stack = files
        self.opened: dict[Path, BinaryIO] = {}

    def tensors(self) -> Iterator[tuple[onnx.TensorProto, np.dtype]]:
        for t in self.model.graph.initializer:
            if len(t.dims) in (2, 4) and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                yield t, np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")  # ONNX stores little-endian

    def reader(self, t: onnx.TensorProto, dtype: np.dtype) -> Callable[[int, int], np.ndarray]:
        """read(start, count): the flat elements [start, start + count) of `t`."""
        if t.data_location == onnx.TensorProto.EXTERNAL:
            path, offset, _ = external_span(t, self.base)
            if path not in self.opened:
                self.opened[path] = self.stack.enter_context(path.open("rb"))
            f = self.opened[path]

            def read(start: int, count: int) -> np.ndarray:
                f.seek(offset + start * dtype.itemsize)
                return np.frombuffer(f.read(count * dtype.itemsize), dtype)

            return read
        # Inline: one copy of this tensor's values (protobuf hands raw_data out as a new bytes object).
        whole = np.frombuffer(t.raw_data, dtype) if t.HasField("raw_data") else numpy_helper.to_array(t).astype(dtype).reshape(-1)
        return lambda start, count: whole[start : start + count]

    def index(self) -> dict[tuple[str, tuple[int, ...]], dict[bytes, list[onnx.TensorProto]]]:
        """(dtype, shape) -> fingerprint -> the initializers of that layout with that fingerprint."""
        index: dict[tuple[str, tuple[int, ...]], dict[bytes, list[onnx.TensorProto]]] = defaultdict(lambda: defaultdict(list))
        for t, dtype in self.tensors():
            shape = tuple(t.dims)
            index[(dtype.str, shape)][self.samples(t, dtype, sample_positions(int(np.prod(shape)))).tobytes()].append(t)
        return index

    def samples(self, t: onnx.TensorProto, dtype: np.dtype, positions: np.ndarray) -> np.ndarray:
        read = self.reader(t, dtype)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            return np.concatenate([read(int(p), 1) for p in positions] or [np.zeros(0, dtype)])  # a few small reads
        return read(0, int(positions[-1]) + 1 if len(positions) else 0)[positions]

    def equal(self, t: onnx.TensorProto, dtype: np.dtype, values: np.ndarray) -> bool:
        """Whether `t` holds exactly the bytes of `values` (its stored layout, any strides) cast to `dtype`, compared
        a chunk of rows at a time (no copy of the whole weight, no read of the whole initializer at once)."""
        if values.size == 0:
            return True  # empty, of the same shape (the index is by shape)
        read = self.reader(t, dtype)
        rows = values.reshape(values.shape[0], -1)  # (rows, rest): a view for a contiguous 4-D or a transposed 2-D weight
        step = max(1, CHUNK_ELEMENTS // rows.shape[1])
        bits = np.dtype(f"<u{dtype.itemsize}")  # bytes, not values: -0.0 is not 0.0, a NaN equals its own bytes
        for i in range(0, rows.shape[0], step):
            expected = rows[i : i + step].astype(dtype, order="C", copy=False).reshape(-1)
            got = read(i * rows.shape[1], expected.size)
            if got.size != expected.size or not np.array_equal(got.view(bits), expected.view(bits)):
                return False
        return True


def _hits(store: _Initializers, index: dict, w: np.ndarray) -> list[tuple[str, bool]]:
    """(initializer, transposed) for each place holding the bytes of `w` or `w.T`, as float32 or float16; at most two
    (two already leave the weight out, so many equal tensors, e.g. zero-initialised ones, cost two comparisons)."""
    hits: list[tuple[str, bool]] = []
    for dtype in (np.dtype("<f4"), np.dtype("<f2")):
        for transposed, a in ((False, w), (True, w.T)) if w.ndim == 2 else ((False, w),):
            bucket = index.get((dtype.str, a.shape))
            if not bucket:  # only layouts some initializer has are compared (an fp32 file holds no float16 tensor)
                continue
            for t in bucket.get(fingerprint(a, dtype), []):
                if store.equal(t, dtype, a):
                    hits.append((t.name, transposed))
                    if len(hits) == 2:
                        return hits
    return hits


def locate(path: Path, weights: dict[str, np.ndarray]) -> dict[str, Target]:
    """module -> Target for every weight (float32 numpy, the module's layout) found exactly once in `path`.
    Candidates share the weight's layout (dtype, shape) and fingerprint; a full comparison confirms each."""
    with ExitStack() as files:
        store = _Initializers(path, files)
        index = store.index()
        found: dict[str, Target] = {}
        claimed: dict[str, list[str]] = defaultdict(list)
        for module, w in weights.items():
            hits = _hits(store, index, w)
            if len(hits) == 1:
                found[module] = Target(hits[0][0], hits[0][1])
                claimed[hits[0][0]].append(module)
    return {m: t for m, t in found.items() if len(claimed[t.initializer]) == 1}


def component_weights(model: LatentDiffusion, component: str, modules: list[str]) -> dict[str, np.ndarray]:
    named = dict(getattr(model, component).named_modules())
    return {m: named[m].weight.detach().to(torch.float32).cpu().numpy() for m in modules}


def unused_modules(model: LatentDiffusion, component: str, entry: ComponentEntry, modules: list[str]) -> list[str]:
    """Those of `modules` whose weights the component's outputs do not depend on: the gradient of the outputs,
    at the contract's smallest sample inputs, never reaches them."""
    if not modules:
        return []
    wrapper = export_wrappers(model)[component]
    named = dict(getattr(model, component).named_modules())
    weights = [named[m].weight for m in modules]
    feeds = entry.contract.sample_inputs({d.name: d.min for d in entry.contract.dims}, np.random.default_rng(0))
    inputs = [torch.from_numpy(feeds[n]) for n in wrapper.input_names if n in feeds]
    was = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            outputs = wrapper(*inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            total = sum(o.float().sum() for o in outputs)
            grads = torch.autograd.grad(total, weights, allow_unused=True)
    finally:
        for w, r in zip(weights, was):
            w.requires_grad_(r)
    return [m for m, g in zip(modules, grads) if g is None]


def record_targets(model: LatentDiffusion, root: Path, components: dict[str, ComponentEntry]) -> LoraTargets:
    """Locate every LoRA-targetable weight in every ONNX file of the build in `root`; write lora_targets.json."""
    table = lora_module_table(model)
    files: dict[str, dict] = {}
    for name, entry in components.items():
        if name not in table:
            continue  # the autoencoder: no LoRA format adapts it
        weights = component_weights(model, name, list(table[name]))
        unused: list[str] | None = None
        for pe in entry.precisions.values():
            for fe in [pe.onnx] + ([pe.ort.onnx] if pe.ort is not None else []):
                targets = locate(root / fe.file, weights)
                if unused is None:  # the same for every file of the component; asked only when some weight is missing
                    unused = unused_modules(model, name, entry, [m for m in weights if m not in targets])
                files[fe.file] = {"sha256": fe.sha256, "component": name, "targets": targets,
                                  "unused": [m for m in unused if m not in targets]}  # fmt: skip
        release_weight_pages(getattr(model, name).parameters())  # read from the file again only if used again
    result = LoraTargets({c: dict(ms) for c, ms in table.items()}, files)
    atomic_write_text(root / TARGETS_FILE, json.dumps(result.to_dict(), indent=1) + "\n")
    return result
