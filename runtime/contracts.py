"""The I/O contract of each exported component, stated once.

Export (ONNX names and dynamic axes), engine building (TensorRT min/opt/max profiles), the runtime
(what to feed, what comes back) and the tests (sample inputs, tolerances) all derive from these
objects; the manifest stores them so a consumer of the artifacts needs nothing else.

Conventions every component keeps:
- float inputs and outputs are float32 in every precision; an fp16 model casts inside the graph;
- the VAE decoder takes the *scaled* latent (what the UNet works on) and divides by the latent scale
  factor inside the graph; it returns the image in [-1, 1] (not clamped);
- the VAE encoder returns the distribution parameters (mean, logvar for KL; the pre-quantisation latent
  for VQ), unscaled: the runtime takes the mean or a sample, then multiplies by the scale factor;
- SDXL (Podell et al. 2023): `text_encoder` returns its penultimate layer as `last_hidden_state`;
  `text_encoder_2` has two outputs, its penultimate layer and the projected pooled `text_embeds`; the
  UNet also takes `text_embeds` and the micro-conditioning `time_ids` (runtime/params.MicroConditioning);
  a refiner has `text_encoder_2` only. A component's outputs are listed in the order its graph returns them.
- ControlNet (Zhang et al. 2023): one `controlnet_<k>` per ControlNet and a UNet that takes their summed residuals
  as extra inputs (add_controlnets, at the end of this module); a folder without ControlNets has neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class ContractError(ValueError):
    """Inputs do not fit a component's contract; the message names the tensor and the fix."""


