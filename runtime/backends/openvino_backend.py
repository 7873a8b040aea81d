"""OpenVINO backend: OpenVINO's own runtime (`pip install 'ldm-rt[openvino]'`) on the portable ONNX files, on
its CPU device: any x86-64 CPU, Intel or AMD (OpenVINO's ONNX Runtime plugin finds no device on AMD).

Each component's portable ONNX is read with `Core.read_model` (never the ONNX Runtime variant: its
com.microsoft contrib ops are not ONNX) after its hash is checked against the manifest, and compiled once
with its dynamic batch and sizes, so one compiled model serves every request size. Compile settings:
INFERENCE_NUM_THREADS = `HostOptions.threads` or the physical cores; INFERENCE_PRECISION_HINT f32 (OpenVINO
would pick bf16 on CPUs with AMX), bf16 only when `HostOptions.reduced_precision` asks and the CPU has it;
CACHE_DIR = `HostOptions.compile_cache`/openvino, where compiled graphs are kept for the next process.

With a cache, an unpatched component is compiled from its path, not from a read model: OpenVINO then keys the
cache entry on the path and the settings alone and, when the entry exists, neither parses the ONNX nor reads or
hashes its weights (from a read model it hashes every weight for the key, and the first image then reads the
weights a second time from the blob: SD 1.5's UNet read 3.4 GB twice). Because a path's key ignores what the file
holds, each file gets a cache folder of its own named after its manifest hash (the file is checked against that
hash first, `verified_file`), so a rebuilt model compiles afresh. A patched component (LoRA, embeddings) is read,
patched and compiled without the cache.

Thread safety: a compiled model is shared, an infer request is not; each `run` borrows an idle request from
the component's pool (a new one when all are busy) and gives it back, so concurrent calls never share one.

LoRAs at run time (runtime/lora.py): the ONNX frontend names each weight's Constant after its initializer, so
the Constants lora_targets.json names are replaced in the read model, before it compiles, by ones holding
the patched weights; the files on disk are never modified, and files with external data work alike.
"""

from __future__ import annotations

import hashlib
import logging
import queue
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts import ComponentContract
from ..embeddings import TokenRows, token_table
from ..lora import LoraError, LoraFile, patched_initializers, run_time_deltas
from ..manifest import ArtifactError, Manifest
from .base import BackendError, HostOptions, cache_folder, physical_cores, precision_entry, verified_file

log = logging.getLogger(__name__)

DEVICE = "CPU"
MISSING = "the openvino backend needs OpenVINO: pip install 'ldm-rt[openvino]' (or use --backend onnxruntime)"


def import_openvino() -> Any:
    """The openvino module, imported when this backend is opened (it is an optional extra)."""
    try:
        import openvino
    except ImportError:
        raise BackendError(MISSING) from None
    return openvino


def has_bf16(core: Any) -> bool:
    """Whether OpenVINO's CPU device computes in bf16 here (AVX512-BF16 or AMX)."""
    return "BF16" in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")


def compile_config(core: Any, host: HostOptions) -> dict[str, Any]:
    """What every component is compiled with (the module docstring says why)."""
    precision = "f32"
    if host.reduced_precision:
        if has_bf16(core):
            precision = "bf16"
        else:
            log.warning("this CPU has no bf16 support OpenVINO can use; computing in f32")
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": host.threads or physical_cores(), "INFERENCE_PRECISION_HINT": precision}
    cache = cache_folder(host.compile_cache, "openvino")
    if cache is not None:
        config["CACHE_DIR"] = str(cache)
    return config


