"""The PyTorch reference networks behind the runtime's backend interface (`--backend torch`), and the torch
reference sampler: `torch_pipeline(path)` is the runtime's Pipeline (its one sampling loop) over them.

    pipe = torch_pipeline("path/to/stable-diffusion-v1-5")   # or a LoadedModel already in memory
    result = pipe.generate("a photo of a cat", steps=25, seed=0)

Each component is a `TorchComponent`: `run(inputs: dict[str, ndarray]) -> dict[str, ndarray]` keyed by the
contract's tensor names (runtime/contracts.py), computing the export wrapper the ONNX graph was traced
from, so the torch backend and the ONNX files compute the same function.

The runtime never imports this module by name: it finds `open_components` through the entry point
group "ldm_rt.backends", name "torch" (pyproject.toml:
`[project.entry-points."ldm_rt.backends"] torch = "ldm_rt.reference.torch_backend:open_components"`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm_rt.runtime.backends.base import BackendError, HostOptions
from ldm_rt.runtime.contracts import ComponentContract, ModelFacts, ShapeProfile, build_contracts
from ldm_rt.runtime.embeddings import TokenRows, baked_rows
from ldm_rt.runtime.manifest import Manifest
from ldm_rt.runtime.params import MAX_PROFILE_BATCH, MAX_PROFILE_SIDE
from ldm_rt.runtime.pipeline import Pipeline
from ldm_rt.runtime.scheduler_choice import default_scheduler
from ldm_rt.runtime.schedulers import SchedulerConfig

from .controlnet import ControlNetModel
from .embeddings import grow_token_tables, read_baked
from .export_wrappers import controlnet_facts, export_wrappers
from .model_folder import LoadedModel

logger = logging.getLogger(__name__)

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# The reference has no engine limits: accept the widest profile export would (runtime/params.py), any size
# the model divides.
UNLIMITED_BATCH = MAX_PROFILE_BATCH
UNLIMITED_PIXELS = MAX_PROFILE_SIDE
# The default size when the model does not record its resolution (an SD single file): SD's.
DEFAULT_SIZE = 512


class TorchComponent:
    """One component of the reference model behind the contract's `run` interface. Inputs are checked
    against the contract (names, dtypes, ranges), outputs are float32 numpy arrays."""

    def __init__(self, module: Callable[..., torch.Tensor], contract: ComponentContract, device: str | torch.device = "cpu") -> None:
        self.module = module
        self.contract = contract
        self.device = torch.device(device)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.contract.check_inputs(inputs)
        args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name])).to(self.device) for t in self.contract.inputs]
        with torch.inference_mode():
            out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)  # several outputs (text_encoder_2), in contract order
        return {t.name: o.detach().to("cpu", torch.float32).numpy() for t, o in zip(self.contract.outputs, outs)}

    def __repr__(self) -> str:
        return f"TorchComponent({self.contract.name}, device={self.device})"


def unlimited_profile(facts: ModelFacts, size: int = DEFAULT_SIZE) -> ShapeProfile:
    """A profile as wide as the reference allows: batch 1..64, sizes from one multiple up to ~4096 px; its
    optimum (the default size of a request) is `size` rounded down to a multiple."""
    m = facts.pixel_multiple
    top = max(m, UNLIMITED_PIXELS // m * m)
    opt = min(top, max(m, size // m * m))
    return ShapeProfile(batch=(1, 1, UNLIMITED_BATCH), height=(m, opt, top), width=(m, opt, top))


def nominal_profile(loaded: LoadedModel) -> ShapeProfile:
    """unlimited_profile with the autoencoder's nominal resolution (if recorded) as the default size."""
    return unlimited_profile(loaded.facts(), loaded.model.config.autoencoder.resolution or DEFAULT_SIZE)