@dataclass(frozen=True)
class Dim:
    """One symbolic dimension: its name in the ONNX graph and the range the artifacts support."""

    name: str
    min: int
    opt: int
    max: int
    multiple_of: int = 1  # sizes that are legal must divide by this (e.g. latent H/W by the UNet's factor)

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ContractError(f"dimension {self.name}: need 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    # Each entry is a fixed size or the name of a Dim of the component; "scale:<dim>:<k>" means k * dim
    # (an output size that follows an input's, like the decoded image's height); "div:<dim>:<k>" means dim / k
    # (a ControlNet residual's size below the latent's).
    shape: tuple[int | str, ...]

    def resolve(self, sizes: dict[str, int]) -> tuple[int, ...]:
        out = []
        for s in self.shape:
            if isinstance(s, int):
                out.append(s)
            elif s.startswith("scale:"):
                _, dim, k = s.split(":")
                out.append(sizes[dim] * int(k))
            elif s.startswith("div:"):  # a downsampled size (a ControlNet residual's): dim / k
                _, dim, k = s.split(":")
                out.append(sizes[dim] // int(k))
            else:
                out.append(sizes[s])
        return tuple(out)

    def axis_names(self) -> dict[int, str]:
        """The dynamic axes of this tensor, as torch.onnx.export wants them."""
        names = {}
        for i, s in enumerate(self.shape):
            if isinstance(s, str):
                names[i] = "{1}_x{2}".format(*s.split(":")) if s.startswith("scale:") else "{1}_div{2}".format(*s.split(":")) if s.startswith("div:") else s
        return names


@dataclass(frozen=True)
class Tolerance:
    """Allowed max |ours - reference| <= atol + rtol * max|reference| over a whole output."""

    atol: float
    rtol: float = 0.0

    def bound(self, reference: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.max(np.abs(reference)))


# Reduced precisions, the same for every component. fp16: the fp16 ONNX files (export/fp16.py). bf16: the fp32 files
# computed in bf16 (OpenVINO --bf16; export/bf16.py), whose 8-bit mantissa rounds 8x coarser than fp16's: measured
# (emulated) 0.6-4 % of max|reference| on the default model, up to 6 % on an SD 1.5-sized UNet with random weights;
# the bound, 2-8x above that, catches a component bf16 breaks, not the usual drift.
REDUCED_TOLERANCE = {"fp16": Tolerance(2e-2, 1e-2), "bf16": Tolerance(5e-2, 1e-1)}


@dataclass(frozen=True)
class ComponentContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[Dim, ...]
    tolerance: dict[str, Tolerance] = field(default_factory=dict)  # by precision: "fp32", "fp16", "bf16"
    # Facts a caller may need besides shapes (latent factor, vocab size, ...), kept with the contract.
    extra: dict[str, Any] = field(default_factory=dict)

    def dim(self, name: str) -> Dim:
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(name)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.axis_names() for t in self.inputs + self.outputs if t.axis_names()}

    def shapes_at(self, which: str) -> dict[str, tuple[int, ...]]:
        """Input shapes at the profile's "min", "opt" or "max" point (a TensorRT optimisation profile)."""
        sizes = {d.name: getattr(d, which) for d in self.dims}
        return {t.name: t.resolve(sizes) for t in self.inputs}

    def sample_inputs(self, sizes: dict[str, int], rng: np.random.Generator, vocab_size: int = 0) -> dict[str, np.ndarray]:
        """Random inputs at the given sizes (defaults: opt), for export tracing and parity checks."""
        full = {d.name: d.opt for d in self.dims} | sizes
        out = {}
        for t in self.inputs:
            shape = t.resolve(full)
            if t.dtype.startswith("int"):
                high = vocab_size if t.name == "input_ids" else max(self.extra.get("num_classes", 1), 1)
                out[t.name] = rng.integers(0, max(high, 1), size=shape).astype(DTYPES[t.dtype])
            elif t.name == "timestep":
                out[t.name] = rng.uniform(0, 999, size=shape).astype(np.float32)
            elif t.name == "time_ids":  # pixel sizes and crop offsets, as a request sends them
                out[t.name] = rng.uniform(0, 1024, size=shape).round().astype(np.float32)
            else:
                out[t.name] = rng.standard_normal(shape).astype(DTYPES[t.dtype])
        return out

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        """Raise ContractError naming the first input whose name, dtype or size does not fit."""
        expected = {t.name for t in self.inputs}
        if set(feeds) != expected:
            raise ContractError(f"{self.name}: inputs {sorted(feeds)} != contract {sorted(expected)}")
        bound: dict[str, int] = {}
        for t in self.inputs:
            arr = feeds[t.name]
            if arr.dtype != DTYPES[t.dtype]:
                raise ContractError(f"{self.name}.{t.name}: dtype {arr.dtype} != {t.dtype}")
            if arr.ndim != len(t.shape):
                raise ContractError(f"{self.name}.{t.name}: rank {arr.ndim} != {len(t.shape)}")
            for size, s in zip(arr.shape, t.shape):
                if isinstance(s, int):
                    if size != s:
                        raise ContractError(f"{self.name}.{t.name}: shape {arr.shape} != {t.shape}")
                    continue
                if s.startswith("scale:"):  # a pixel size k * dim: check it divides, then check the dim
                    _, s, k = s.split(":")
                    if size % int(k):
                        raise ContractError(f"{self.name}.{t.name}: size {size} is not a multiple of {k}")
                    size //= int(k)
                elif s.startswith("div:"):  # a downsampled size: the dim is k times it
                    _, s, k = s.split(":")
                    size *= int(k)
                d = self.dim(s)
                if bound.setdefault(s, size) != size:
                    raise ContractError(f"{self.name}.{t.name}: dimension {s} is {size} here but {bound[s]} elsewhere")
                if not (d.min <= size <= d.max) or size % d.multiple_of:
                    raise ContractError(
                        f"{self.name}.{t.name}: {s}={size} is outside the artifacts' range "
                        f"[{d.min}, {d.max}] (multiple of {d.multiple_of}); rebuild with a wider profile"
                    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComponentContract:
        return cls(
            name=data["name"],
            inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["inputs"]),
            outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["outputs"]),
            dims=tuple(Dim(**d) for d in data["dims"]),
            tolerance={k: Tolerance(**v) for k, v in data.get("tolerance", {}).items()},
            extra=dict(data.get("extra", {})),
        )


