"""One export build: source model -> ONNX (fp32, optionally fp16) -> parity -> TensorRT engines -> manifest.

Everything is written into a temporary folder beside the output and renamed into place at the end
(runtime/atomic.atomic_directory), with manifest.json written last: a folder that has a manifest is a
finished build, and an interrupted build leaves nothing that looks like one. The output must be new, empty
or an earlier artifacts folder, and one build at a time holds it (export/output.py). Parity is checked at
the points export/parity.py chooses, each shrunk to what the machine's memory allows (export/memory.py);
the manifest records the largest point checked. Each phase reports its progress (export/progress.py).

    <out>/manifest.json
    <out>/onnx/fp32/<component>.onnx, <out>/onnx/fp16/<component>.onnx
    <out>/onnx/fp32/<component>.onnxruntime.onnx   (attention fused for ONNX Runtime, when there is any)
    <out>/engines/<component>.<precision>.<key>.plan + .json   (when TensorRT built them)
    <out>/tokenizer.json, <out>/scheduler_config.json   (SDXL: <out>/tokenizer_2.json too)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import platform
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ldm_rt.export.bf16 import EMULATED_BACKEND, bf16_record, emulated_parity, openvino_bf16_unavailable, openvino_parity
from ldm_rt.export.bf16 import OPENVINO_BACKEND as OPENVINO_BF16_BACKEND
from ldm_rt.export.controlnet_sources import ControlNetSource, load_controlnets
from ldm_rt.export.errors import ExportError, TensorRTUnavailable
from ldm_rt.export.fp16 import find_fp32_islands, half_model
from ldm_rt.export.lora_targets import record_targets
from ldm_rt.export.preview_fit import record_preview_factors
from ldm_rt.runtime.lora import TARGETS_FILE
from ldm_rt.export.memory import (
    TORCH_WEIGHT_COPIES,
    TORCH_WEIGHT_COPIES_FP16,
    EstimateError,
    GraphMemory,
    RssWatch,
    parity_budget,
    release_weight_pages,
    run_bytes,
)
from ldm_rt.export.onnx_export import OPSET, export_component
from ldm_rt.export.ort_attention import write_ort_variant
from ldm_rt.export.output import check_output, claim_output, output_path
from ldm_rt.export.parity import (
    ORT_BACKEND,
    ORT_FP16_NOTE,
    Case,
    ParityPlan,
    ParityResult,
    check_onnx,
    cheapest_cases,
    plan_parity,
    reference_cases,
    sample_sets,
)
from ldm_rt.export.progress import Phase, phase, say
from ldm_rt.export.sources import Source, load_source, source_name
from ldm_rt.export.tensorrt_build import TensorRTInfo, build_engine, engine_spec, probe_tensorrt
from ldm_rt.export.triton_repo import TRITON_REPOSITORY, is_triton_repository, write_triton_repo
from ldm_rt.reference.embeddings import bake_embeddings, token_tables
from ldm_rt.reference.export_wrappers import export_wrappers
from ldm_rt.reference.lora import fuse_lora_files, load_lora_files
from ldm_rt.runtime.artifacts import Artifacts
from ldm_rt.runtime.atomic import atomic_directory
from ldm_rt.runtime.contracts import ComponentContract, ContractError, ShapeProfile, build_contracts
from ldm_rt.runtime.embeddings import EmbeddingError, EmbeddingSpec, load_embeddings
from ldm_rt.runtime.embeddings import as_specs as embedding_specs
from ldm_rt.runtime.lora import LoraError, LoraSpec, as_specs
from ldm_rt.runtime.manifest import (
    FORMAT,
    MANIFEST,
    ArtifactError,
    ComponentEntry,
    FileEntry,
    Manifest,
    OrtVariant,
    PrecisionEntry,
    json_object,
)
from ldm_rt.runtime.params import MAX_PROFILE_BATCH, MAX_PROFILE_SIDE
from ldm_rt.runtime.sampler_spec import sampler_spec
from ldm_rt.runtime.scheduler_choice import default_scheduler

log = logging.getLogger(__name__)

TOOLS = ("ldm-rt", "torch", "transformers", "onnx", "onnxruntime", "polygraphy", "onnx-graphsurgeon", "tensorrt")
FP32_FIX = "the exported graph does not compute the reference function; report this with the model config"
FP16_FIX = "rebuild without --fp16 (fp32 artifacts are unaffected)"
ORT_FIX = (
    "the attention rewrite for ONNX Runtime changed the function; report this with the model config "
    "(BuildOptions(ort_variant=False) skips the rewrite)"
)
ORT_VARIANT_BACKEND = "onnxruntime-fused"
ARTIFACTS = "ldm-rt artifacts folder"
# Profile ceilings: sizes no model can use (their reasons are with them, in runtime/params.py).
MAX_SIDE = MAX_PROFILE_SIDE
MAX_BATCH = MAX_PROFILE_BATCH


# Without --out a build goes to the user's current folder, never into the installed package (which may be
# read-only, shared, or replaced by the next upgrade).
DEFAULT_OUT_PARENT = "ldm-rt-artifacts"


def default_out_dir(source_name: str) -> Path:
    """ldm-rt-artifacts/<source name> in the current folder."""
    return Path(DEFAULT_OUT_PARENT) / source_name


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
    tokenizer_2: Path | None = None  # SDXL's second, for single files
    prediction_type: str | None = None
    refit: bool = False
    timing_cache: Path | None = None
    opset: int = OPSET
    progress: bool = True  # log each phase of the build (export/progress.py)
    ort_variant: bool = True  # also write the fp32 files with attention fused for ONNX Runtime (export/ort_attention.py)
    # TensorRT engines are required: the CLI exits 1 when they could not be built. They are always built when
    # TensorRT is present; --fp16 (without --onnx-only) asks for them too, since fp16 is for GPU engines.
    engines: bool = False
    parity_memory: int | None = None  # bytes a parity run may use; None: memory.MEMORY_FRACTION (85 %) of the available memory
    # LoRAs fused into the weights before export (each at its scale; they add up); the manifest records them.
    loras: tuple[LoraSpec, ...] = ()
    # Textual-inversion embeddings baked into the text encoders' token tables and the tokenizers (runtime/embeddings.py).
    embeddings: tuple[EmbeddingSpec, ...] = ()
    # ControlNets (diffusers folders or original files), each a controlnet_<k> component in this order.
    controlnets: tuple[Path, ...] = ()

    @property
    def engines_required(self) -> bool:
        return self.engines or (self.fp16 and not self.onnx_only)


@dataclass
class BuildResult:
    out: Path
    manifest: Manifest
    parity: list[ParityResult]
    tensorrt_error: TensorRTUnavailable | None = None  # the ONNX build finished; engines could not be built
    triton_models: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not done as asked, and why (one line each)


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


def is_artifacts_folder(path: Path) -> bool:
    """A folder with a manifest.json of ours (any format version: an older build may be rebuilt)."""
    try:
        return json_object(Manifest.read_bytes(path), path / MANIFEST).get("format") == FORMAT
    except ArtifactError:
        return False


def current_sampler_spec(artifacts: Artifacts) -> dict[str, Any]:
    """The sampler spec this ldm-rt writes into the manifest of `artifacts`, as the manifest's JSON holds it."""
    return json.loads(json.dumps(sampler_spec(artifacts.scheduler_config, manifest=artifacts.manifest)))


