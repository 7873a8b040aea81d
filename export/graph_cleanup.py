"""ONNX graph clean-up after tracing: constant folding, shape inference, dead-node removal.

The TorchScript exporter leaves shape arithmetic (Shape -> Gather -> Unsqueeze -> Concat chains),
Identity nodes and constants that depend on nothing but weights. Folding them gives TensorRT and
ONNX Runtime a smaller graph to optimise and a reader a graph that looks like the model (the tiny UNet
goes from ~1800 to ~1000 nodes; what is left of the shape arithmetic serves the dynamic axes).

Each pass is ONNX shape inference (C++, with data propagation so static parts of shapes become
constants) followed by onnx-graphsurgeon's `fold_constants(fold_shapes=True)` and
`cleanup().toposort()`: the same folding polygraphy's `fold_constants` runs, minus its Python
shape-inference fallback, which costs ~4x the time here for no extra folding.
"""

from __future__ import annotations

import logging
from collections import Counter
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
    """Bytes of weight data the model holds in memory (raw or typed fields)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes
    return total


def needs_external_data(model: onnx.ModelProto) -> bool:
    return initializer_bytes(model) > PROTO_LIMIT_BYTES


def op_histogram(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


# Initializers up to this size stay initializers in `weightless` (and inline in saved files): shape constants
# are among them, and shape inference needs their values.
INLINE_BYTES = 1024


def _nbytes(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return next((int(e.value) for e in t.external_data if e.key == "length"), INLINE_BYTES + 1)
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


def save_model(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write the model; weights go to `<name>.data` beside it when the proto would pass 2 GiB.
    Returns every file written (the .onnx first)."""
    path = Path(path)
    if needs_external_data(model):
        data = path.with_name(path.name + ".data")
        # Tensors under 1 kB (shape constants among them) stay inline, where shape inference can read them.
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=INLINE_BYTES
        )
        return [path, data] if data.is_file() else [path]
    onnx.save_model(model, str(path))
    return [path]


def check_model_file(path: Path) -> None:
    """onnx.checker on the file (path-based, so external data is found), with full shape checking."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxExportError(f"{path} fails the ONNX checker: {first}; report this with the model config") from None


def clean_file(src: Path, dst: Path) -> list[Path]:
    """Load `src` (with any external data beside it), clean it, save it as `dst` and check `dst`;
    returns the files written."""
    model = onnx.load(str(src), load_external_data=True)
    files = save_model(clean_model(model), dst)
    check_model_file(dst)
    return files