@dataclass(frozen=True)
class ModelFacts:
    """What the contracts need to know about a model (read from its config, stored in the manifest)."""

    latent_channels: int
    latent_factor: int  # image pixels per latent pixel (the autoencoder's f)
    unet_factor: int  # latent sizes must divide by this (the UNet's downsampling)
    unet_in_channels: int  # latent_channels + concat-conditioning channels
    unet_out_channels: int
    context_length: int | None  # tokenizer max length (None: no text encoder)
    context_dim: int | None
    vocab_size: int | None
    num_classes: int | None
    autoencoder_kind: str  # "kl" or "vq"
    scale_factor: float
    # SDXL (Podell et al. 2023); None/False for SD 1.x/2.x. text_encoder_2_dim: the sequence width of the second
    # text encoder (its share of context_dim, concatenated after the first encoder's; a refiner has only the
    # second, so its context_dim equals this); pooled_dim: that encoder's projected pooled output, the UNet's
    # `text_embeds`; time_ids: how many micro-conditioning ids the UNet takes (6: original size, crop, target
    # size; 5: the refiner's, with the aesthetic score in place of the target size);
    # force_zeros_for_empty_prompt: an empty negative prompt means zero embeddings (the model folder says so).
    has_text_encoder: bool = True  # False: SDXL refiner (only text_encoder_2); ignored without a context
    text_encoder_2_dim: int | None = None
    pooled_dim: int | None = None
    time_ids: int | None = None
    force_zeros_for_empty_prompt: bool = False
    # LCM-distilled UNet (diffusers' time_cond_proj_dim): it takes the guidance scale as a w-embedding of this
    # width (`timestep_cond`) instead of an unconditional batch.
    time_cond_proj_dim: int | None = None

    def __post_init__(self) -> None:
        if self.text_encoder_2_dim is not None:
            first = (self.context_dim or 0) - self.text_encoder_2_dim
            if self.context_length is None or self.pooled_dim is None or first < 0 or (first > 0) != self.has_text_encoder:
                raise ContractError(
                    f"model facts: text_encoder_2_dim {self.text_encoder_2_dim} needs a context length, pooled_dim and a "
                    f"context_dim ({self.context_dim}) that is it plus the first encoder's width (has_text_encoder="
                    f"{self.has_text_encoder}); the model's config is inconsistent"
                )
        elif not self.has_text_encoder and self.context_length is not None:
            raise ContractError("model facts: a context without any text encoder; the model's config is inconsistent")
        if self.time_ids is not None and (self.pooled_dim is None or self.time_ids < 1):
            raise ContractError(f"model facts: time_ids {self.time_ids} needs pooled_dim (the UNet's text_embeds); the model's config is inconsistent")

    @property
    def pixel_multiple(self) -> int:
        return self.latent_factor * self.unet_factor


# Prompt chunks an export may take: 8 x 75 = 600 tokens, more than any prompt A1111 users are known to write.
MAX_PROMPT_CHUNKS = 8


@dataclass(frozen=True)
class ShapeProfile:
    """Ranges the artifacts are built for, in images per request and pixels (static when min == max)."""

    batch: tuple[int, int, int] = (1, 1, 4)
    height: tuple[int, int, int] = (64, 64, 128)
    width: tuple[int, int, int] = (64, 64, 128)
    # Prompts of up to this many text-encoder lengths (chunks of 75 tokens in SD's 77, each encoded on its own and
    # concatenated on the token axis, as A1111 and compel do); 1: longer prompts are truncated, as in diffusers.
    prompt_chunks: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.prompt_chunks, int) and 1 <= self.prompt_chunks <= MAX_PROMPT_CHUNKS):
            raise ContractError(f"prompt chunks must be 1 to {MAX_PROMPT_CHUNKS}, got {self.prompt_chunks!r}")

    @classmethod
    def static(cls, batch: int, height: int, width: int) -> ShapeProfile:
        return cls((batch,) * 3, (height,) * 3, (width,) * 3)

    @property
    def is_static(self) -> bool:
        return len({*self.batch}) == len({*self.height}) == len({*self.width}) == 1