def refresh_sampler_spec(folder: str | Path) -> bool:
    """Rewrite only the manifest's sampler_spec of a built folder (after the runtime's schedulers changed),
    without re-exporting anything; False if it was already current."""
    artifacts = Artifacts.open(folder)
    spec = current_sampler_spec(artifacts)
    if spec == artifacts.manifest.sampler_spec:
        return False
    artifacts.manifest.sampler_spec = spec
    artifacts.manifest.write(folder)
    return True


def check_profile_limits(profile: ShapeProfile) -> None:
    """Refuse profile sizes no model can use (MAX_SIDE, MAX_BATCH) before anything is loaded."""
    for what, (_, _, top), limit, flag in (
        ("height", profile.height, MAX_SIDE, "--height-range"),
        ("width", profile.width, MAX_SIDE, "--width-range"),
        ("images per prompt", profile.batch, MAX_BATCH, "--batch-range"),
    ):
        if top > limit:
            unit = " px" if limit == MAX_SIDE else ""
            raise ExportError(
                f"profile {what} up to {top}{unit} is above {limit}{unit}, the most any model of the SD family can "
                f"use; choose a smaller maximum ({flag})"
            )


@dataclass
class _Step:
    """What the component being exported needs to report its phases."""

    prefix: str  # "[2/4] unet"
    enabled: bool

    def phase(self, what: str, total: int | None = None) -> contextlib.AbstractContextManager[Phase]:
        return phase(f"{self.prefix}: {what}", total, self.enabled)


