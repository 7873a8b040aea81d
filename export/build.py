"""One export build: source model -> ONNX (fp32, optionally fp16) -> parity -> TensorRT engines -> manifest.

Everything is written into a temporary folder beside the output and renamed into place at the end
(runtime/atomic.atomic_directory), with manifest.json written last: a folder that has a manifest is a
finished build, and an interrupted build leaves nothing that looks like one.

    <out>/manifest.json
    <out>/onnx/fp32/<component>.onnx, <out>/onnx/fp16/<component>.onnx
    <out>/onnx/fp32/<component>.onnxruntime.onnx   (attention fused for ONNX Runtime, when there is any)
    <out>/engines/<component>.<precision>.<key>.plan + .json   (when TensorRT built them)
    <out>/tokenizer.json, <out>/scheduler_config.json
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import logging
import platform
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ldm_rt.export.errors import ExportError, TensorRTUnavailable
from ldm_rt.export.fp16 import find_fp32_islands, half_model
from ldm_rt.export.onnx_export import OPSET, export_component
from ldm_rt.export.ort_attention import write_ort_variant
from ldm_rt.export.parity import ORT_FP16_NOTE, Case, ParityResult, check_onnx, reference_cases, sample_sets
from ldm_rt.export.sources import Source, load_source
from ldm_rt.export.tensorrt_build import TensorRTInfo, build_engine, engine_spec, probe_tensorrt
from ldm_rt.export.triton_repo import write_triton_repo
from ldm_rt.reference.export_wrappers import export_wrappers
from ldm_rt.runtime.atomic import atomic_directory
from ldm_rt.runtime.contracts import ComponentContract, ContractError, ShapeProfile, build_contracts
from ldm_rt.runtime.manifest import ComponentEntry, FileEntry, Manifest, OrtVariant, PrecisionEntry
from ldm_rt.runtime.sampler_spec import sampler_spec

log = logging.getLogger(__name__)

TOOLS = ("ldm-rt", "torch", "transformers", "onnx", "onnxruntime", "polygraphy", "onnx-graphsurgeon", "tensorrt")
FP32_FIX = "the exported graph does not compute the reference function; report this with the model config"
FP16_FIX = "rebuild without --fp16 (fp32 artifacts are unaffected)"
ORT_FIX = (
    "the attention rewrite for ONNX Runtime changed the function; report this with the model config "
    "(BuildOptions(ort_variant=False) skips the rewrite)"
)
ORT_VARIANT_BACKEND = "onnxruntime-fused"


def default_out_dir(source_name: str) -> Path:
    """engines/build/<source name> inside ldm_rt.engines (the shipped default lives in default/artifacts)."""
    return Path(str(importlib.resources.files("ldm_rt.engines"))) / "build" / source_name


@dataclass(frozen=True)
class BuildOptions:
    model: Path | None = None  # None: the shipped default model
    out: Path | None = None  # None: default_out_dir(source name)
    profile: ShapeProfile = field(default_factory=ShapeProfile)
    static_shape: bool = False  # TensorRT profiles min = opt = max (the ONNX stays dynamic)
    fp16: bool = False
    onnx_only: bool = False
    triton_repo: Path | None = None
    tokenizer: Path | None = None  # for single files, which carry none
    prediction_type: str | None = None
    refit: bool = False
    timing_cache: Path | None = None
    opset: int = OPSET
    progress: bool = True
    ort_variant: bool = True  # also write the fp32 files with attention fused for ONNX Runtime (export/ort_attention.py)


@dataclass
class BuildResult:
    out: Path
    manifest: Manifest
    parity: list[ParityResult]
    tensorrt_error: TensorRTUnavailable | None = None  # the ONNX build finished; engines could not be built
    triton_models: list[str] = field(default_factory=list)


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _external(root: Path, files: list[Path]) -> FileEntry | None:
    """The manifest entry of an ONNX file's external weights (<component>.onnx.data), if it has any."""
    data = [f for f in files if f.suffix == ".data"]
    return FileEntry.of(root, data[0].relative_to(root).as_posix()) if data else None


def _ort_variant(root: Path, rel: str, contract: ComponentContract, cases: list[Case], results: list[ParityResult]) -> OrtVariant | None:
    """The ONNX Runtime variant beside the fp32 file `rel`, parity-checked; None when nothing fuses.
    fp32 only: ONNX Runtime's CPU MultiHeadAttention kernel is float32."""
    rel_ort = rel.removesuffix(".onnx") + ".onnxruntime.onnx"
    fused = write_ort_variant(root / rel, root / rel_ort)
    if not fused:
        return None
    parity = replace(check_onnx(root / rel_ort, contract, "fp32", cases), backend=ORT_VARIANT_BACKEND)
    results.append(parity)
    parity.raise_if_failed(ORT_FIX)
    return OrtVariant(FileEntry.of(root, rel_ort), parity=parity.to_dict(), fused=fused)


