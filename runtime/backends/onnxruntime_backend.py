"""ONNX Runtime backend: one InferenceSession per component on the CPU or CUDA execution provider.
(OpenVINO is a backend of its own, openvino_backend.py: its ONNX Runtime plugin finds no device on AMD CPUs.)

Each component opens the ONNX Runtime variant of its file when the build wrote one (attention fused into
com.microsoft.MultiHeadAttention: less memory, a smaller graph; runtime/manifest.OrtVariant), else the
portable ONNX. Sessions are configured once (all graph optimisations, intra-op threads = physical cores
unless told otherwise, spinning as `HostOptions` says, sequential execution, memory pattern) and shared: `InferenceSession.run` is thread-safe, so one Pipeline serves
concurrent requests without a lock. On CUDA, inputs and outputs go through IO binding, and `upload`
keeps a tensor that every step reads (the text embeddings) on the device for the whole loop.
With a compile cache (HostOptions.compile_cache, on by default in Pipeline.load) large components open the graph
an earlier session optimised and skip hashing files verified since (_open_optimized, base.verified_file): SD 1.5-sized
artifacts opened in 1.8-2.2 s instead of 13.2-13.4 s on an idle 2-core machine.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..contracts import ComponentContract
from ..embeddings import TokenRows, token_table
from ..lora import LoraFile, LoraTargets, external_model_bytes, patched_initializers, run_time_deltas
from ..manifest import ArtifactError, FileEntry, Manifest, PrecisionEntry
from .base import BackendError, HostOptions, cache_folder, physical_cores, placeholder_for, precision_entry, verified_file

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


def open_session(path: Path, options: ort.SessionOptions, providers: list[str] | None, model: bytes | None = None) -> ort.InferenceSession:
    """One session on `path` (or on `model`, bytes standing for it: runtime/lora.external_model_bytes); export's
    parity check opens its sessions here too, so what it checks is what runs."""
    try:
        return ort.InferenceSession(str(path) if model is None else model, sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime's pybind errors share no narrower base class
        raise ArtifactError(f"{path} cannot be loaded by onnxruntime ({type(e).__name__}); rebuild the artifacts") from None


# Where ONNX Runtime looks for external data when a model is loaded from bytes (onnxruntime's
# kOrtSessionOptionsModelExternalInitializersFileFolderPath).
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


class _Patch:
    """LoRA deltas to apply to one component's weights as its session opens (runtime/lora.py). The weights on
    disk are never modified. The session is loaded from the file's graph with every large weight referring to
    its bytes in the file (external data, runtime/lora.external_model_bytes), the patched ones given in memory
    as external initializers: ONNX Runtime puts them in the graph before it optimises it, so every pass (the
    NCHWc layout's Conv weight reordering too, which ignores add_initializer overrides) sees the patched weights,
    and no copy of the file is made. Files with external data (past 2 GB) take the same path. `rows`: a text
    encoder's token table grows by these (textual inversion, runtime/embeddings.py) the same way, its dims rewritten."""

    def __init__(self, targets: LoraTargets | None, deltas: dict, host: HostOptions, rows: TokenRows | None = None) -> None:
        self.targets, self.deltas, self.host, self.rows = targets, deltas, host, rows
        self.weights: list[ort.OrtValue] = []

    def open(self, path: Path, entry: FileEntry, options: ort.SessionOptions, providers: list[str] | None) -> ort.InferenceSession:
        patched = patched_initializers(path, entry.file, entry.sha256, self.targets, self.deltas) if self.targets is not None else {}
        shapes = {}
        if self.rows is not None:
            name, table = token_table(path, self.rows)
            patched[name], shapes[name] = table, table.shape
        if not patched:
            return open_session(path, options, providers)
        # Initializer names repeat across files (onnx::MatMul_277), so these options serve this session only.
        own = session_options(self.host)
        own.add_session_config_entry(EXTERNAL_FOLDER, str(path.parent))
        self.weights = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(w)) for w in patched.values()]
        own.add_external_initializers(list(patched), self.weights)
        model = external_model_bytes(path, set(patched), shapes)
        del patched  # ONNX Runtime uses the OrtValues' memory as it is (held in self.weights for the session's life)
        return open_session(path, own, providers, model=model)


# ONNX Runtime optimises a graph each time a session opens (ORT_ENABLE_ALL: fusions, constant folding, the CPU's
# NCHWc layout); for components whose files hold at least this many bytes the optimised graph is kept in the
# compile cache (HostOptions.compile_cache/onnxruntime) and later sessions open it instead, with the same options:
# measured 5.4 s -> 1.7 s to open a 215 M-parameter UNet, 7.8 s -> 1.0 s SD 1.5's, outputs bitwise equal. Smaller graphs optimise in
# well under a second (the default model's), not worth a cached copy of their weights.
OPTIMIZED_FROM_BYTES = 64 << 20
OPTIMIZED_FILE = "model.onnx"


def _cpu_signature() -> str:
    """What the optimised graph depends on besides the model and ONNX Runtime: the CPU (its layout passes pick
    block sizes and kernels by instruction set)."""
    import platform

    wanted = ("model name", "flags")
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line.strip() for line in itertools.islice(f, 64) if line.split(":")[0].strip() in wanted]
    except OSError:
        lines = []
    return "\n".join(lines[: len(wanted)]) or f"{platform.machine()} {platform.processor()}"