def _ort_variant(
    root: Path, rel: str, contract: ComponentContract, cases: list[Case], results: list[ParityResult], step: _Step
) -> OrtVariant | None:
    """The ONNX Runtime variant beside the fp32 file `rel`, parity-checked; None when nothing fuses.
    fp32 only: ONNX Runtime's CPU MultiHeadAttention kernel is float32."""
    rel_ort = rel.removesuffix(".onnx") + ".onnxruntime.onnx"
    with step.phase("attention fusion for onnxruntime"):
        fused = write_ort_variant(root / rel, root / rel_ort)
    if not fused:
        return None
    with step.phase(f"parity fp32 ({ORT_VARIANT_BACKEND})", len(cases)) as p:
        parity = replace(check_onnx(root / rel_ort, contract, "fp32", cases, p.item), backend=ORT_VARIANT_BACKEND)
    results.append(parity)
    parity.raise_if_failed(ORT_FIX)
    return OrtVariant(FileEntry.of(root, rel_ort), parity=parity.to_dict(), fused=fused)


def _bf16_parity(
    path: Path, contract: ComponentContract, emulated: ParityResult, cases: list[Case], results: list[ParityResult],
    notes: list[str], step: _Step,
) -> dict[str, Any]:
    """The manifest's bf16 record: the emulated parity, and OpenVINO's own bf16 where this CPU has it. A failure is
    a note, not an error: the build's files are fp32 and right; `--bf16` refuses the model (export/bf16.py)."""
    measured = None
    unavailable = openvino_bf16_unavailable()
    if unavailable is None:
        with step.phase(f"parity bf16 ({OPENVINO_BF16_BACKEND})", len(cases)) as p:
            measured = openvino_parity(path, contract, cases, p.item)
        results.append(measured)
    record = bf16_record(emulated, measured, unavailable)
    if not record["passed"]:
        then = "refuse this model" if measured is not None else "warn that its images may drift (OpenVINO's own bf16 was not measured here)"
        notes.append(f"{contract.name}: {(measured or emulated).failure()}; --bf16 will {then}; f32 is unaffected")
        say(notes[-1], step.enabled)
    return record


def _plan(path: Path, contract: ComponentContract, options: BuildOptions, notes: list[str]) -> ParityPlan:
    """Where to check parity: every parity point the parity run's estimated memory allows (export/memory.py).
    A point shrunk to fit is said in one line in `notes` and recorded in the manifest."""
    budget = options.parity_memory if options.parity_memory is not None else parity_budget()
    try:
        graph = GraphMemory(path)
    except EstimateError as e:
        log.warning("%s: %s", contract.name, e)
        plan = plan_parity(contract, None, budget)
    else:
        copies = TORCH_WEIGHT_COPIES_FP16 if options.fp16 else TORCH_WEIGHT_COPIES
        plan = plan_parity(contract, lambda shapes: run_bytes(graph, shapes, copies), budget)
    if plan.note:
        notes.append(f"{contract.name}: {plan.note}")
        say(notes[-1], options.progress)
    return plan