def torch_components(
    loaded: LoadedModel,
    contracts: dict[str, ComponentContract] | None = None,
    device: str | torch.device = "cpu",
    controlnets: Sequence[ControlNetModel] = (),
) -> dict[str, TorchComponent]:
    """text_encoder (if any), unet, vae_decoder, vae_encoder of `loaded` as TorchComponents (with `controlnets`,
    controlnet_<k> each and a UNet taking their residuals). Without `contracts` they accept any shape the model
    supports (nominal_profile)."""
    if contracts is None:
        contracts = build_contracts(loaded.facts(), nominal_profile(loaded), [controlnet_facts(c) for c in controlnets])
    loaded.model.to(device)
    for controlnet in controlnets:
        controlnet.to(device)
    wrappers = export_wrappers(loaded.model, controlnets)
    missing = sorted(set(contracts) - set(wrappers))
    if missing:
        raise BackendError(f"the contracts list {missing} but the model has no such component; rebuild the artifacts from this model")
    return {name: TorchComponent(wrappers[name], contract, device) for name, contract in contracts.items()}


def torch_pipeline(model: LoadedModel | str | Path, device: str | torch.device | None = None, **load_kwargs: Any) -> Pipeline:
    """The runtime Pipeline over the reference networks of `model`: a LoadedModel, or a path that
    checkpoints.load_model reads (ldm-rt model folder, diffusers folder or SD single file; `load_kwargs`
    go to it, e.g. tokenizer=DIR for a single file; `device`: default, where the weights are). Requests may use any batch up to 64 and any size the
    model divides (nominal_profile; default size: the autoencoder's nominal resolution). The images carry
    no model hash: the weights are not hashed here (the artifacts' manifest records it). Its default scheduler is
    the model folder's own, as export records it for the artifacts (runtime/scheduler_choice.py)."""
    if isinstance(model, LoadedModel):
        if load_kwargs:
            raise TypeError(f"load options {sorted(load_kwargs)} apply to a path, not to a LoadedModel")
        loaded = model
    else:
        from .checkpoints import load_model

        loaded = load_model(model, **load_kwargs)
    loaded.model.eval()
    profile = nominal_profile(loaded)
    weight = next(loaded.model.parameters())
    components = torch_components(loaded, build_contracts(loaded.facts(), profile), weight.device if device is None else device)
    precision = "fp16" if weight.dtype == torch.float16 else "fp32"
    return Pipeline(
        components, loaded.tokenizer, SchedulerConfig.from_dict(dict(loaded.scheduler_config)), loaded.facts(), profile,
        backend="torch", precision=precision, tokenizer_2=getattr(loaded, "tokenizer_2", None),
        default_scheduler=default_scheduler(loaded.scheduler_config).name,
    )


