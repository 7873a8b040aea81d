"""TensorRT engines from the exported ONNX files, through TensorRT's builder API.

An engine is only valid for the TensorRT version, GPU model and build settings it was made with, so
each one is named by a cache key: sha256 over (ONNX content hash, TensorRT version, GPU name and compute
capability, precision, optimisation profile, builder flags). A metadata JSON beside the plan records
the key's inputs. An earlier engine is reused only when its key and its plan's hash both match; one
whose key differs in anything is rebuilt, never loaded (the log says which input changed).

Precision lives in the ONNX graph, never in a builder flag: every network is *strongly typed*, so the fp32
engine is built from the fp32 ONNX and the fp16 engine from the fp16 ONNX, with TensorRT keeping the graph's
types, including the fp32 islands that the overflow search chose (a weakly typed fp16 build would be free to
put them back in fp16). This is also the only mode TensorRT 11 has: it removed the FP16/BF16/INT8/...
builder flags and weak typing; on TensorRT 10 the STRONGLY_TYPED network flag asks for it.

tensorrt and cuda-python are imported lazily (runtime/backends/cuda_probe.py): without them, or without a
usable GPU, `probe_tensorrt` raises `TensorRTUnavailable` naming why, and the ONNX artifacts remain usable
with ONNX Runtime.
NOTE: the GPU path is written against TensorRT 10/11 and is not verified on this machine (no GPU);
tests/test_export_tensorrt.py runs the build code against fake TensorRT 10 and 11 modules and has
@pytest.mark.gpu tests that build and run one engine where a GPU exists.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ldm_rt.export.errors import ExportError, TensorRTUnavailable
from ldm_rt.runtime.atomic import atomic_write_bytes
from ldm_rt.runtime.backends import cuda_probe
from ldm_rt.runtime.backends.base import BackendError
from ldm_rt.runtime.backends.tensorrt_backend import device_description, engine_key
from ldm_rt.runtime.contracts import ComponentContract
from ldm_rt.runtime.files import FileFormatError, read_json_object
from ldm_rt.runtime.manifest import FileEntry, sha256_file

log = logging.getLogger(__name__)

ENGINE_SUFFIX = ".plan"
METADATA_SUFFIX = ".json"
KEY_CHARS_IN_NAME = 16  # 64 bits of the key in the file name; the metadata holds all of it


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.6"


@dataclass(frozen=True)
class TensorRTInfo:
    version: str
    gpu: GpuInfo


def probe_tensorrt(folder: str | Path) -> TensorRTInfo:
    """TensorRT's version and the GPU engines will be built for; `TensorRTUnavailable` (naming `folder`,
    whose ONNX files stay usable) when TensorRT, cuda-python or a usable CUDA GPU is missing."""
    try:
        trt, cudart = cuda_probe.probe()
        gpu = device_description(cudart)
    except (cuda_probe.GpuUnavailable, BackendError) as e:
        raise TensorRTUnavailable.for_folder(str(e), str(folder)) from None
    return TensorRTInfo(trt.__version__, GpuInfo(**gpu))


def engine_profile(contract: ComponentContract, static: bool = False) -> dict[str, list[list[int]]]:
    """Per input: [min, opt, max] shapes of the TensorRT optimisation profile, from the contract's
    dims; static: the opt shape three times (one shape, fastest kernels, no dynamic-shape overhead)."""
    points = ("opt", "opt", "opt") if static else ("min", "opt", "max")
    shapes = [contract.shapes_at(p) for p in points]
    return {t.name: [list(s[t.name]) for s in shapes] for t in contract.inputs}


@dataclass(frozen=True)
class EngineSpec:
    """Everything an engine depends on; its sha256 is the cache key."""

    component: str
    precision: str  # "fp32" | "fp16"
    onnx_sha256: str
    tensorrt_version: str
    gpu: GpuInfo
    profile: dict[str, list[list[int]]]
    flags: dict[str, Any] = field(default_factory=dict)  # builder flags: strongly_typed, refittable, static, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> str:
        # One formula, the runtime's: it recomputes the key to refuse stale engines.
        d = self.to_dict()
        return engine_key(d["component"], d["precision"], d["onnx_sha256"], d["tensorrt_version"], d["gpu"], d["profile"], d["flags"])

    @property
    def stem(self) -> str:
        return f"{self.component}.{self.precision}.{self.key[:KEY_CHARS_IN_NAME]}"


def engine_spec(
    contract: ComponentContract,
    precision: str,
    onnx_sha256: str,
    info: TensorRTInfo,
    *,
    static: bool = False,
    refit: bool = False,
) -> EngineSpec:
    # strongly_typed is always on (the module docstring says why); it stays in the key so that engines built
    # weakly typed by earlier versions are rebuilt, not reused.
    flags = {"strongly_typed": True, "refittable": refit, "static": static}
    return EngineSpec(contract.name, precision, onnx_sha256, info.version, info.gpu, engine_profile(contract, static), flags)


def read_metadata(path: Path) -> dict[str, Any] | None:
    """An engine's metadata JSON object, or None when it is missing or not ours: the engine is then rebuilt."""
    try:
        return read_json_object(path, what="engine metadata file")
    except FileFormatError:
        return None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def find_reusable(spec: EngineSpec, search_dirs: Sequence[Path]) -> Path | None:
    """A plan in `search_dirs` built from exactly `spec` and intact (hash as recorded), else None.
    Engines of the same component and precision with another key are logged as stale and ignored."""
    for folder in search_dirs:
        for meta_path in sorted(Path(folder).glob(f"{spec.component}.{spec.precision}.*{METADATA_SUFFIX}")):
            meta = read_metadata(meta_path)
            if meta is None:
                continue
            plan = meta_path.with_suffix(ENGINE_SUFFIX)
            if meta.get("key") != spec.key:
                changed = _differences(meta.get("spec", {}), spec.to_dict())
                log.info("engine %s is stale (changed: %s); rebuilding", plan.name, ", ".join(changed) or "key")
                continue
            if not plan.is_file() or sha256_file(plan) != meta.get("sha256"):
                log.warning("engine %s does not match its metadata hash; rebuilding", plan.name)
                continue
            return plan
    return None