def _one_line(e: Exception) -> str:
    """OpenVINO's errors span many lines (source locations first); the last non-empty one says what failed."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


class OpenVinoComponent:
    """One exported component compiled by OpenVINO."""

    def __init__(self, compiled: Any, contract: ComponentContract) -> None:
        self.compiled = compiled
        self.contract = contract
        self.outputs = {t.name: compiled.output(t.name) for t in contract.outputs}
        self._idle: queue.SimpleQueue = queue.SimpleQueue()  # infer requests not in use (thread-safe)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.contract.check_inputs(inputs)
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()  # ~25 us; at most one per concurrent call
        try:
            result = request.infer(inputs)  # outputs are copied out (share_outputs=False), so the request can be reused
            return {name: np.asarray(result[port], np.float32) for name, port in self.outputs.items()}
        finally:
            self._idle.put(request)


def _read(ov: Any, core: Any, path: Path) -> Any:
    try:
        return core.read_model(str(path))
    except RuntimeError as e:
        raise ArtifactError(f"{path} cannot be read by OpenVINO {ov.__version__} ({_one_line(e)}); rebuild the artifacts") from None


def _cannot_compile(ov: Any, path: Path, e: RuntimeError) -> BackendError:
    return BackendError(f"OpenVINO {ov.__version__} cannot compile {path} ({_one_line(e)}); use --backend onnxruntime")


def replace_constants(ov: Any, model: Any, weights: dict[str, np.ndarray], where: str, resized: bool = False) -> None:
    """Every Constant of `model` named in `weights` (its friendly or output tensor name: the ONNX initializer's)
    replaced by one holding the new weight, of the same type and shape (`resized`: of any shape, the model's shapes
    inferred again: a token table with added rows). A LoraError naming any not found."""
    found: dict[str, Any] = {}
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            for name in {op.get_friendly_name(), *op.output(0).get_names()} & weights.keys():
                found[name] = op
    missing = sorted(set(weights) - set(found))
    if missing:
        raise LoraError(f"{where}: OpenVINO's model has no constant {', '.join(missing[:3])}; use --backend onnxruntime for this LoRA")
    for name, old in found.items():
        new = ov.op.Constant(np.ascontiguousarray(weights[name]))
        if new.get_element_type() != old.get_element_type() or (not resized and list(new.get_output_shape(0)) != list(old.get_output_shape(0))):
            raise LoraError(f"{where}: constant {name} is {old.get_element_type()} {old.get_output_shape(0)} in OpenVINO's model; rebuild the artifacts")
        new.set_friendly_name(old.get_friendly_name())
        old.output(0).replace(new.output(0))
    if resized:
        model.validate_nodes_and_infer_types()


def open_components(
    artifacts_dir: Path,
    manifest: Manifest,
    precision: str,
    providers: Sequence[str] | None = None,
    host: HostOptions = HostOptions(),
    loras: Sequence[tuple[LoraFile, float]] = (),
    embeddings: Mapping[str, TokenRows] | None = None,
) -> dict[str, OpenVinoComponent]:
    """Every component of the artifacts at `precision` compiled for OpenVINO's CPU device, files checked against the manifest.
    `loras`: (file, scale) pairs whose deltas are added to the weights they adapt before each model compiles.
    `embeddings`: text encoder -> the rows its token table gains (runtime/embeddings.py), before it compiles."""
    if providers:
        raise BackendError(f"the openvino backend takes no providers (got {', '.join(providers)}); drop --provider")
    ov = import_openvino()
    deltas: dict = {}
    if loras:
        targets, deltas = run_time_deltas(artifacts_dir, manifest, loras)
    core = ov.Core()
    config = compile_config(core, host)
    if config["INFERENCE_PRECISION_HINT"] == "bf16" and (failure := manifest.bf16_failure(precision)) is not None:
        why, measured = failure
        if measured:
            raise BackendError(f"{why}: run without --bf16 (reduced_precision=False)")
        log.warning("%s: its images may drift more than a few levels in bf16", why)
    components = {}
    for name, entry in manifest.components.items():
        pe = precision_entry(artifacts_dir, manifest, name, precision)
        if pe.external_data is not None:
            verified_file(artifacts_dir, manifest, pe.external_data, host)  # read by OpenVINO beside the ONNX file
        path = verified_file(artifacts_dir, manifest, pe.onnx, host)
        # A patched model is not cached: every LoRA set and scale, or set of embeddings, would leave another compiled
        # copy of the component behind.
        patched = bool(deltas.get(name)) or bool(embeddings and name in embeddings)
        own = {k: v for k, v in config.items() if k != "CACHE_DIR"}
        if "CACHE_DIR" in config and not patched:
            key = hashlib.sha256(" ".join(e.sha256 for e in (pe.onnx, pe.external_data) if e is not None).encode()).hexdigest()[:24]
            own["CACHE_DIR"] = str(Path(config["CACHE_DIR"]) / key)
            try:
                compiled = core.compile_model(str(path), DEVICE, own)
            except RuntimeError as e:
                _read(ov, core, path)  # an unreadable file is the artifacts' fault, said as such
                raise _cannot_compile(ov, path, e) from None
        else:
            model = _read(ov, core, path)
            if deltas.get(name):
                replace_constants(ov, model, patched_initializers(path, pe.onnx.file, pe.onnx.sha256, targets, deltas), pe.onnx.file)
                del deltas[name]  # in the model now
            if embeddings and name in embeddings:
                replace_constants(ov, model, dict([token_table(path, embeddings[name])]), pe.onnx.file, resized=True)
            try:
                compiled = core.compile_model(model, DEVICE, own)
            except RuntimeError as e:
                raise _cannot_compile(ov, path, e) from None
        log.info("opened %s (%s) from %s on OpenVINO %s (%s)", name, precision, pe.onnx.file, DEVICE, config["INFERENCE_PRECISION_HINT"])
        components[name] = OpenVinoComponent(compiled, entry.contract)
    return components
