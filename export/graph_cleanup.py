"""ONNX graph clean-up after tracing: constant folding, shape inference, dead-node removal.

The TorchScript exporter leaves shape arithmetic (Shape -> Gather -> Unsqueeze -> Concat chains),
Identity nodes and constants that depend on nothing but weights. Folding them gives TensorRT and
ONNX Runtime a smaller graph to optimise and a reader a graph that looks like the model (the tiny UNet
goes from ~1800 to ~1000 nodes; what is left of the shape arithmetic serves the dynamic axes).

Each pass is ONNX shape inference (C++, with data propagation so static parts of shapes become
constants) followed by onnx-graphsurgeon's `fold_constants(fold_shapes=True)` and
`cleanup().toposort()`: the same folding polygraphy's `fold_constants` runs, minus its Python
shape-inference fallback, which costs ~4x the time here for no extra folding.

An export (`clean_file`) cleans the graph without its weights (`weightless`: each becomes a typed graph
input) and then writes the weights as they are, a tensor at a time, so memory does not grow with copies of
them (SD 1.5's UNet is 3.4 GB): the tracer has already folded every expression of weights alone
(`do_constant_folding`), so only shape arithmetic is left to fold and the result is the same graph.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from onnx import shape_inference

from ldm_rt.export.errors import OnnxExportError

log = logging.getLogger(__name__)

# A protobuf cannot be serialised past 2 GiB; stay clear of the limit (the graph itself needs room).
PROTO_LIMIT_BYTES = 2**31 - 64 * 2**20
# Folding passes at most; a pass that removes nothing ends the loop (the UNet settles after one).
FOLD_PASSES = 3


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data the model holds, in memory (raw or typed fields) or in external files."""
    return sum(_nbytes(t) for t in model.graph.initializer)


def needs_external_data(model: onnx.ModelProto) -> bool:
    return initializer_bytes(model) > PROTO_LIMIT_BYTES