def _latent_dim(name: str, pixels: tuple[int, int, int], facts: ModelFacts) -> Dim:
    f = facts.latent_factor
    for p in pixels:
        if p % facts.pixel_multiple:
            raise ContractError(f"profile size {p} is not a multiple of {facts.pixel_multiple} (latent factor x UNet factor)")
    return Dim(name, pixels[0] // f, pixels[1] // f, pixels[2] // f, multiple_of=facts.unet_factor)


def build_contracts(
    facts: ModelFacts, profile: ShapeProfile, controlnets: Sequence[ControlNetFacts] = ()
) -> dict[str, ComponentContract]:
    """The four components' contracts for a model and a shape profile; with `controlnets`, one controlnet_<k>
    component each (export order) and the UNet takes their summed residuals (add_controlnets)."""
    f = facts.latent_factor
    b_min, b_opt, b_max = profile.batch
    batch = Dim("batch", b_min, b_opt, b_max)
    # Under classifier-free guidance the UNet sees the unconditional and conditional halves in one call.
    unet_batch = Dim("unet_batch", b_min, 2 * b_opt, 2 * b_max)
    h, w = _latent_dim("latent_height", profile.height, facts), _latent_dim("latent_width", profile.width, facts)
    lc = facts.latent_channels
    contracts: dict[str, ComponentContract] = {}

    if facts.context_length is not None:
        length = facts.context_length
        # Each prompt chunk is a row of its own for the text encoders (pipeline._encode_prompts).
        text_batch = Dim("text_batch", b_min, 2 * b_opt, 2 * b_max * profile.prompt_chunks)
        text_tol = {"fp32": Tolerance(1e-4), **REDUCED_TOLERANCE}
        # SDXL: the UNet's context is [text_encoder's sequence, text_encoder_2's sequence] on the channel axis.
        dim_2 = facts.text_encoder_2_dim
        if facts.has_text_encoder:
            # SDXL's first encoder returns its penultimate layer under the same name (export_wrappers says so).
            contracts["text_encoder"] = ComponentContract(
                name="text_encoder",
                inputs=(TensorSpec("input_ids", "int64", ("text_batch", length)),),
                outputs=(TensorSpec("last_hidden_state", "float32", ("text_batch", length, facts.context_dim - (dim_2 or 0))),),
                dims=(text_batch,),
                tolerance=text_tol,
                extra={"vocab_size": facts.vocab_size},
            )
        if dim_2 is not None:
            # Its own tokenizer (pads with its own pad token) but the same length and, in SDXL, vocabulary.
            contracts["text_encoder_2"] = ComponentContract(
                name="text_encoder_2",
                inputs=(TensorSpec("input_ids", "int64", ("text_batch", length)),),
                outputs=(
                    TensorSpec("last_hidden_state", "float32", ("text_batch", length, dim_2)),  # penultimate layer
                    TensorSpec("text_embeds", "float32", ("text_batch", facts.pooled_dim)),  # projected pooled output
                ),
                dims=(text_batch,),
                tolerance=text_tol,
                extra={"vocab_size": facts.vocab_size},
            )

    unet_inputs = [
        TensorSpec("sample", "float32", ("unet_batch", facts.unet_in_channels, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("unet_batch",)),
    ]
    unet_dims = [unet_batch, h, w]
    if facts.context_length is not None:
        tokens: int | str = facts.context_length
        if profile.prompt_chunks > 1:  # the chunks' states one after the other: a multiple of the encoder's length
            tokens = "context_tokens"
            most = facts.context_length * profile.prompt_chunks
            least = most if profile.is_static else facts.context_length  # a static profile always takes every chunk
            unet_dims.append(Dim(tokens, least, least, most, multiple_of=facts.context_length))
        unet_inputs.append(TensorSpec("encoder_hidden_states", "float32", ("unet_batch", tokens, facts.context_dim)))
    if facts.num_classes is not None:
        unet_inputs.append(TensorSpec("class_labels", "int64", ("unet_batch",)))
    if facts.time_ids is not None:
        # SDXL's added conditioning (diffusers' added_cond_kwargs): pooled text embeds and micro-conditioning ids.
        unet_inputs.append(TensorSpec("text_embeds", "float32", ("unet_batch", facts.pooled_dim)))
        unet_inputs.append(TensorSpec("time_ids", "float32", ("unet_batch", facts.time_ids)))
    if facts.time_cond_proj_dim is not None:
        unet_inputs.append(TensorSpec("timestep_cond", "float32", ("unet_batch", facts.time_cond_proj_dim)))
    contracts["unet"] = ComponentContract(
        name="unet",
        inputs=tuple(unet_inputs),
        outputs=(TensorSpec("out_sample", "float32", ("unet_batch", facts.unet_out_channels, "latent_height", "latent_width")),),
        dims=tuple(unet_dims),
        tolerance={"fp32": Tolerance(1e-4), **REDUCED_TOLERANCE},
        extra={"num_classes": facts.num_classes},
    )
    contracts["vae_decoder"] = ComponentContract(
        name="vae_decoder",
        inputs=(TensorSpec("latent", "float32", ("batch", lc, "latent_height", "latent_width")),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, f"scale:latent_height:{f}", f"scale:latent_width:{f}")),),
        dims=(batch, h, w),
        tolerance={"fp32": Tolerance(1e-4), **REDUCED_TOLERANCE},
        extra={"scale_factor": facts.scale_factor},
    )
    moments = 2 * lc if facts.autoencoder_kind == "kl" else lc
    contracts["vae_encoder"] = ComponentContract(
        name="vae_encoder",
        inputs=(TensorSpec("image", "float32", ("batch", 3, f"scale:latent_height:{f}", f"scale:latent_width:{f}")),),
        outputs=(TensorSpec("latent_parameters", "float32", ("batch", moments, "latent_height", "latent_width")),),
        dims=(batch, h, w),
        tolerance={"fp32": Tolerance(1e-4), **REDUCED_TOLERANCE},
        extra={"kind": facts.autoencoder_kind},
    )
    if controlnets:
        add_controlnets(contracts, facts, controlnets)
    return contracts