def _export_component(
    name: str, source: Source, contract: ComponentContract, root: Path, options: BuildOptions,
    results: list[ParityResult], notes: list[str], step: _Step, controlnets: list[ControlNetSource] | None = None,
) -> ComponentEntry:  # fmt: skip
    wrapper = export_wrappers(source.loaded.model, [c.model for c in controlnets or ()])[name]
    rel32 = f"onnx/fp32/{name}.onnx"
    with step.phase("onnx export fp32 (torch.onnx.export, clean-up, checker)", 2) as p:
        files32 = export_component(wrapper, contract, root / rel32, options.opset, p.item)
    with step.phase("parity plan (memory estimate of each shape)"):
        plan = _plan(root / rel32, contract, options, notes)
    with step.phase("reference outputs (torch fp32)", len(plan.points)) as p:
        cases = reference_cases(wrapper, contract, sample_sets(contract, points=plan.points), p.item)
    bf16_cases = cheapest_cases(cases)  # bf16's error is arithmetic, not shape: the two smallest cases tell it
    with step.phase(f"parity bf16 ({EMULATED_BACKEND})", len(bf16_cases)) as p:
        emulated = emulated_parity(wrapper, contract, bf16_cases, p.item)  # while the torch weights are resident
    results.append(emulated)
    # The torch weights are not read again until the fp16 search or the LoRA targets: the ONNX Runtime sessions
    # need not run beside a resident copy of them (SD 1.5's UNet: 3.4 GB).
    release_weight_pages(wrapper.parameters())
    with step.phase(f"parity fp32 ({ORT_BACKEND})", len(cases)) as p:
        fp32 = check_onnx(root / rel32, contract, "fp32", cases, p.item)
    results.append(fp32)
    fp32.raise_if_failed(FP32_FIX)
    ort = _ort_variant(root, rel32, contract, cases, results, step) if options.ort_variant else None
    bf16 = _bf16_parity(root / rel32, contract, emulated, bf16_cases, results, notes, step)
    checked = plan.to_dict()
    precisions = {
        "fp32": PrecisionEntry(
            FileEntry.of(root, rel32), parity={**fp32.to_dict(), **checked, "bf16": bf16}, external_data=_external(root, files32), ort=ort
        )
    }
    if options.fp16:
        with step.phase("fp16 search (torch fp16 against fp32, per round and case)") as p:
            search = find_fp32_islands(wrapper, contract, cases, progress=p.item)
        results.append(search.parity)
        search.parity.raise_if_failed(FP16_FIX)
        rel16 = f"onnx/fp16/{name}.onnx"
        with step.phase("onnx export fp16", 2) as p:
            half = half_model(wrapper, contract, search.kept_fp32)
            release_weight_pages(wrapper.parameters())
            files16 = export_component(half, contract, root / rel16, options.opset, p.item)
            del half
        with step.phase(f"parity fp16 ({ORT_BACKEND})", len(cases)) as p:
            fp16 = check_onnx(root / rel16, contract, "fp16", cases, p.item)
        results.append(fp16)
        fp16.raise_if_failed(FP16_FIX)
        parity = {**fp16.to_dict(), "torch_fp16": search.parity.to_dict(), "note": ORT_FP16_NOTE, **checked}
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
            with phase(f"{entry.contract.name}: TensorRT engine {precision}", enabled=options.progress):
                record = build_engine(
                    root / pe.onnx.file, spec, root / "engines", reuse_from=[previous / "engines"], timing_cache=options.timing_cache
                )
            entry.engines[record["key"]] = record


def _gb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e9:.2f} GB"


def output_dir(options: BuildOptions) -> Path:
    """Where the build goes: --out, else ldm-rt-artifacts/<source name> in the current folder."""
    return output_path(options.out if options.out is not None else default_out_dir(source_name(options.model)))


def build(options: BuildOptions) -> BuildResult:
    """Run one build; raises ExportError subclasses (one-line messages) on failure, leaving no output.
    OSError (a full or read-only disk) propagates for the caller to report."""
    check_profile_limits(options.profile)
    try:  # a missing, truncated or pickled LoRA is refused before anything is loaded or written
        lora_files = load_lora_files(as_specs(options.loras))
    except LoraError as e:
        raise ExportError(str(e)) from None
    try:  # the same for embeddings (restricted reading of .pt files: runtime/embeddings.py)
        embedding_files = load_embeddings(embedding_specs(options.embeddings))
    except EmbeddingError as e:
        raise ExportError(str(e)) from None
    out = output_dir(options)
    # Refuse unusable outputs before minutes of work; claim_output checks again under the lock.
    check_output(out, is_artifacts_folder, ARTIFACTS)
    if options.triton_repo is not None:
        repo = output_path(options.triton_repo)
        if repo == out or out in repo.parents or repo in out.parents:
            raise ExportError(f"the Triton repository {repo} and the artifacts folder {out} must not contain each other")
        check_output(repo, is_triton_repository, TRITON_REPOSITORY)
    with claim_output(out, is_artifacts_folder, ARTIFACTS):
        result = _build_into(out, options, lora_files, embedding_files)
    if options.triton_repo is not None:
        result.triton_models = write_triton_repo(out, options.triton_repo)
    return result