def op_histogram(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


# Initializers up to this size stay initializers in `weightless` (and inline in saved files): shape constants
# are among them, and shape inference needs their values.
INLINE_BYTES = 1024


def _nbytes(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        # The tracer's one-file-per-tensor data has no "length": the dims and type say it.
        length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        if length is not None:
            return length
        count = 1
        for d in t.dims:
            count *= d
        try:
            return count * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            return max(count, INLINE_BYTES + 1)
    return len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every weight over INLINE_BYTES (or stored externally) turned into a graph input of the
    same type and shape: what shape inference needs, without the weights, so a model past 2 GiB (or one
    whose data file is not at hand) is inferred like a small one. The weights are not copied."""
    small, weights = [], []
    for t in model.graph.initializer:
        if _nbytes(t) <= INLINE_BYTES and t.data_location != onnx.TensorProto.EXTERNAL:
            small.append(t)
        else:
            weights.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    graph = onnx.helper.make_graph(
        list(model.graph.node), model.graph.name, [*model.graph.input, *weights], list(model.graph.output),
        initializer=small, value_info=list(model.graph.value_info),
    )
    light = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    light.ir_version = model.ir_version
    return light


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    if not needs_external_data(model):
        return shape_inference.infer_shapes(model, data_prop=True)
    # In-memory inference serialises the proto, which cannot pass 2 GiB: infer on the weightless graph and
    # take its shapes. Without them nothing would fold at SD 1.5 size, and ort_attention found no head split.
    inferred = shape_inference.infer_shapes(weightless(model), data_prop=True)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def clean_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants (shapes included where they are static), drop dead nodes, sort, infer shapes."""
    before = count = len(model.graph.node)
    for _ in range(FOLD_PASSES):
        graph = gs.import_onnx(_infer_shapes(model))
        graph.fold_constants(fold_shapes=True, error_ok=False).cleanup(remove_unused_graph_inputs=False).toposort()
        model = gs.export_onnx(graph)
        if len(model.graph.node) >= count:
            break
        count = len(model.graph.node)
    model = _infer_shapes(model)
    log.debug("clean-up: %d -> %d nodes", before, len(model.graph.node))
    return model


# Tensors from 1 MiB up start on a 64 KiB boundary of the .data file (the most onnx's format allows as padding):
# page-aligned data can be memory-mapped by its readers instead of copied.
ALIGN_BYTES = 64 * 1024
ALIGN_FROM = 1 << 20


def external_span(t: onnx.TensorProto, base_dir: Path) -> tuple[Path, int, int | None]:
    """(file, offset, length or None: to its end) of an externally stored tensor's bytes under `base_dir`."""
    info = dict((e.key, e.value) for e in t.external_data)
    return Path(base_dir) / info["location"], int(info.get("offset", 0)), int(info["length"]) if "length" in info else None


def tensor_bytes(t: onnx.TensorProto, base_dir: Path | None) -> bytes:
    """The raw little-endian bytes of one tensor: its raw_data, typed fields, or its span of an external file
    under `base_dir` (read alone: the rest of the file stays on disk)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        if base_dir is None:
            raise OnnxExportError(f"tensor {t.name} is stored externally but its folder is unknown")
        path, offset, length = external_span(t, base_dir)
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length) if length is not None else f.read()
    return t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()


TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _set_inline(t: onnx.TensorProto, raw: bytes) -> None:
    for name in TYPED_FIELDS:
        t.ClearField(name)
    del t.external_data[:]
    t.data_location = onnx.TensorProto.DEFAULT
    t.raw_data = raw


def _write_external(model: onnx.ModelProto, data: Path, base_dir: Path | None) -> None:
    """Move every initializer over INLINE_BYTES into the one file `data`, a tensor at a time: whether it was
    in the proto or in another external file, at most one tensor's bytes are held beside the model."""
    with open(data, "wb") as f:
        for t in model.graph.initializer:
            if _nbytes(t) <= INLINE_BYTES:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    _set_inline(t, tensor_bytes(t, base_dir))
                continue
            raw = tensor_bytes(t, base_dir)
            if len(raw) >= ALIGN_FROM and f.tell() % ALIGN_BYTES:
                f.write(b"\0" * (ALIGN_BYTES - f.tell() % ALIGN_BYTES))
            offset = f.tell()
            f.write(raw)
            _set_inline(t, b"")
            t.ClearField("raw_data")
            del raw
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(f.tell() - offset))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value


def save_model(model: onnx.ModelProto, path: Path, base_dir: Path | None = None) -> list[Path]:
    """Write the model; weights go to `<name>.data` beside it when the proto would pass 2 GiB.
    Tensors still stored externally are read from `base_dir` (the folder of the file `model` was loaded from)
    one at a time. Returns every file written (the .onnx first)."""
    path = Path(path)
    if needs_external_data(model):
        data = path.with_name(path.name + ".data")
        # Tensors under 1 kB (shape constants among them) stay inline, where shape inference can read them.
        _write_external(model, data, base_dir)
        onnx.save_model(model, str(path))
        return [path, data]
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            _set_inline(t, tensor_bytes(t, base_dir))
    write_streamed(model, path)
    return [path]


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose graph has no initializers (everything else copied; the weights never are)."""
    graph = onnx.GraphProto()
    _copy_fields(model.graph, graph, skip="initializer")
    head = onnx.ModelProto()
    _copy_fields(model, head, skip="graph")
    head.graph.CopyFrom(graph)
    return head


def _copy_fields(src, dst, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(dst, fd.name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def write_streamed(model: onnx.ModelProto, path: Path) -> None:
    """The same file onnx.save_model writes, serialised a tensor at a time: protobuf merges repeated occurrences
    of an embedded message field, so the model without its initializers followed by one `graph { initializer }`
    fragment per weight parses as the whole model. Serialising a whole proto peaked at 3x its size here."""
    with open(path, "wb") as f:
        f.write(_without_initializers(model).SerializeToString())
        fragment = onnx.ModelProto()
        for t in model.graph.initializer:
            fragment.graph.initializer.add().CopyFrom(t)
            f.write(fragment.SerializeToString())
            del fragment.graph.initializer[:]


def check_model_file(path: Path) -> None:
    """onnx.checker on the file (path-based, so external data is found), with full shape checking."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxExportError(f"{path} fails the ONNX checker: {first}; report this with the model config") from None


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the graph's nodes read (subgraphs included) and its outputs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used |= _names_read(sub)
    return used


def _rename_inputs(graph: onnx.GraphProto, alias: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _rename_inputs(sub, alias)


def _bypass_weight_identities(graph: onnx.GraphProto, weights: set[str]) -> None:
    """Readers of Identity(weight) read the weight itself. The tracer shares equal weights (GroupNorm's ones and
    zeros) through Identity nodes; folding them with the weights loaded wrote one copy per use, and on the
    weightless graph they would stay as nodes."""
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in weights and n.output[0] not in outputs}
    if not alias:
        return
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    del graph.node[:]
    graph.node.extend(kept)
    _rename_inputs(graph, alias)
    info = [v for v in graph.value_info if v.name not in alias]
    del graph.value_info[:]
    graph.value_info.extend(info)


def _with_weights(model: onnx.ModelProto, cleaned: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its graph replaced by `cleaned` (clean_model of weightless(model)), keeping the weights
    the cleaned graph still reads: they stay the very TensorProtos `model` holds, never copied."""
    weights = {t.name for t in model.graph.initializer if _nbytes(t) > INLINE_BYTES or t.data_location == onnx.TensorProto.EXTERNAL}
    _bypass_weight_identities(cleaned.graph, weights)
    used = _names_read(cleaned.graph)
    g = model.graph
    # Backwards, so indices stay valid; the small initializers come back from the cleaned graph (folded ones too).
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name not in weights or g.initializer[i].name not in used:
            del g.initializer[i]
    g.initializer.extend(cleaned.graph.initializer)
    for field in ("node", "input", "output", "value_info"):
        del getattr(g, field)[:]
    g.node.extend(cleaned.graph.node)
    g.input.extend(v for v in cleaned.graph.input if v.name not in weights)
    g.output.extend(cleaned.graph.output)
    g.value_info.extend(cleaned.graph.value_info)
    return model


def clean_file(src: Path, dst: Path, check: Callable[[onnx.ModelProto], None] | None = None) -> list[Path]:
    """Clean `src` into `dst` and check `dst`; returns the files written. The clean-up runs on the weightless
    graph (weights as typed graph inputs: all the folding needs, as the tracer has folded every weight-only
    expression already) and the weights are then written as they are, a tensor at a time: memory beyond the
    graph is one copy of the weights for a model that fits protobuf (its proto), one tensor for one past 2 GiB
    (whose weights the tracer wrote to files). A full clean-up of the loaded model held 5-6 copies.
    `check(model)` vets the cleaned model before anything is written."""
    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)
    model = _with_weights(model, clean_model(weightless(model)))
    if check is not None:  # before anything is written
        check(model)
    files = save_model(model, dst, base_dir=src.parent)
    del model
    check_model_file(dst)
    return files
