"""ONNX Runtime backend: one InferenceSession per component on the CPU or CUDA execution provider.
(OpenVINO is a backend of its own, openvino_backend.py: its ONNX Runtime plugin finds no device on AMD CPUs.)

Each component opens the ONNX Runtime variant of its file when the build wrote one (attention fused into
com.microsoft.MultiHeadAttention: less memory, a smaller graph; runtime/manifest.OrtVariant), else the
portable ONNX. Sessions are configured once (all graph optimisations, intra-op threads = physical cores
unless told otherwise, spinning as `HostOptions` says, sequential execution, memory pattern) and shared: `InferenceSession.run` is thread-safe, so one Pipeline serves
concurrent requests without a lock. On CUDA, inputs and outputs go through IO binding, and `upload`
keeps a tensor that every step reads (the text embeddings) on the device for the whole loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..contracts import ComponentContract
from ..lora import LoraError, LoraFile, LoraTargets, combined_deltas, patched_initializers, patched_model_bytes
from ..manifest import ArtifactError, FileEntry, Manifest, PrecisionEntry
from .base import BackendError, HostOptions, physical_cores, placeholder_for, precision_entry

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CUDA = PROVIDER_ALIASES["cuda"]
# Providers that are backends of their own now: alias -> what to ask for instead.
MOVED = {"openvino": "OpenVINO is a backend, not an onnxruntime provider: use --backend openvino (Pipeline.load(backend='openvino'))"}


def session_options(host: HostOptions = HostOptions()) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = host.threads or physical_cores()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_mem_pattern = True
    # ONNX Runtime spins by default; HostOptions says why we do not. Each session has its own pool, and a
    # pool left spinning after its call slows the next session's (measured: the VAE decode after the UNet
    # loop 2x slower), so spinning, when asked for, stops as each call returns.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if host.spin else "0")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's concern
    return so


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    """Full provider names; default CUDA when this onnxruntime has it, always with CPU as the fallback."""
    moved = [MOVED[p.lower()] for p in providers or () if p.lower() in MOVED]
    if moved:
        raise BackendError(moved[0])
    available = ort.get_available_providers()
    if providers is None:
        wanted = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
    else:
        wanted = [PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise BackendError(
            f"onnxruntime has no {', '.join(missing)} (available: {', '.join(available)}); "
            "install onnxruntime-gpu for CUDA or use the CPU provider"
        )
    return [p for p in wanted if p != "CPUExecutionProvider"] + ["CPUExecutionProvider"]


class OrtComponent:
    """One exported component in an ONNX Runtime session."""

    def __init__(self, session: ort.InferenceSession, contract: ComponentContract, weights: Sequence[ort.OrtValue] = ()) -> None:
        self.session = session
        # LoRA-patched initializers: ONNX Runtime uses their memory as it is, so they live as long as the session.
        self._weights = list(weights)
        self.contract = contract
        self.output_names = [t.name for t in contract.outputs]
        self.on_cuda = session.get_providers()[0] == "CUDAExecutionProvider"

    def upload(self, name: str, array: np.ndarray) -> np.ndarray | ort.OrtValue:
        """On CUDA: an OrtValue on the device that `run` binds without copying; on CPU the array itself.
        NOTE: the CUDA path is written against the onnxruntime-gpu API but not tested on this machine."""
        if not self.on_cuda:
            return array
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)

    def run(self, inputs: dict[str, np.ndarray | ort.OrtValue]) -> dict[str, np.ndarray]:
        host_view = {k: placeholder_for(self.contract, k, tuple(v.shape())) if isinstance(v, ort.OrtValue) else v for k, v in inputs.items()}
        self.contract.check_inputs(host_view)
        if not self.on_cuda:
            outs = self.session.run(self.output_names, inputs)
            return dict(zip(self.output_names, outs))
        # IO binding (untested here: no GPU): device-resident inputs are bound as they are, host arrays
        # are copied once, outputs are allocated on the device and copied back once.
        binding = self.session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))


def open_session(
    path: Path, options: ort.SessionOptions, providers: list[str] | None, model: bytes | None = None, disabled_optimizers: Sequence[str] = ()
) -> ort.InferenceSession:
    """One session on `path` (or on `model`, the bytes of a patched copy of it); export's parity check opens
    its sessions here too, so what it checks is what runs."""
    try:
        return ort.InferenceSession(
            str(path) if model is None else model, sess_options=options, providers=providers,
            **({"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}),
        )
    except Exception as e:  # onnxruntime's pybind errors share no narrower base class
        raise ArtifactError(f"{path} cannot be loaded by onnxruntime ({type(e).__name__}); rebuild the artifacts") from None


# ONNX Runtime's NCHWc layout pass (ORT_ENABLE_ALL, CPU) reorders Conv weights from the file's own initializers
# and ignores overriding ones (measured with onnxruntime 1.32: every patched Conv kept its old weight).
OVERRIDE_UNSAFE_OPTIMIZERS = ("NchwcTransformer",)


class _Patch:
    """LoRA deltas to apply to one component's weights as its session opens (runtime/lora.py). The weights on
    disk are never modified: the session is opened from a patched copy of the file's bytes, or, for files with
    external data (past 2 GB), with the patched weights as overriding initializers."""

    def __init__(self, targets: LoraTargets, deltas: dict, host: HostOptions, external: bool) -> None:
        self.targets, self.deltas, self.host, self.external = targets, deltas, host, external
        self.weights: list[ort.OrtValue] = []

    def open(self, path: Path, entry: FileEntry, options: ort.SessionOptions, providers: list[str] | None) -> ort.InferenceSession:
        patched = patched_initializers(path, entry.file, entry.sha256, self.targets, self.deltas)
        if not patched:
            return open_session(path, options, providers)
        if not self.external:
            return open_session(path, options, providers, model=patched_model_bytes(path, patched))
        # Initializer names repeat across files (onnx::MatMul_277), so these options serve this session only.
        own = session_options(self.host)
        self.weights = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w)) for w in patched.values()]
        for name, value in zip(patched, self.weights):
            own.add_initializer(name, value)
        return open_session(path, own, providers, disabled_optimizers=OVERRIDE_UNSAFE_OPTIMIZERS)


def _open(
    artifacts_dir: Path, manifest: Manifest, pe: PrecisionEntry, fused: bool, options: ort.SessionOptions, providers: list[str] | None,
    patch: _Patch | None = None,
) -> tuple[ort.InferenceSession, str]:
    """The session of the ONNX Runtime variant when there is one (and `fused`), else of the portable file;
    and the file it was opened from. `patch`: LoRA deltas for its weights."""
    if pe.external_data is not None:
        manifest.verify_file(artifacts_dir, pe.external_data)  # shared by both files
    if fused and pe.ort is not None:
        path = manifest.verify_file(artifacts_dir, pe.ort.onnx)
        try:
            if patch is not None:
                return patch.open(path, pe.ort.onnx, options, providers), pe.ort.onnx.file
            return open_session(path, options, providers), pe.ort.onnx.file
        except ArtifactError as e:
            # Both files compute the same parity-checked function; an onnxruntime build without the
            # contrib ops can still run the portable one.
            log.warning("%s; using the portable %s instead", e, pe.onnx.file)
    path = manifest.verify_file(artifacts_dir, pe.onnx)
    if patch is not None:
        return patch.open(path, pe.onnx, options, providers), pe.onnx.file
    return open_session(path, options, providers), pe.onnx.file


def open_components(
    artifacts_dir: Path,
    manifest: Manifest,
    precision: str,
    providers: Sequence[str] | None = None,
    host: HostOptions = HostOptions(),
    fused: bool = True,
    loras: Sequence[tuple[LoraFile, float]] = (),
) -> dict[str, OrtComponent]:
    """Sessions for every component of the artifacts at `precision`, files checked against the manifest.
    `fused=False` opens the portable ONNX files even where an ONNX Runtime variant exists. `loras`: (file,
    scale) pairs whose deltas are added to the weights they adapt as the sessions open (the artifacts'
    lora_targets.json says where each weight is); a LoraError when they do not fit this model."""
    options = session_options(host)
    deltas: dict = {}
    if loras:
        targets = LoraTargets.read(artifacts_dir, manifest)
        deltas = combined_deltas(loras, targets.modules)
        missing = sorted(set(deltas) - set(manifest.components))
        if missing:
            raise LoraError(f"the LoRA adapts {', '.join(missing)}, which {artifacts_dir} has no ONNX file for; rebuild the artifacts")
    chosen = resolve_providers(providers)
    asked_for_cuda = any(PROVIDER_ALIASES.get(p.lower(), p) == CUDA for p in providers or ())
    components = {}
    for name, entry in manifest.components.items():
        pe = precision_entry(artifacts_dir, manifest, name, precision)
        patch = _Patch(targets, deltas, host, pe.external_data is not None) if deltas.get(name) else None
        session, file = _open(artifacts_dir, manifest, pe, fused, options, chosen, patch)
        running_on = session.get_providers()[0]
        if chosen[0] == CUDA and running_on != CUDA:
            # ONNX Runtime falls back to the CPU when the CUDA provider cannot be created, saying so only in
            # its own log; a CUDA request that ends on the CPU is an error, a default that does is a warning.
            cause = (f"onnxruntime {ort.__version__} could not create its CUDA provider for {name} and fell back to the CPU "
                     "(a CUDA or cuDNN library it needs is missing or of another major version, or the driver is too old)")
            if asked_for_cuda:
                raise BackendError(f"{cause}; fix the CUDA install or use --provider cpu")
            log.warning("%s; running on the CPU", cause)
            chosen = ["CPUExecutionProvider"]  # the rest would fail the same way
        log.info("opened %s (%s) from %s on %s", name, precision, file, running_on)
        components[name] = OrtComponent(session, entry.contract, patch.weights if patch is not None else ())
        deltas.pop(name, None)  # this component's deltas are in its session now: free them before the next one
    return components