def _build_into(out: Path, options: BuildOptions, lora_files: list | None = None, embedding_files: list | None = None) -> BuildResult:
    with phase(f"load {options.model or 'the shipped default model'}", enabled=options.progress):
        source = load_source(
            options.model, tokenizer=options.tokenizer, tokenizer_2=options.tokenizer_2, prediction_type=options.prediction_type
        )
    lora_records: list[dict[str, Any]] = []
    if lora_files:
        with phase(f"fuse {len(lora_files)} LoRA(s)", enabled=options.progress):
            try:
                # The path too, so a backend that rebuilds the weights from the source can apply them again.
                lora_records = [{**r, "path": str(f.path.resolve())} for r, (f, _) in zip(fuse_lora_files(source.loaded, lora_files), lora_files)]
            except LoraError as e:
                raise ExportError(str(e)) from None
    baked: list[dict[str, Any]] = []
    if embedding_files:
        with phase(f"bake {len(embedding_files)} textual-inversion embedding(s)", enabled=options.progress):
            try:
                baked = bake_embeddings(source.loaded, embedding_files)
            except EmbeddingError as e:
                raise ExportError(str(e)) from None
    with phase(f"load {len(options.controlnets)} ControlNet(s)", enabled=options.progress and bool(options.controlnets)):
        controlnets = load_controlnets(options.controlnets, source)
    try:
        contracts = build_contracts(source.facts, options.profile, [c.facts for c in controlnets])
    except ContractError as e:
        raise ExportError(f"{e}; choose profile sizes that fit this model") from None
    if baked:  # the grown token tables: parity then draws the baked tokens' ids too (facts keep the base vocabulary)
        for name, table in token_tables(source.loaded.model).items():
            contracts[name] = replace(contracts[name], extra={**contracts[name].extra, "vocab_size": table.num_embeddings})

    trt_info: TensorRTInfo | None = None
    trt_error: TensorRTUnavailable | None = None
    if not options.onnx_only:
        try:
            trt_info = probe_tensorrt(out)
        except TensorRTUnavailable as e:
            trt_error = e
            log.info("%s", e)

    results: list[ParityResult] = []
    notes: list[str] = []
    with atomic_directory(out) as tmp:
        components: dict[str, ComponentEntry] = {}
        for i, name in enumerate(contracts, start=1):
            step = _Step(f"[{i}/{len(contracts)}] {name}", options.progress)
            with RssWatch() as watch:
                components[name] = _export_component(name, source, contracts[name], tmp, options, results, notes, step, controlnets)
            rss = components[name].export = watch.record()
            say(f"{step.prefix}: peak RSS {_gb(rss.get('peak_rss_bytes'))} (export process so far: {_gb(rss.get('process_peak_rss_bytes'))})", options.progress)

        tokenizer = None
        if source.loaded.tokenizer is not None:
            source.loaded.tokenizer.save(tmp / "tokenizer.json")
            tokenizer = FileEntry.of(tmp, "tokenizer.json")
        tokenizer_2 = None  # SDXL's second tokenizer, for text_encoder_2 (its own pad token)
        if getattr(source.loaded, "tokenizer_2", None) is not None:
            source.loaded.tokenizer_2.save(tmp / "tokenizer_2.json")
            tokenizer_2 = FileEntry.of(tmp, "tokenizer_2.json")
        (tmp / "scheduler_config.json").write_text(json.dumps(source.loaded.scheduler_config, indent=2) + "\n")

        # Where each LoRA-targetable weight sits in each ONNX file: the runtime patches them there (runtime/lora.py).
        with phase("LoRA targets (initializer of each adaptable weight)", enabled=options.progress):
            record_targets(source.loaded.model, tmp, components)
        lora_targets = FileEntry.of(tmp, TARGETS_FILE) if (tmp / TARGETS_FILE).is_file() else None
        # The latent -> RGB map of fast step previews, fitted on this build's own VAE (export/preview_fit.py).
        with phase("preview factors (latent -> RGB fit on the VAE)", enabled=options.progress):
            preview_factors = record_preview_factors(tmp, components, source.facts, options.profile)

        if trt_info is not None:
            _build_engines(components, tmp, out, trt_info, options)
            tensorrt: dict[str, Any] = {"status": "built", "version": trt_info.version, "gpu": asdict(trt_info.gpu)}
        elif trt_error is not None:
            tensorrt = {"status": "unavailable", "reason": str(trt_error)}
        else:
            tensorrt = {"status": "skipped", "reason": "--onnx-only"}

        # The folder's own scheduler (its class in scheduler_config.json) as a --scheduler name: the runtime's default.
        choice = default_scheduler(source.loaded.scheduler_config)
        say(f"default scheduler: {choice.describe()}", options.progress)
        manifest = Manifest(
            default_scheduler=choice.name,
            facts=source.facts,
            profile=options.profile,
            components=components,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            lora_targets=lora_targets,
            preview_factors=preview_factors,
            scheduler=FileEntry.of(tmp, "scheduler_config.json"),
            source={
                **source.to_manifest(), **({"loras": lora_records} if lora_records else {}),
                **({"embeddings": baked} if baked else {}),
                **({"controlnets": [c.record for c in controlnets]} if controlnets else {}),
            },
            tools=tool_versions(),
            tensorrt={**tensorrt, "static_shape": options.static_shape},
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        # Everything a native port needs besides the models (docs/sampler_spec.md).
        manifest.sampler_spec = sampler_spec(source.loaded.scheduler_config, manifest=manifest)
        manifest.write(tmp)  # last: its presence marks the folder finished
    log.info("artifacts written to %s", out)
    return BuildResult(out, manifest, results, trt_error, notes=notes)