# ---- ControlNet (Zhang, Rao & Agrawala 2023) ------------------------------------------------------------------
# One component per ControlNet, named by its place in the export order (the order --control-image pairs follow).
# Its outputs are diffusers' ControlNetOutput (down_block_res_samples, mid_block_res_sample), already multiplied
# by `conditioning_scale`; the UNet of such a folder takes their sum under diffusers' UNet argument names. A
# folder without ControlNets keeps the plain UNet, so plain sampling costs nothing extra.
CONTROLNET_PREFIX = "controlnet_"
CONTROLNET_DOWN = "down_block_res_sample_{}"
CONTROLNET_MID = "mid_block_res_sample"
UNET_DOWN_RESIDUAL = "down_block_additional_residual_{}"
UNET_MID_RESIDUAL = "mid_block_additional_residual"
# The residuals are unnormalised feature maps (tens, where the UNet's eps is about one), so fp32 rounding grows with
# them: the UNet's bound plus 1e-5 of the largest residual (the tiny SDXL ControlNet's fp32 export: 1.1e-4 off).
CONTROLNET_TOLERANCE = {"fp32": Tolerance(1e-4, 1e-5), **REDUCED_TOLERANCE}


def controlnet_name(index: int) -> str:
    return f"{CONTROLNET_PREFIX}{index}"


