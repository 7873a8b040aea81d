"""The backend interface: one session per exported component, chosen explicitly by the caller.

A component is anything with a `contract` (runtime/contracts.py) and `run(inputs) -> outputs`, both
keyed by the contract's tensor names, float tensors float32 whatever the precision inside. A backend is a
factory `open_components(artifacts_dir, manifest, precision, providers=None, host=HostOptions())
-> {name: component}`.

ONNX Runtime, OpenVINO and TensorRT live in this package; any other backend (the torch reference, "torch") is
found through the entry-point group "ldm_rt.backends", so the runtime never imports it by name.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..contracts import DTYPES, ComponentContract
from ..embeddings import EmbeddingError, unsupported
from ..manifest import MANIFEST, FileEntry, Manifest, PrecisionEntry, confined

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ldm_rt.backends"
PRECISIONS = ("fp32", "fp16")
# Built-in backends: name -> module inside this package (imported only when chosen).
BUILTIN = {"onnxruntime": "onnxruntime_backend", "openvino": "openvino_backend", "tensorrt": "tensorrt_backend"}
# At most this many threads per logical CPU: operators split their work across threads, so past one per
# CPU each extra thread only waits its turn; a few times over is left possible for experiments, while a
# typo like 100000 is refused before any pool is built (it hung, memory growing as threads were created).
MAX_THREADS_PER_CPU = 4


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one): what thread caps are held against."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class BackendError(ValueError):
    """A backend cannot be opened or run; the message names the cause and the alternative."""


@dataclass(frozen=True)
class HostOptions:
    """How a backend uses the host. `threads`: CPU threads per operator (None: one per physical core).
    `spin`: between operators, idle threads spin-wait inside a call instead of sleeping (never after it).
    Off by default: measured end to end on 2 idle cores (default and SD-shaped models) it gains nothing
    beyond the noise, and where other processes share the cores spinning threads take time from them
    (measured 2.1x slower beside a training run). It may pay on many-core hosts; measure there. ONNX
    Runtime's setting: OpenVINO's worker pool decides its own waiting.
    `compile_cache`: a folder where backends that compile graphs when a session opens (OpenVINO; ONNX Runtime
    for large components, onnxruntime_backend._open_optimized) keep the compiled result for the next process
    (None: compile every time).
    `reduced_precision`: let backends compute in bf16 where the CPU supports it (OpenVINO; the others compute
    in the artifacts' precision): faster on CPUs with AMX, images within a few 8-bit levels of the f32 ones
    (mean under one level on the default and SD-shaped models)."""

    threads: int | None = None
    spin: bool = False
    compile_cache: Path | None = None
    reduced_precision: bool = False

    def __post_init__(self) -> None:
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise BackendError(f"threads must be a whole number >= 1 (or None: one per physical core), got {self.threads!r}")
        cpus = usable_cpus()
        if self.threads is not None and self.threads > MAX_THREADS_PER_CPU * cpus:
            raise BackendError(
                f"threads {self.threads} is more than {MAX_THREADS_PER_CPU}x the {cpus} CPUs this process may use; "
                "leave it out for one per physical core"
            )
        if not isinstance(self.reduced_precision, bool):
            raise BackendError(f"reduced_precision must be True or False, got {self.reduced_precision!r}")
        if self.compile_cache is not None and Path(self.compile_cache).is_file():
            raise BackendError(f"compile cache {self.compile_cache} is a file; give a folder (or no cache)")


def physical_cores() -> int:
    """Physical cores (hyper-threads share one core's units, so more threads than cores only adds contention)."""
    cores = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


def precision_entry(artifacts_dir: Path, manifest: Manifest, name: str, precision: str) -> PrecisionEntry:
    """Component `name`'s files at `precision`; a BackendError naming the fix when that precision was not built."""
    entry = manifest.components[name]
    if precision not in entry.precisions:
        built = ", ".join(sorted(entry.precisions)) or "none"
        raise BackendError(f"{artifacts_dir} has no {precision} {name} (built: {built}); rebuild with --fp16 or use --precision fp32")
    return entry.precisions[precision]


def default_compile_cache() -> Path:
    """Where compiled graphs are kept unless told otherwise: the user's cache folder (XDG), ldm-rt's part of it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm-rt"


def cache_folder(root: Path | None, name: str) -> Path | None:
    """`root`/`name`, created (one part of the compile cache: OpenVINO's compiled graphs, ONNX Runtime's optimised
    graphs and verified hashes); None (compile every time, with a warning) when it cannot be created."""
    if root is None:
        return None
    folder = Path(root) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("no compile cache: cannot create %s (%s); pass compile_cache=False to silence this", folder, e.strerror or e)
        return None
    return folder


# Files at least this large are hashed once per compile cache rather than at every start (verified_file); smaller
# ones hash in a few milliseconds, not worth a record each.
VERIFIED_FROM_BYTES = 64 << 20


def verified_file(artifacts_dir: Path, manifest: Manifest, entry: FileEntry, host: HostOptions | None) -> Path:
    """manifest.verify_file, without hashing again a large file that this compile cache saw verified and that is
    unchanged since: same path, device, inode, size, modification and change times (any write sets the change
    time, which no user can set back), against the same manifest hash. Hashing SD 1.5's files took 3.3 s of a
    13 s start here. Without a compile cache (or for small files) the file is hashed every time. The ONNX Runtime
    backend opens its files through this too, so a file checked at load (the lazily opened VAE encoder's) is not
    hashed again when it opens."""
    if host is None or host.compile_cache is None or entry.bytes < VERIFIED_FROM_BYTES:
        return manifest.verify_file(artifacts_dir, entry)
    path = confined(artifacts_dir, entry.file, Path(artifacts_dir) / MANIFEST)
    try:
        st = path.stat()
        stamp = json.dumps([str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, entry.sha256])
    except OSError:
        return manifest.verify_file(artifacts_dir, entry)
    folder = cache_folder(host.compile_cache, "verified")
    record = None if folder is None else folder / hashlib.sha256(stamp.encode()).hexdigest()[:32]
    if record is not None and record.is_file() and path.is_file() and st.st_size == entry.bytes:
        return path
    verified = manifest.verify_file(artifacts_dir, entry)
    if record is not None:
        try:
            record.write_text(stamp + "\n")
        except OSError:
            pass  # the next start hashes it again
    return verified


@runtime_checkable
class Component(Protocol):
    contract: ComponentContract

    def run(self, inputs: dict[str, object]) -> dict[str, np.ndarray]: ...


@runtime_checkable
class SupportsUpload(Protocol):
    """A component that can keep an input on its device across calls (e.g. text embeddings for all
    UNet steps); `upload` returns a handle `run` accepts in place of the array."""

    def upload(self, name: str, array: np.ndarray) -> object: ...


# Opened on first use (LazyComponent) by the built-in backends: only img2img and inpainting encode an image, so
# a text-to-image process never pays the encoder's open (ONNX Runtime's graph optimisation, OpenVINO's compile,
# TensorRT's engine) or its memory. Its files are still hash-checked at load (check_unopened).
LAZY_COMPONENTS = ("vae_encoder",)


class LazyComponent:
    """A component opened by `opener` on its first `run`, once, whichever thread gets there first (the others wait
    for it); its contract is known without opening it. A failed open is not kept: that call raises the backend's
    one-line error and the next call tries again. `open()` returns the backend's own component (tests and tools
    that look inside it); `opened` says whether that happened yet."""

    def __init__(self, contract: ComponentContract, opener: Callable[[], Component]) -> None:
        self.contract = contract
        self._opener = opener
        self._component: Component | None = None
        self._lock = threading.Lock()

    @property
    def opened(self) -> bool:
        return self._component is not None

    def open(self) -> Component:
        component = self._component  # set once and never unset, so reading it without the lock is safe
        if component is None:
            with self._lock:
                if self._component is None:
                    log.info("opening %s on its first use", self.contract.name)
                    self._component = self._opener()
                component = self._component
        return component

    def run(self, inputs: dict[str, object]) -> dict[str, np.ndarray]:
        return self.open().run(inputs)

    def close(self) -> None:
        """Closes the opened component if it has a close (TensorRT); one never opened holds nothing."""
        if callable(close := getattr(self._component, "close", None)):
            close()

    def __repr__(self) -> str:
        return f"LazyComponent({self.contract.name}, opened={self.opened})"


def unwrap(component: Component) -> Component:
    """The backend's own component behind `component`: a LazyComponent's, opened now if it was not yet."""
    return component.open() if isinstance(component, LazyComponent) else component


def check_unopened(artifacts_dir: Path, manifest: Manifest, name: str, precision: str, host: HostOptions) -> None:
    """At load, what opening component `name` would check first: that `precision` was built, and the hashes of
    the files a backend reads it from (its ONNX Runtime variant if any, the portable ONNX, their external data;
    TensorRT's engine is checked when it opens), with the same one-line errors."""
    pe = precision_entry(artifacts_dir, manifest, name, precision)
    for entry in (pe.external_data, pe.ort.onnx if pe.ort is not None else None, pe.onnx):
        if entry is not None:
            verified_file(artifacts_dir, manifest, entry, host)


class BackendFactory(Protocol):
    def __call__(
        self,
        artifacts_dir: Path,
        manifest: Manifest,
        precision: str,
        providers: Sequence[str] | None = None,
        host: HostOptions = HostOptions(),
    ) -> dict[str, Component]: ...


def available_backends() -> list[str]:
    names = set(BUILTIN)
    names.update(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def backend_factory(name: str) -> BackendFactory:
    """The `open_components` of backend `name`; a BackendError naming the fix if it is not available."""
    if name in BUILTIN:
        module = importlib.import_module(f"{__package__}.{BUILTIN[name]}")
        return module.open_components
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        hint = " (install the reference models: pip install 'ldm-rt[torch]')" if name == "torch" else ""
        raise BackendError(f"unknown backend {name!r}{hint}; available: {', '.join(available_backends())}")
    entry = next(iter(found))
    try:
        factory: Callable = entry.load()
    except ImportError as e:
        raise BackendError(
            f"backend {name!r} cannot be imported ({e.name or e} is missing); install its extra "
            f"(pip install 'ldm-rt[{name}]') or use --backend onnxruntime"
        ) from None
    return factory


def open_components(
    backend: str,
    artifacts_dir: str | Path,
    manifest: Manifest,
    precision: str = "fp32",
    providers: Sequence[str] | None = None,
    host: HostOptions = HostOptions(),
    loras: Sequence[tuple[object, float]] = (),
    embeddings: Mapping[str, object] | None = None,
) -> dict[str, Component]:
    """`loras`: (runtime.lora.LoraFile, scale) pairs the backend applies to the weights as it opens them
    (ONNX Runtime: patched initializers; OpenVINO: replaced constants; TensorRT: refit); backends without a
    `loras` parameter refuse them. `embeddings`: text encoder -> runtime.embeddings.TokenRows, the rows its token
    table gains (textual inversion; ONNX Runtime, OpenVINO and torch; TensorRT refuses them: bake them at export).
    LAZY_COMPONENTS (the VAE encoder) come back as LazyComponents, opened by the
    backend on their first run, their files hash-checked here (check_unopened)."""
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    factory = backend_factory(backend)
    if loras and "loras" not in inspect.signature(factory).parameters:
        raise BackendError(
            f"backend {backend!r} cannot apply LoRAs at run time; use --backend onnxruntime, or fuse them at export "
            "(python export/build_engines.py --lora FILE[:SCALE])"
        )
    if embeddings and "embeddings" not in inspect.signature(factory).parameters:
        raise EmbeddingError(unsupported(backend))
    root = Path(artifacts_dir)
    with_loras = {"loras": loras} if loras else {}
    with_loras |= {"embeddings": embeddings} if embeddings else {}  # the text encoders, never lazy
    later = _lazy_names(backend, root, manifest, loras)
    if not later:
        return factory(root, manifest, precision, providers, host=host, **with_loras)
    # The factory opens what its manifest lists: now the others, later each lazy one alone (without the LoRAs:
    # _lazy_names keeps any they adapt in the first group).
    now = dataclasses.replace(manifest, components={n: e for n, e in manifest.components.items() if n not in later})
    opened = factory(root, now, precision, providers, host=host, **with_loras)
    try:  # after the others, as the factory checked it (its errors, e.g. a backend not installed, come first)
        for name in later:
            check_unopened(root, manifest, name, precision, host)
    except BaseException:
        for component in opened.values():  # nothing half-opened stays on a device
            if callable(close := getattr(component, "close", None)):
                close()
        raise
    components: dict[str, Component] = {}
    for name, entry in manifest.components.items():  # in the manifest's order, as the factory returns them
        if name in later:
            alone = dataclasses.replace(manifest, components={name: entry})
            opener = functools.partial(_open_one, factory, root, alone, name, precision, providers, host)
            components[name] = LazyComponent(entry.contract, opener)
        else:
            components[name] = opened[name]
    return components


def _open_one(
    factory: BackendFactory, root: Path, manifest: Manifest, name: str, precision: str, providers: Sequence[str] | None, host: HostOptions
) -> Component:
    return factory(root, manifest, precision, providers, host=host)[name]


def _lazy_names(backend: str, root: Path, manifest: Manifest, loras: Sequence[tuple[object, float]]) -> set[str]:
    """The components of `manifest` to open on first use: LAZY_COMPONENTS, on the built-in backends (each opens a
    component from its own files; a plugin such as "torch" loads the whole model at once, encoder included, so
    opening one part later would load it all again), except any the LoRAs adapt (none today: no LoRA prefix names
    the VAE; checked against the folder's targets, as the backend checks them again when it applies them)."""
    later = {n for n in LAZY_COMPONENTS if n in manifest.components} if backend in BUILTIN else set()
    if later and loras:
        # Imported only with LoRAs: the folder's targets say which components they touch.
        from ..lora import run_time_deltas

        later -= set(run_time_deltas(root, manifest, loras)[1])
    return later


def placeholder_for(contract: ComponentContract, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A zero-stride array of the right dtype and shape, so contract checks apply to device handles too."""
    spec = next(t for t in contract.inputs if t.name == name)
    return np.broadcast_to(np.zeros((), DTYPES[spec.dtype]), shape)