def open_components(
    artifacts_dir: Path,
    manifest: Manifest,
    precision: str = "fp32",
    providers: Sequence[str] | None = None,
    host: HostOptions = HostOptions(),
    embeddings: Mapping[str, TokenRows] | None = None,
) -> dict[str, TorchComponent]:
    """The "torch" backend factory: load the model the artifacts were exported from (manifest.source) and
    serve it under the artifacts' contracts, with the LoRAs, ControlNets and textual-inversion embeddings the
    export put in (each file checked against its recorded sha256). `embeddings`: text encoder -> TokenRows, the rows
    run-time embeddings add (Pipeline.load(embeddings=...)), after the baked ones. CUDA when torch sees a GPU, else
    CPU; `providers` is ONNX Runtime's notion and is ignored here. `host.threads` sets torch's (process-wide) intra-op
    threads; `host.spin` has no torch counterpart."""
    from .checkpoints import load_model

    if host.threads is not None:
        torch.set_num_threads(host.threads)

    if precision not in PRECISION_DTYPES:
        raise BackendError(f"precision must be one of {sorted(PRECISION_DTYPES)}, got {precision!r}")
    source = _source_path(Path(artifacts_dir), manifest.source)
    options: dict[str, Any] = {}
    if manifest.source.get("prediction_type"):
        options["prediction_type"] = manifest.source["prediction_type"]
    if manifest.source.get("tokenizer"):
        options["tokenizer"] = _resolve(Path(artifacts_dir), manifest.source["tokenizer"])
    elif source.is_file() and manifest.tokenizer is not None:
        options["tokenizer"] = Path(artifacts_dir) / manifest.tokenizer.file  # a single file's tokenizer was copied in
    loaded = load_model(source, dtype=PRECISION_DTYPES[precision], **options)
    _fuse_exported_loras(loaded, Path(artifacts_dir), manifest.source.get("loras") or [])
    _add_embeddings(loaded, Path(artifacts_dir), manifest, embeddings or {})
    facts = loaded.facts()
    if facts != manifest.facts:
        raise BackendError(
            f"the source model {source} no longer matches the artifacts in {artifacts_dir} "
            f"(facts {facts} != {manifest.facts}); rebuild the artifacts"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    contracts = {name: entry.contract for name, entry in manifest.components.items()}
    controlnets = _exported_controlnets(loaded, Path(artifacts_dir), manifest.source.get("controlnets") or [], PRECISION_DTYPES[precision])
    logger.info("torch backend: %s from %s on %s (%s)", sorted(contracts), source, device, precision)
    return torch_components(loaded, contracts, device, controlnets)


def _exported_controlnets(loaded: LoadedModel, root: Path, records: list[dict[str, Any]], dtype: torch.dtype) -> list[ControlNetModel]:
    """The ControlNets the export added (manifest.source["controlnets"], export order), loaded again from their files
    (sha256 checked), so the torch backend runs the networks the artifacts hold."""
    from ldm_rt.runtime.manifest import weights_sha256

    from .keymap_controlnet import load_controlnet

    out = []
    for record in records:
        path = _source_path(root, record)
        if weights_sha256(path) != record.get("sha256"):
            raise BackendError(f"the ControlNet {path} exported into {root} has changed since the export; rebuild the artifacts")
        out.append(load_controlnet(
            path, base=loaded.model.unet.config, global_average_pooling=bool(record.get("global_average_pooling")), dtype=dtype
        ))  # fmt: skip
    return out


def _fuse_exported_loras(loaded: LoadedModel, root: Path, fused: list[dict[str, Any]]) -> None:
    """The LoRAs the export fused (manifest.source["loras"]), fused again into the source weights: the same
    files (sha256 checked) at the same scales, so the torch backend runs the network the artifacts hold."""
    if not fused:
        return
    from .lora import fuse_lora_files, read_lora_any

    files = []
    for record in fused:
        lora = read_lora_any(_resolve(root, str(record["path"])))
        if lora.sha256 != record.get("sha256"):
            raise BackendError(f"the LoRA {record['path']} fused into {root} has changed since the export; rebuild the artifacts")
        files.append((lora, float(record["scale"])))
    fuse_lora_files(loaded, files)


def _add_embeddings(loaded: LoadedModel, root: Path, manifest: Manifest, run_time: Mapping[str, TokenRows]) -> None:
    """The token rows the export baked (manifest.source["embeddings"]: the same files, at the ids the artifacts'
    tokenizer.json gives their triggers), then those added at run time (numbered after them)."""
    baked = manifest.source.get("embeddings") or []
    if baked:
        from ldm_rt.runtime.artifacts import Artifacts

        artifacts = Artifacts.open(root)  # the tokenizers that learned the triggers, hash-checked
        present = {"text_encoder": artifacts.tokenizer, "text_encoder_2": artifacts.tokenizer_2}
        tokenizers = {name: t for name, t in present.items() if t is not None and name in manifest.components}
        grow_token_tables(loaded.model, baked_rows(read_baked(root, baked), tokenizers))
    grow_token_tables(loaded.model, run_time)


def _resolve(root: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


def _source_path(root: Path, source: dict[str, Any]) -> Path:
    """The source model's path from the manifest: absolute, or relative to the artifacts folder."""
    value = source.get("path")
    if not value:
        raise BackendError(f"{root / 'manifest.json'} records no source model path; the torch backend needs the source weights")
    path = Path(value)
    for candidate in (path,) if path.is_absolute() else (root / path, path):
        if candidate.exists():
            return candidate
    raise BackendError(
        f"the source model {value} of {root} is not there any more; the torch backend needs the source weights "
        "(use --backend onnxruntime to run the exported graphs)"
    )
