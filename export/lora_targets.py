"""At export: which ONNX initializer holds each weight a LoRA may adapt, so the runtime can patch it (lora_targets.json).

The tracer names a Conv's weight after its parameter (`unet.input_blocks.1.0.in_layers.2.weight`) but a
bias-free Linear becomes a MatMul on an anonymous, transposed constant (`onnx::MatMul_1581`, W^T), and a
Linear with a bias may become a Gemm on W itself; the fp16 file holds the same weights in fp16 (or fp32 in
the blocks export/fp16.py kept in fp32). Names cannot be trusted, so each weight is found by content: the
initializer whose bytes equal W or W^T, in float32 or float16. A weight found in no initializer, or in more
than one, or an initializer two weights claim, is left out (the runtime then says to fuse that LoRA at export
instead). Our attention export keeps q, k and v as three MatMuls (export/ort_attention.py fuses only the
attention core and never touches initializers), so no packed projections occur.

The file lists, per ONNX file (path relative to the artifacts folder, with its sha256): the component and, per
module (our name, runtime/lora.ModuleTable), its initializer and layout; plus the module table itself (names
and shapes), so the runtime resolves LoRA keys without torch.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ldm_rt.reference.ldm import LatentDiffusion
from ldm_rt.reference.lora import lora_module_table
from ldm_rt.runtime.atomic import atomic_write_text
from ldm_rt.runtime.lora import TARGETS_FILE, LoraTargets, Target
from ldm_rt.runtime.manifest import ComponentEntry


def _digest(array: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    a = np.ascontiguousarray(array)
    return a.dtype.str, tuple(a.shape), hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


def _initializer_index(path: Path) -> dict[tuple, list[str]]:
    """content digest -> names of the float initializers (2-D and 4-D) of the ONNX file."""
    model = onnx.load(str(path), load_external_data=True)
    index: dict[tuple, list[str]] = defaultdict(list)
    for t in model.graph.initializer:
        if len(t.dims) in (2, 4) and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            index[_digest(numpy_helper.to_array(t))].append(t.name)
    return index


def locate(path: Path, weights: dict[str, np.ndarray]) -> dict[str, Target]:
    """module -> Target for every weight (float32 numpy, the module's layout) found exactly once in `path`."""
    index = _initializer_index(path)
    found: dict[str, Target] = {}
    claimed: dict[str, list[str]] = defaultdict(list)
    for module, w in weights.items():
        hits = []
        for dtype in (np.float32, np.float16):
            hits += [(name, False) for name in index.get(_digest(w.astype(dtype)), [])]
            if w.ndim == 2:
                hits += [(name, True) for name in index.get(_digest(w.T.astype(dtype)), [])]
        if len(hits) == 1:
            found[module] = Target(hits[0][0], hits[0][1])
            claimed[hits[0][0]].append(module)
    return {m: t for m, t in found.items() if len(claimed[t.initializer]) == 1}


def component_weights(model: LatentDiffusion, component: str, modules: list[str]) -> dict[str, np.ndarray]:
    named = dict(getattr(model, component).named_modules())
    return {m: named[m].weight.detach().to(torch.float32).cpu().numpy() for m in modules}


def record_targets(model: LatentDiffusion, root: Path, components: dict[str, ComponentEntry]) -> LoraTargets:
    """Locate every LoRA-targetable weight in every ONNX file of the build in `root`; write lora_targets.json."""
    table = lora_module_table(model)
    files: dict[str, dict] = {}
    for name, entry in components.items():
        if name not in table:
            continue  # the autoencoder: no LoRA format adapts it
        weights = component_weights(model, name, list(table[name]))
        for pe in entry.precisions.values():
            for fe in [pe.onnx] + ([pe.ort.onnx] if pe.ort is not None else []):
                targets = locate(root / fe.file, weights)
                files[fe.file] = {"sha256": fe.sha256, "component": name, "targets": targets}
    result = LoraTargets({c: dict(ms) for c, ms in table.items()}, files)
    atomic_write_text(root / TARGETS_FILE, json.dumps(result.to_dict(), indent=1) + "\n")
    return result