def _export_component(
    name: str, source: Source, contract: ComponentContract, root: Path, options: BuildOptions, results: list[ParityResult]
) -> ComponentEntry:
    wrapper = export_wrappers(source.loaded.model)[name]
    rel32 = f"onnx/fp32/{name}.onnx"
    files32 = export_component(wrapper, contract, root / rel32, options.opset)
    cases = reference_cases(wrapper, contract, sample_sets(contract))
    fp32 = check_onnx(root / rel32, contract, "fp32", cases)
    results.append(fp32)
    fp32.raise_if_failed(FP32_FIX)
    ort = _ort_variant(root, rel32, contract, cases, results) if options.ort_variant else None
    precisions = {
        "fp32": PrecisionEntry(FileEntry.of(root, rel32), parity=fp32.to_dict(), external_data=_external(root, files32), ort=ort)
    }
    if options.fp16:
        search = find_fp32_islands(wrapper, contract, cases)
        results.append(search.parity)
        search.parity.raise_if_failed(FP16_FIX)
        rel16 = f"onnx/fp16/{name}.onnx"
        files16 = export_component(half_model(wrapper, contract, search.kept_fp32), contract, root / rel16, options.opset)
        fp16 = check_onnx(root / rel16, contract, "fp16", cases)
        results.append(fp16)
        fp16.raise_if_failed(FP16_FIX)
        parity = {**fp16.to_dict(), "torch_fp16": search.parity.to_dict(), "note": ORT_FP16_NOTE}
        precisions["fp16"] = PrecisionEntry(
            FileEntry.of(root, rel16), parity=parity, kept_fp32=search.kept_fp32, external_data=_external(root, files16)
        )
    return ComponentEntry(contract, precisions)


def _build_engines(
    components: dict[str, ComponentEntry], root: Path, previous: Path, info: TensorRTInfo, options: BuildOptions
) -> None:
    for entry in components.values():
        for precision, pe in entry.precisions.items():
            spec = engine_spec(entry.contract, precision, pe.onnx.sha256, info, static=options.static_shape, refit=options.refit)
            record = build_engine(
                root / pe.onnx.file, spec, root / "engines", reuse_from=[previous / "engines"], timing_cache=options.timing_cache
            )
            entry.engines[record["key"]] = record


def build(options: BuildOptions) -> BuildResult:
    """Run one build; raises ExportError subclasses (one-line messages) on failure, leaving no output."""
    source = load_source(options.model, tokenizer=options.tokenizer, prediction_type=options.prediction_type)
    out = Path(options.out) if options.out is not None else default_out_dir(source.name)
    try:
        contracts = build_contracts(source.facts, options.profile)
    except ContractError as e:
        raise ExportError(f"{e}; choose profile sizes that fit this model") from None

    trt_info: TensorRTInfo | None = None
    trt_error: TensorRTUnavailable | None = None
    if not options.onnx_only:
        try:
            trt_info = probe_tensorrt(out)
        except TensorRTUnavailable as e:
            trt_error = e
            log.warning("%s", e)

    results: list[ParityResult] = []
    with atomic_directory(out) as tmp:
        components: dict[str, ComponentEntry] = {}
        for name in tqdm(contracts, desc="export", unit="component", disable=not options.progress):
            components[name] = _export_component(name, source, contracts[name], tmp, options, results)

        tokenizer = None
        if source.loaded.tokenizer is not None:
            source.loaded.tokenizer.save(tmp / "tokenizer.json")
            tokenizer = FileEntry.of(tmp, "tokenizer.json")
        (tmp / "scheduler_config.json").write_text(json.dumps(source.loaded.scheduler_config, indent=2) + "\n")

        if trt_info is not None:
            _build_engines(components, tmp, out, trt_info, options)
            tensorrt: dict[str, Any] = {"status": "built", "version": trt_info.version, "gpu": asdict(trt_info.gpu)}
        elif trt_error is not None:
            tensorrt = {"status": "unavailable", "reason": str(trt_error)}
        else:
            tensorrt = {"status": "skipped", "reason": "--onnx-only"}

        manifest = Manifest(
            facts=source.facts,
            profile=options.profile,
            components=components,
            tokenizer=tokenizer,
            scheduler=FileEntry.of(tmp, "scheduler_config.json"),
            source=source.to_manifest(),
            tools=tool_versions(),
            tensorrt={**tensorrt, "static_shape": options.static_shape},
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        # Everything a native port needs besides the models (docs/sampler_spec.md).
        manifest.sampler_spec = sampler_spec(source.loaded.scheduler_config, manifest=manifest)
        manifest.write(tmp)  # last: its presence marks the folder finished
    log.info("artifacts written to %s", out)

    triton_models = write_triton_repo(out, options.triton_repo) if options.triton_repo is not None else []
    return BuildResult(out, manifest, results, trt_error, triton_models)