def controlnet_names(components: Sequence[str]) -> list[str]:
    """The ControlNet components among `components`, in export order (controlnet_0, controlnet_1, ...)."""
    names = [c for c in components if c.startswith(CONTROLNET_PREFIX) and c[len(CONTROLNET_PREFIX):].isdigit()]
    return sorted(names, key=lambda c: int(c[len(CONTROLNET_PREFIX):]))


def residual_input_names(count: int) -> list[str]:
    """The UNet inputs of a ControlNet folder, in contract order: one per input block, then the middle block's;
    controlnet output i feeds UNet input i."""
    return [UNET_DOWN_RESIDUAL.format(k) for k in range(count)] + [UNET_MID_RESIDUAL]


@dataclass(frozen=True)
class ControlNetFacts:
    """What a ControlNet's contract needs (read from its config at export; the contract then states it):
    (channels, downsampling of the latent) of each residual, one per UNet input block, and of the middle block's;
    the control image's channels; whether it averages each residual over H and W (diffusers'
    global_pool_conditions: outputs (B, C, 1, 1), the runtime broadcasts them)."""

    down: tuple[tuple[int, int], ...]
    mid: tuple[int, int]
    hint_channels: int = 3
    global_average_pooling: bool = False


def _residual_spec(name: str, channels: int, factor: int, pooled: bool) -> TensorSpec:
    if pooled:
        return TensorSpec(name, "float32", ("unet_batch", channels, 1, 1))
    h, w = ("latent_height", "latent_width") if factor == 1 else (f"div:latent_height:{factor}", f"div:latent_width:{factor}")
    return TensorSpec(name, "float32", ("unet_batch", channels, h, w))


def add_controlnets(contracts: dict[str, ComponentContract], facts: ModelFacts, controlnets: Sequence[ControlNetFacts]) -> None:
    """Add controlnet_<k> (inputs: sample, timestep, encoder_hidden_states, controlnet_cond: the control image in
    [0, 1] at the output size, conditioning_scale (1,); SDXL also text_embeds, time_ids) and the UNet's residual
    inputs to `contracts` (build_contracts' result)."""
    unet = contracts["unet"]
    if facts.context_length is None:
        raise ContractError("a ControlNet cross-attends to text embeddings; this model has no text encoder")
    layouts = {(cn.down, cn.mid) for cn in controlnets}
    if len(layouts) != 1:
        raise ContractError("the ControlNets give residuals of different shapes; they must all fit the one UNet")
    (down, mid), = layouts
    f = facts.latent_factor
    sized = {t.name: t for t in unet.inputs}
    for index, cn in enumerate(controlnets):
        inputs = [
            TensorSpec("sample", "float32", ("unet_batch", facts.latent_channels, "latent_height", "latent_width")),
            sized["timestep"],
            sized["encoder_hidden_states"],
            TensorSpec("controlnet_cond", "float32", ("unet_batch", cn.hint_channels, f"scale:latent_height:{f}", f"scale:latent_width:{f}")),
            TensorSpec("conditioning_scale", "float32", (1,)),
        ]
        inputs += [sized[n] for n in ("text_embeds", "time_ids") if n in sized]  # SDXL's added conditioning
        outputs = [_residual_spec(CONTROLNET_DOWN.format(k), c, r, cn.global_average_pooling) for k, (c, r) in enumerate(cn.down)]
        outputs.append(_residual_spec(CONTROLNET_MID, mid[0], mid[1], cn.global_average_pooling))
        name = controlnet_name(index)
        contracts[name] = ComponentContract(
            name=name,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            dims=unet.dims,
            tolerance=CONTROLNET_TOLERANCE,
            extra={"global_average_pooling": cn.global_average_pooling},
        )
    residuals = [_residual_spec(n, c, r, False) for n, (c, r) in zip(residual_input_names(len(down)), (*down, mid))]
    contracts["unet"] = ComponentContract(
        name=unet.name, inputs=unet.inputs + tuple(residuals), outputs=unet.outputs, dims=unet.dims,
        tolerance=unet.tolerance, extra={**unet.extra, "controlnet_residuals": len(down)},
    )
