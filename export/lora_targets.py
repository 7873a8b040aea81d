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

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from ldm_rt.export.graph_cleanup import tensor_bytes
from ldm_rt.export.memory import release_weight_pages
from ldm_rt.reference.export_wrappers import export_wrappers
from ldm_rt.reference.ldm import LatentDiffusion
from ldm_rt.reference.lora import lora_module_table
from ldm_rt.runtime.atomic import atomic_write_text
from ldm_rt.runtime.lora import TARGETS_FILE, LoraTargets, Target
from ldm_rt.runtime.manifest import ComponentEntry


def _digest(array: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    a = np.ascontiguousarray(array)
    return a.dtype.str, tuple(a.shape), hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


def _initializer_index(path: Path) -> dict[tuple, list[str]]:
    """content digest -> names of the float initializers (2-D and 4-D) of the ONNX file. The weights are read a
    tensor at a time (from the external data file past 2 GiB): never the whole model at once beside the torch one."""
    model = onnx.load(str(path), load_external_data=False)
    index: dict[tuple, list[str]] = defaultdict(list)
    for t in model.graph.initializer:
        if len(t.dims) in (2, 4) and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")  # ONNX stores little-endian
            raw = tensor_bytes(t, path.parent)
            index[(dtype.str, tuple(t.dims), hashlib.blake2b(raw, digest_size=16).hexdigest())].append(t.name)
            del raw
    return index


def locate(path: Path, weights: dict[str, np.ndarray]) -> dict[str, Target]:
    """module -> Target for every weight (float32 numpy, the module's layout) found exactly once in `path`."""
    index = _initializer_index(path)
    # Only layouts some initializer has are hashed (an fp32 file holds no float16 tensor to compare with).
    layouts = {key[:2] for key in index}
    found: dict[str, Target] = {}
    claimed: dict[str, list[str]] = defaultdict(list)
    for module, w in weights.items():
        hits = []
        for dtype in (np.float32, np.float16):
            for transposed, a in ((False, w), (True, w.T)) if w.ndim == 2 else ((False, w),):
                if (np.dtype(dtype).str, a.shape) in layouts:
                    hits += [(name, transposed) for name in index.get(_digest(a.astype(dtype)), [])]
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