def optimized_cache_key(entries: Sequence[FileEntry], options: ort.SessionOptions, providers: Sequence[str]) -> str:
    """The cache entry of one component's optimised graph: its files' hashes, ONNX Runtime's version, the providers,
    the optimisation level and the CPU; anything else changed makes a new entry."""
    facts = {
        "files": [e.sha256 for e in entries], "onnxruntime": ort.__version__, "providers": list(providers),
        "level": int(options.graph_optimization_level), "cpu": _cpu_signature(),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _open_optimized(
    path: Path, entries: Sequence[FileEntry], options: ort.SessionOptions, providers: list[str] | None, host: HostOptions | None
) -> ort.InferenceSession:
    """open_session on `path`, through the cache of optimised graphs when it applies (CPU provider, a large
    component, a compile cache): a cached graph is opened instead of `path`; otherwise the session that opens
    `path` also writes its optimised graph into the cache (a temporary folder renamed into place when complete,
    so a reader never sees half of one). Any failure of the cache falls back to `path` with a warning."""
    if host is None or host.compile_cache is None or providers != ["CPUExecutionProvider"] or sum(e.bytes for e in entries) < OPTIMIZED_FROM_BYTES:
        return open_session(path, options, providers)
    cache = cache_folder(host.compile_cache, "onnxruntime")
    if cache is None:
        return open_session(path, options, providers)
    folder = cache / optimized_cache_key(entries, options, providers)
    broken = False
    if (folder / OPTIMIZED_FILE).is_file():
        try:
            return open_session(folder / OPTIMIZED_FILE, options, providers)
        except ArtifactError as e:
            broken = True
            log.warning("the cached optimised graph of %s cannot be loaded (%s); optimising it again", path.name, e)
    try:
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
    except OSError as e:
        log.warning("cannot write to the compile cache %s (%s); opening %s without it", cache, e.strerror or e, path.name)
        return open_session(path, options, providers)
    own = session_options(host)  # this session's own: it names the file to write
    own.graph_optimization_level = options.graph_optimization_level
    own.optimized_model_filepath = str(tmp / OPTIMIZED_FILE)
    own.add_session_config_entry("session.optimized_model_external_initializers_file_name", OPTIMIZED_FILE + ".data")
    own.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        session = open_session(path, own, providers)
    except ArtifactError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if broken:
            shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    except OSError:  # another process put the same entry in place first, or the cache went away
        shutil.rmtree(tmp, ignore_errors=True)
    return session


def _open(
    artifacts_dir: Path, manifest: Manifest, pe: PrecisionEntry, fused: bool, options: ort.SessionOptions, providers: list[str] | None,
    patch: _Patch | None = None, host: HostOptions | None = None,
) -> tuple[ort.InferenceSession, str]:
    """The session of the ONNX Runtime variant when there is one (and `fused`), else of the portable file;
    and the file it was opened from. `patch`: LoRA deltas for its weights. `host`: its compile cache keeps the
    optimised graphs of large components (_open_optimized)."""
    data = [pe.external_data] if pe.external_data is not None else []
    if pe.external_data is not None:
        verified_file(artifacts_dir, manifest, pe.external_data, host)  # shared by both files
    if fused and pe.ort is not None:
        path = verified_file(artifacts_dir, manifest, pe.ort.onnx, host)
        try:
            if patch is not None:
                return patch.open(path, pe.ort.onnx, options, providers), pe.ort.onnx.file
            return _open_optimized(path, [pe.ort.onnx, *data], options, providers, host), pe.ort.onnx.file
        except ArtifactError as e:
            # Both files compute the same parity-checked function; an onnxruntime build without the
            # contrib ops can still run the portable one.
            log.warning("%s; using the portable %s instead", e, pe.onnx.file)
    path = verified_file(artifacts_dir, manifest, pe.onnx, host)
    if patch is not None:
        return patch.open(path, pe.onnx, options, providers), pe.onnx.file
    return _open_optimized(path, [pe.onnx, *data], options, providers, host), pe.onnx.file


def open_components(
    artifacts_dir: Path,
    manifest: Manifest,
    precision: str,
    providers: Sequence[str] | None = None,
    host: HostOptions = HostOptions(),
    fused: bool = True,
    loras: Sequence[tuple[LoraFile, float]] = (),
    embeddings: Mapping[str, TokenRows] | None = None,
) -> dict[str, OrtComponent]:
    """Sessions for every component of the artifacts at `precision`, files checked against the manifest.
    `fused=False` opens the portable ONNX files even where an ONNX Runtime variant exists. `loras`: (file,
    scale) pairs whose deltas are added to the weights they adapt as the sessions open (the artifacts'
    lora_targets.json says where each weight is); a LoraError when they do not fit this model. `embeddings`: text
    encoder -> the rows its token table gains (runtime/embeddings.py)."""
    options = session_options(host)
    deltas: dict = {}
    targets: LoraTargets | None = None
    embeddings = embeddings or {}
    if loras:
        targets, deltas = run_time_deltas(artifacts_dir, manifest, loras)
    chosen = resolve_providers(providers)
    asked_for_cuda = any(PROVIDER_ALIASES.get(p.lower(), p) == CUDA for p in providers or ())
    components = {}
    for name, entry in manifest.components.items():
        pe = precision_entry(artifacts_dir, manifest, name, precision)
        patch = _Patch(targets, deltas, host, embeddings.get(name)) if deltas.get(name) or name in embeddings else None
        session, file = _open(artifacts_dir, manifest, pe, fused, options, chosen, patch, host)
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
