"""ONNX Runtime backend: one InferenceSession per component on the CPU or CUDA execution provider, or on
OpenVINO's (an ONNX Runtime plugin in its own wheel, `pip install 'ldm-rt[openvino]'`; x86 CPUs, Intel GPUs).

Each component opens the ONNX Runtime variant of its file when the build wrote one (attention fused into
com.microsoft.MultiHeadAttention: less memory, a smaller graph; runtime/manifest.OrtVariant), else the
portable ONNX. Sessions are configured once (all graph optimisations, intra-op threads = physical cores
unless told otherwise, spinning as `HostOptions` says, sequential execution, memory pattern) and shared: `InferenceSession.run` is thread-safe, so one Pipeline serves
concurrent requests without a lock. On CUDA, inputs and outputs go through IO binding, and `upload`
keeps a tensor that every step reads (the text embeddings) on the device for the whole loop.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..contracts import ComponentContract
from ..manifest import ArtifactError, Manifest, PrecisionEntry
from .base import BackendError, HostOptions, placeholder_for

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Execution providers that come as ONNX Runtime plugins in their own wheel, registered at run time:
# alias -> (EP name, module with get_library_path(), the extra that installs it).
PLUGIN_PROVIDERS = {"openvino": ("OpenVINOExecutionProvider", "onnxruntime_ep_openvino", "ldm-rt[openvino]")}


def physical_cores() -> int:
    """Physical cores (hyper-threads share one core's units, so more threads than cores only adds contention)."""
    cores = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


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


def plugin_devices(alias: str) -> list:
    """The devices of a plugin execution provider, its library registered with ONNX Runtime once per process."""
    ep_name, module_name, extra = PLUGIN_PROVIDERS[alias]
    found = [d for d in ort.get_ep_devices() if d.ep_name == ep_name]
    if found:  # registered earlier in this process
        return found
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise BackendError(f"the {alias} provider needs the {module_name} plugin: pip install '{extra}'") from None
    try:
        ort.register_execution_provider_library(ep_name, module.get_library_path())
    except Exception as e:  # onnxruntime's pybind errors share no narrower base class
        raise BackendError(f"onnxruntime {ort.__version__} cannot load the {ep_name} plugin ({e}); install onnxruntime >= 1.23") from None
    found = [d for d in ort.get_ep_devices() if d.ep_name == ep_name]
    if not found:
        raise BackendError(f"the {ep_name} plugin found no device on this machine; use the cpu provider")
    return found


def _cache_folder(root: Path | None, alias: str) -> Path | None:
    """`root`/`alias`, created; None (compile every time, with a warning) when it cannot be created."""
    if root is None:
        return None
    folder = Path(root) / alias
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("no compile cache: cannot create %s (%s); pass compile_cache=False to silence this", folder, e.strerror or e)
        return None
    return folder


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    """Full provider names; default CUDA when this onnxruntime has it, always with CPU as the fallback."""
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

    def __init__(self, session: ort.InferenceSession, contract: ComponentContract) -> None:
        self.session = session
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


def _session(path: Path, options: ort.SessionOptions, providers: list[str] | None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime's pybind errors share no narrower base class
        raise ArtifactError(f"{path} cannot be loaded by onnxruntime ({type(e).__name__}); rebuild the artifacts") from None


def _open(
    artifacts_dir: Path, manifest: Manifest, pe: PrecisionEntry, fused: bool, options: ort.SessionOptions, providers: list[str] | None
) -> tuple[ort.InferenceSession, str]:
    """The session of the ONNX Runtime variant when there is one (and `fused`), else of the portable file;
    and the file it was opened from."""
    if pe.external_data is not None:
        manifest.verify_file(artifacts_dir, pe.external_data)  # shared by both files
    if fused and pe.ort is not None:
        path = manifest.verify_file(artifacts_dir, pe.ort.onnx)
        try:
            return _session(path, options, providers), pe.ort.onnx.file
        except ArtifactError as e:
            # Both files compute the same parity-checked function; an onnxruntime build without the
            # contrib ops can still run the portable one.
            log.warning("%s; using the portable %s instead", e, pe.onnx.file)
    return _session(manifest.verify_file(artifacts_dir, pe.onnx), options, providers), pe.onnx.file


def open_components(
    artifacts_dir: Path,
    manifest: Manifest,
    precision: str,
    providers: Sequence[str] | None = None,
    host: HostOptions = HostOptions(),
    fused: bool = True,
) -> dict[str, OrtComponent]:
    """Sessions for every component of the artifacts at `precision`, files checked against the manifest.
    `fused=False` opens the portable ONNX files even where an ONNX Runtime variant exists."""
    options = session_options(host)
    plugin = [p.lower() for p in providers or () if p.lower() in PLUGIN_PROVIDERS]
    others = [p for p in providers or () if p.lower() not in PLUGIN_PROVIDERS and PROVIDER_ALIASES.get(p.lower(), p) != "CPUExecutionProvider"]
    if plugin and (others or len(plugin) > 1):
        # A plugin is chosen through the session options, the others through the providers list; ONNX
        # Runtime would take the plugin and silently drop the rest.
        raise BackendError(f"the {plugin[0]} provider cannot be combined with {', '.join(others + plugin[1:])}; ask for one provider (cpu is always the fallback)")
    if plugin:
        # A plugin EP is chosen through the session options (ONNX Runtime falls back to its CPU provider for
        # nodes the plugin does not take). It compiles the portable graph: the fused variant's contrib op
        # (com.microsoft.MultiHeadAttention) would split the graph between the two providers.
        # Its own thread count (it ignores the intra-op setting). On CPUs with AMX it computes in bf16 unless
        # told INFERENCE_PRECISION_HINT f32, which measured slower than the CPU provider: that speed is the point.
        config = {"INFERENCE_NUM_THREADS": str(host.threads or physical_cores())}
        cache = _cache_folder(host.compile_cache, plugin[0])
        if cache is not None:
            # OpenVINO compiles every graph when its session opens (seconds); with a cache folder the next
            # process loads the compiled blob instead. Blobs are keyed by graph, device and settings.
            config["CACHE_DIR"] = str(cache)
        options.add_provider_for_devices(plugin_devices(plugin[0])[:1], {"load_config": json.dumps({"CPU": config})})
        chosen, fused = None, False
    else:
        chosen = resolve_providers(providers)
    components = {}
    for name, entry in manifest.components.items():
        if precision not in entry.precisions:
            built = ", ".join(sorted(entry.precisions)) or "none"
            raise BackendError(
                f"{artifacts_dir} has no {precision} {name} (built: {built}); rebuild with --fp16 or use --precision fp32"
            )
        session, file = _open(artifacts_dir, manifest, entry.precisions[precision], fused, options, chosen)
        log.info("opened %s (%s) from %s on %s", name, precision, file, session.get_providers()[0])
        components[name] = OrtComponent(session, entry.contract)
    return components