Builder = Callable[[Path, EngineSpec, Path, Path | None], None]


def network_flags(trt: Any) -> int:
    """create_network's flags: strongly typed (needed on TensorRT 10; on 11 every network is, and the flag is ignored)."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def builder_config(trt: Any, builder: Any, spec: EngineSpec, timing_cache: bytes) -> Any:
    """The IBuilderConfig of `spec`: its optimisation profile, REFIT when asked, the timing cache. Never a
    precision flag: the types come from the ONNX graph (TensorRT 11 has no FP16/BF16/INT8 flags at all)."""
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.profile.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if spec.flags["refittable"]:
        config.set_flag(trt.BuilderFlag.REFIT)
    if hasattr(trt.BuilderFlag, "TF32"):  # on by default: fp32 layers would round inputs to TF32's 10-bit mantissa
        config.clear_flag(trt.BuilderFlag.TF32)
    config.set_timing_cache(config.create_timing_cache(timing_cache), False)
    return config


def build_plan(trt: Any, onnx_path: Path, spec: EngineSpec, timing_cache: bytes = b"") -> tuple[bytes, bytes]:
    """(serialized engine, updated timing cache) for `spec` from `onnx_path`, with the `trt` module given."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file too
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(
            f"TensorRT cannot parse {onnx_path.name}: {errors or 'no reason given'}; build with --onnx-only (ONNX Runtime runs it)"
        )
    config = builder_config(trt, builder, spec, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(
            f"TensorRT could not build {spec.component} {spec.precision} (its log above says why); "
            "try a narrower profile or build with --onnx-only"
        )
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def tensorrt_builder(onnx_path: Path, spec: EngineSpec, plan_path: Path, timing_cache: Path | None) -> None:
    """Build one engine with TensorRT and write it to `plan_path` (and the grown timing cache back, atomically)."""
    trt = cuda_probe.import_tensorrt()
    cache = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    plan, new_cache = build_plan(trt, onnx_path, spec, cache)
    atomic_write_bytes(plan_path, plan)
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, new_cache)


def build_engine(
    onnx_path: Path,
    spec: EngineSpec,
    out_dir: Path,
    *,
    reuse_from: Sequence[Path] = (),
    timing_cache: Path | None = None,
    builder: Builder = tensorrt_builder,
) -> dict[str, Any]:
    """The engine for `spec` in `out_dir` (reused from `reuse_from` when its key matches, else built),
    with its metadata JSON beside it. Returns the manifest record (paths relative to `out_dir`'s parent)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / f"{spec.stem}{ENGINE_SUFFIX}"
    cached = find_reusable(spec, reuse_from)
    if cached is not None:
        log.info("reusing engine %s (cache key matches)", cached.name)
        shutil.copy2(cached, plan)
        built = (read_metadata(cached.with_suffix(METADATA_SUFFIX)) or {}).get("built", "")
    else:
        log.info("building TensorRT engine %s", plan.name)
        try:
            builder(onnx_path, spec, plan, timing_cache)
        except ExportError:
            raise
        except Exception as e:  # TensorRT reports build failures as assorted runtime errors
            raise ExportError(
                f"TensorRT could not build {spec.component} {spec.precision} ({type(e).__name__}: {e}); "
                "try a narrower profile or build with --onnx-only"
            ) from None
        built = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not plan.is_file():
        raise ExportError(f"TensorRT produced no engine file for {spec.component} {spec.precision}; rebuild with --verbose")
    meta = {"key": spec.key, "spec": spec.to_dict(), "sha256": sha256_file(plan), "bytes": plan.stat().st_size, "built": built}
    meta_path = plan.with_suffix(METADATA_SUFFIX)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    root = out_dir.parent
    return {
        "key": spec.key,
        "precision": spec.precision,
        "engine": asdict(FileEntry.of(root, plan.relative_to(root).as_posix())),
        "metadata": meta_path.relative_to(root).as_posix(),
        "tensorrt_version": spec.tensorrt_version,
        "gpu": asdict(spec.gpu),
        "profile": spec.profile,
        "flags": spec.flags,
    }
