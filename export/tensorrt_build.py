"""TensorRT engines from the exported ONNX files, through polygraphy's TensorRT API.

An engine is only valid for the TensorRT version, GPU model and build settings it was made with, so
each one is named by a cache key: sha256 over (ONNX content hash, TensorRT version, GPU name and compute
capability, precision, optimisation profile, builder flags). A metadata JSON beside the plan records
the key's inputs. An earlier engine is reused only when its key and its plan's hash both match; one
whose key differs in anything is rebuilt, never loaded (the log says which input changed).

Precision: the fp32 engine is built from the fp32 ONNX; the fp16 engine from the fp16 ONNX as a
*strongly typed* network, so TensorRT keeps the graph's types, including the fp32 islands that the
overflow search chose (a weakly typed fp16 build would be free to put them back in fp16).

tensorrt and cuda-python are imported lazily: without them `probe_tensorrt` raises
`TensorRTUnavailable` and the ONNX artifacts remain usable with ONNX Runtime.
NOTE: the GPU path is written against TensorRT 10 / polygraphy 0.49+ and is not verified on this
machine (no GPU); tests/test_export_tensorrt.py has @pytest.mark.gpu tests that build and run one.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ldm_rt.export.errors import ExportError, TensorRTUnavailable
from ldm_rt.runtime.backends.tensorrt_backend import engine_key
from ldm_rt.runtime.contracts import ComponentContract
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


def _cudart() -> Any:
    # cuda-python moved the runtime bindings to cuda.bindings in 12.8; older releases have cuda.cudart.
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def probe_tensorrt(folder: str | Path) -> TensorRTInfo:
    """TensorRT's version and the GPU engines will be built for; `TensorRTUnavailable` (naming `folder`,
    whose ONNX files stay usable) when TensorRT, cuda-python or a CUDA GPU is missing."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        raise TensorRTUnavailable.for_folder("the tensorrt package is not installed", str(folder)) from None
    cudart = _cudart()
    if cudart is None:
        raise TensorRTUnavailable.for_folder("the cuda-python package is not installed", str(folder))
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        raise TensorRTUnavailable.for_folder("no CUDA GPU is visible", str(folder))
    err, prop = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise TensorRTUnavailable.for_folder(f"cudaGetDeviceProperties failed ({err})", str(folder))
    name = prop.name.decode(errors="replace").rstrip("\0") if isinstance(prop.name, bytes) else str(prop.name)
    return TensorRTInfo(trt.__version__, GpuInfo(name, f"{prop.major}.{prop.minor}"))


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
    flags = {"strongly_typed": precision == "fp16", "fp16": False, "refittable": refit, "static": static}
    return EngineSpec(contract.name, precision, onnx_sha256, info.version, info.gpu, engine_profile(contract, static), flags)


def read_metadata(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
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


def polygraphy_builder(onnx_path: Path, spec: EngineSpec, plan_path: Path, timing_cache: Path | None) -> None:
    """Build one engine with polygraphy.backend.trt and save it to `plan_path`."""
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    profile = Profile()
    for name, (lo, opt, hi) in spec.profile.items():
        profile.add(name, min=tuple(lo), opt=tuple(opt), max=tuple(hi))
    cache = str(timing_cache) if timing_cache is not None else None
    config = CreateConfig(
        fp16=spec.flags["fp16"],
        profiles=[profile],
        refittable=spec.flags["refittable"],
        load_timing_cache=cache if cache and Path(cache).is_file() else None,
    )
    network = network_from_onnx_path(str(onnx_path), strongly_typed=spec.flags["strongly_typed"])
    engine = engine_from_network(network, config=config, save_timing_cache=cache)
    save_engine(engine, path=str(plan_path))


def build_engine(
    onnx_path: Path,
    spec: EngineSpec,
    out_dir: Path,
    *,
    reuse_from: Sequence[Path] = (),
    timing_cache: Path | None = None,
    builder: Builder = polygraphy_builder,
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
