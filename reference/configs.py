"""Typed configs of the reference models, validated once when built.

Field names follow the original LDM / Stable Diffusion YAML (`unet_config.params`, `ddconfig`), so a
reader can hold them against the paper's code; diffusers' names are mapped in `checkpoints/`.
All configs are frozen dataclasses that round-trip through plain JSON dicts (`to_dict`/`from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

# SDXL's micro-conditioning ids per sample (Podell et al. 2023, Sec. 2.2): the base takes original size, crop
# top-left and target size (6); the refiner original size, crop and aesthetic score (5).
BASE_TIME_IDS = 6
REFINER_TIME_IDS = 5
TIME_IDS = (REFINER_TIME_IDS, BASE_TIME_IDS)


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what to do."""


def _tuple_fields(cls, data: dict[str, Any]) -> dict[str, Any]:
    # JSON has no tuples; turn lists back into tuples for fields that hold sequences.
    out = dict(data)
    for f in dataclasses.fields(cls):
        if f.name in out and isinstance(out[f.name], list):
            out[f.name] = tuple(out[f.name])
    return out


def _require_object(name: str, data: Any) -> None:
    # A JSON list would otherwise pass through dict() as key/value pairs, or an empty one as "all defaults".
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a JSON object, got a {type(data).__name__}")


class _JsonConfig:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        _require_object(cls.__name__, data)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(names)}")
        return cls(**_tuple_fields(cls, data))  # type: ignore[call-arg]


@dataclass(frozen=True)
class UNetConfig(_JsonConfig):
    """Time-conditional UNet with SpatialTransformer blocks (LDM paper, Sec. 3.3 and Appendix)."""

    in_channels: int = 4  # latent channels + extra concat channels (inpainting: 4 + 5)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsampling factors (1, 2, 4, ...) at which SpatialTransformer blocks are used, as in the LDM YAML.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    # Exactly one of num_heads / num_head_channels is used: SD v1 fixes heads (8), SD v2 and SDXL fix head
    # width (64). num_heads may also be one head count per level (a diffusers `attention_head_dim` list that
    # fixes neither); the middle block uses the last level's.
    num_heads: int | tuple[int, ...] = 8
    num_head_channels: int = -1
    # SpatialTransformer blocks per transformer: one value, or one per level (SDXL: (1, 2, 10); a level
    # without attention ignores its value). The middle block uses the last level's, as diffusers does.
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int | None = 768  # None: no cross-attention (unconditional or class/concat-only model)
    use_linear_in_transformer: bool = False  # SD v2 projects in/out of the transformer with Linear, v1 with 1x1 conv
    num_classes: int | None = None  # class-label embedding added to the time embedding
    dropout: float = 0.0
    # SD 2.1 computes attention scores in fp32 because fp16 overflows there.
    upcast_attention: bool = False
    # GroupNorm groups of every ResBlock/SpatialTransformer (diffusers' name). SD uses 32; a narrow UNet
    # wants fewer: with 32 channels, 32 groups is per-channel normalisation, which erases absolute colour.
    norm_num_groups: int = 32
    # SDXL's added conditioning (sgm `num_classes: sequential` + `adm_in_channels`; diffusers
    # `addition_embed_type="text_time"`): y = [pooled text embeds, sinusoidal embedding of each time id]
    # of width adm_in_channels, through label_emb (Linear, SiLU, Linear), added to the time embedding.
    adm_in_channels: int | None = None
    addition_time_embed_dim: int = 256  # width of each time id's embedding (SDXL: 256); used with adm_in_channels
    # LCM-distilled UNets (Luo et al. 2023, Sec. 4.2; diffusers' `time_cond_proj_dim`): the width of the guidance
    # scale's w-embedding, projected (Linear, no bias) onto the sinusoidal timestep embedding before time_embed.
    time_cond_proj_dim: int | None = None

    def __post_init__(self) -> None:
        if not self.channel_mult:
            raise ConfigError("UNetConfig: channel_mult must not be empty")
        levels = len(self.channel_mult)
        for name in ("num_heads", "transformer_depth"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != levels:
                raise ConfigError(
                    f"UNetConfig: {name}={value} needs one value per level ({levels}, as channel_mult)"
                )
        if isinstance(self.num_heads, tuple):
            if self.num_head_channels > 0 or min(self.num_heads) < 1:
                raise ConfigError(
                    "UNetConfig: per-level num_heads must all be > 0, with num_head_channels = -1"
                )
        elif self.num_heads <= 0 and self.num_head_channels <= 0:
            raise ConfigError("UNetConfig: set num_heads > 0 or num_head_channels > 0")
        used = {level for level in range(levels) if 2**level in self.attention_resolutions} | {levels - 1}
        if any(self.depth_for(level) < 1 for level in used):
            raise ConfigError(
                f"UNetConfig: transformer_depth={self.transformer_depth} must be >= 1 at every level with "
                "attention and at the last level (the middle block)"
            )
        if self.adm_in_channels is not None:
            if self.num_classes is not None:
                raise ConfigError("UNetConfig: num_classes and adm_in_channels both use label_emb; set one of them")
            if self.adm_in_channels < 1 or self.addition_time_embed_dim < 1:
                raise ConfigError("UNetConfig: adm_in_channels and addition_time_embed_dim must be >= 1")
        if self.norm_num_groups < 1 or self.model_channels % self.norm_num_groups:
            raise ConfigError(
                f"UNetConfig: model_channels ({self.model_channels}) must be a multiple of norm_num_groups "
                f"({self.norm_num_groups}); change one of them"
            )
        if self.num_res_blocks < 1:
            raise ConfigError("UNetConfig: num_res_blocks must be >= 1")
        if self.time_cond_proj_dim is not None and self.time_cond_proj_dim < 1:
            raise ConfigError(f"UNetConfig: time_cond_proj_dim must be >= 1 or None, got {self.time_cond_proj_dim}")

    @property
    def downsampling_factor(self) -> int:
        """How much smaller the innermost feature map is than the input; sizes must divide by it."""
        return 2 ** (len(self.channel_mult) - 1)

    def heads_for(self, channels: int, level: int) -> tuple[int, int]:
        """(heads, head_dim) of a SpatialTransformer with `channels` channels at `level` (0 = full size)."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        heads = self.num_heads[level] if isinstance(self.num_heads, tuple) else self.num_heads
        return heads, channels // heads

    def depth_for(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer at `level`."""
        depth = self.transformer_depth
        return depth[level] if isinstance(depth, tuple) else depth


@dataclass(frozen=True)
class AutoencoderConfig(_JsonConfig):
    """First-stage autoencoder (LDM paper, Sec. 3.1): `ddconfig` plus the regulariser."""

    kind: str = "kl"  # "kl" (KL-regularised) or "vq" (VQ-regularised)
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # downsampling factor f = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()  # feature-map sizes (at `resolution` input) with attention
    resolution: int = 256  # nominal input size; only used to place attn_resolutions
    z_channels: int = 4
    embed_dim: int = 4  # latent channels the diffusion model sees
    dropout: float = 0.0
    n_embed: int = 8192  # VQ codebook size (kind == "vq")
    beta: float = 0.25  # VQ commitment weight (kind == "vq")
    # GroupNorm groups of every block (diffusers' name). The original autoencoders use 32; small ones fewer.
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ("kl", "vq"):
            raise ConfigError(f"AutoencoderConfig.kind must be 'kl' or 'vq', got {self.kind!r}")
        # Every block width is ch * m, so a ch that divides into the groups makes all of them divide.
        if self.norm_num_groups < 1 or self.ch % self.norm_num_groups:
            raise ConfigError(
                f"AutoencoderConfig: ch ({self.ch}) must be a multiple of norm_num_groups ({self.norm_num_groups}); "
                "change one of them"
            )

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig(_JsonConfig):
    """tau_theta: a CLIP-style text transformer (transformers' CLIPTextConfig fields we use)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # SD v1 (OpenAI CLIP); SD v2 (OpenCLIP) uses "gelu"
    layer_norm_eps: float = 1e-5
    # Token ids the tokenizer wrapper needs; CLIP pads with eos (v1) or with "!"/0 (v2).
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407
    projection_dim: int = 512  # width of text_embeds (CLIPTextModelWithProjection; SDXL's second encoder)
    # Which layer conditions the UNet. None: the last layer through the final LayerNorm (`last_hidden_state`;
    # SD v1, and SD v2 whose converted tower already ends at its penultimate layer). An int k: transformers'
    # `hidden_states[k]`, without the final LayerNorm (SDXL reads -2, the penultimate layer, of both encoders;
    # diffusers' `clip_skip=None` there).
    hidden_states_index: int | None = None

    def __post_init__(self) -> None:
        k = self.hidden_states_index
        if k is not None and (isinstance(k, bool) or not -(self.num_hidden_layers + 1) <= k <= self.num_hidden_layers):
            raise ConfigError(
                f"TextEncoderConfig: hidden_states_index={k!r} is not a layer of a {self.num_hidden_layers}-layer "
                f"encoder; use None (last layer) or -{self.num_hidden_layers + 1}..{self.num_hidden_layers}"
            )

    def to_transformers(self):  # -> transformers.CLIPTextConfig
        from transformers import CLIPTextConfig

        return CLIPTextConfig(**self.transformers_fields())

    def transformers_fields(self) -> dict[str, Any]:
        """The fields transformers' CLIPTextConfig takes (all but which layer ldm-rt reads)."""
        return {k: v for k, v in self.to_dict().items() if k != "hidden_states_index"}


@dataclass(frozen=True)
class LDMConfig(_JsonConfig):
    """A whole latent diffusion model: first stage, denoiser, conditioning."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text_encoder: TextEncoderConfig | None = field(default_factory=TextEncoderConfig)
    # z fed to the UNet is scale_factor * E(x); SD v1/v2 use 0.18215 (1/std of latents, paper Sec. 4.3.2),
    # SDXL's VAE 0.13025.
    scale_factor: float = 0.18215
    # How the condition reaches the UNet: "crossattn" (text), "concat" (extra input channels),
    # "hybrid" (both: inpainting), "class" (label embedding), or "none".
    conditioning: str = "crossattn"
    # SDXL (Podell et al. 2023): the second text encoder (OpenCLIP bigG with its projection), whose sequence
    # follows the first's in the context and whose projected pooled output is the UNet's `text_embeds`. The
    # refiner has only this one (text_encoder None). Set exactly when the UNet has adm_in_channels.
    text_encoder_2: TextEncoderConfig | None = None
    # An empty negative prompt means all-zero negative embeddings (diffusers' model_index.json flag; SDXL).
    force_zeros_for_empty_prompt: bool = False

    def __post_init__(self) -> None:
        if self.conditioning not in ("crossattn", "concat", "hybrid", "class", "none"):
            raise ConfigError(f"LDMConfig.conditioning: unknown {self.conditioning!r}")
        if self.conditioning in ("crossattn", "hybrid") and self.unet.context_dim is None:
            raise ConfigError("LDMConfig: cross-attention conditioning needs unet.context_dim")
        if self.unet.adm_in_channels is not None or self.text_encoder_2 is not None:
            self._check_sdxl()  # before the one-encoder width check, which would name the wrong problem
            return
        if (
            self.text_encoder is not None
            and self.unet.context_dim is not None
            and self.text_encoder.hidden_size != self.unet.context_dim
        ):
            raise ConfigError(
                f"LDMConfig: text_encoder.hidden_size ({self.text_encoder.hidden_size}) must equal "
                f"unet.context_dim ({self.unet.context_dim})"
            )

    def _check_sdxl(self) -> None:
        """SDXL's conditioning fits its UNet: both encoders' widths make the context, and the added
        conditioning is [pooled text embeds, n time ids * addition_time_embed_dim] with n in TIME_IDS."""
        unet, te, te2 = self.unet, self.text_encoder, self.text_encoder_2
        if unet.adm_in_channels is None:
            raise ConfigError(
                "LDMConfig: text_encoder_2 is set but the UNet takes no added conditioning (adm_in_channels); "
                "only SDXL UNets use a second text encoder: drop text_encoder_2"
            )
        if te2 is None:
            raise ConfigError(
                "LDMConfig: the UNet takes SDXL's added conditioning (adm_in_channels) but the model has no "
                "text_encoder_2 (the OpenCLIP bigG encoder with projection); load the folder with its "
                "text_encoder_2/ and tokenizer_2/"
            )
        if self.conditioning != "crossattn":
            raise ConfigError(f"LDMConfig: an SDXL model conditions by cross-attention, not {self.conditioning!r}")
        widths = (0 if te is None else te.hidden_size) + te2.hidden_size
        if widths != unet.context_dim:
            have = f"{te.hidden_size} + {te2.hidden_size}" if te is not None else f"text_encoder_2 alone, {te2.hidden_size}"
            raise ConfigError(
                f"LDMConfig: the SDXL UNet cross-attends to {unet.context_dim} channels but the text encoders give "
                f"{widths} ({have}); a base UNet needs both encoders, a refiner UNet only text_encoder_2"
            )
        ids = self.time_ids
        if ids is None:
            raise ConfigError(
                f"LDMConfig: unet.adm_in_channels ({unet.adm_in_channels}) must be text_encoder_2.projection_dim "
                f"({te2.projection_dim}) + n * unet.addition_time_embed_dim ({unet.addition_time_embed_dim}) with n "
                f"in {TIME_IDS} (6: base, 5: refiner); check the encoders belong to this UNet"
            )
        if ids == REFINER_TIME_IDS and te is not None:
            raise ConfigError(
                "LDMConfig: the UNet is an SDXL refiner's (5 time ids, with the aesthetic score), which reads "
                "only text_encoder_2; drop text_encoder (or load the base UNet that belongs to these encoders)"
            )
        if ids == BASE_TIME_IDS and te is None:
            raise ConfigError(
                "LDMConfig: the UNet is an SDXL base's (6 time ids) and needs both text encoders; the model has "
                "only text_encoder_2: load the folder with its text_encoder/ and tokenizer/"
            )

    @property
    def time_ids(self) -> int | None:
        """How many micro-conditioning ids the UNet takes (SDXL: 6 base, 5 refiner), or None."""
        unet, te2 = self.unet, self.text_encoder_2
        if unet.adm_in_channels is None or te2 is None:
            return None
        n, rest = divmod(unet.adm_in_channels - te2.projection_dim, unet.addition_time_embed_dim)
        return n if rest == 0 and n in TIME_IDS else None

    @property
    def requires_aesthetics_score(self) -> bool:
        """The refiner's time ids end with the aesthetic score instead of the target size."""
        return self.time_ids == REFINER_TIME_IDS

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.embed_dim

    @property
    def latent_factor(self) -> int:
        return self.autoencoder.downsampling_factor

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LDMConfig:
        _require_object(cls.__name__, data)
        data = dict(data)
        te, te2 = data.get("text_encoder"), data.pop("text_encoder_2", None)
        return cls(
            unet=UNetConfig.from_dict(data.pop("unet", {})),
            autoencoder=AutoencoderConfig.from_dict(data.pop("autoencoder", {})),
            text_encoder=None if te is None else TextEncoderConfig.from_dict(te),
            text_encoder_2=None if te2 is None else TextEncoderConfig.from_dict(te2),
            **{k: v for k, v in data.items() if k != "text_encoder"},
        )


# The paper's E(.): widths of the conditioning-image encoder (4 widths: 8x down, 512 px image -> 64 latent).
HINT_BLOCK_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig(_JsonConfig):
    """A ControlNet (Zhang et al. 2023; reference/controlnet.py): its encoder copy (a UNetConfig; the output-side fields are unused) and E(c)."""

    # The encoder's config. It must agree with the base UNet's on every residual's channels and size and on the
    # context width (see check_controlnet_fits); in_channels may differ (an inpainting UNet takes 9, its
    # ControlNet the 4 latent channels).
    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: int = 3  # control image channels (diffusers' conditioning_channels)
    # Widths of E(c) (diffusers' conditioning_embedding_out_channels); it downsamples 2^(len - 1) times, which
    # must equal the VAE's factor so that E(c) matches the latent (SD: 8, four widths).
    hint_block_channels: tuple[int, ...] = HINT_BLOCK_CHANNELS
    # The "shuffle" ControlNet (control_v11e_sd15_shuffle) averages each residual over H and W (diffusers'
    # global_pool_conditions).
    global_average_pooling: bool = False

    def __post_init__(self) -> None:
        if self.hint_channels < 1:
            raise ConfigError(f"ControlNetConfig: hint_channels must be >= 1, got {self.hint_channels}")
        if not self.hint_block_channels or min(self.hint_block_channels) < 1:
            raise ConfigError(
                f"ControlNetConfig: hint_block_channels must be one or more widths >= 1, got {self.hint_block_channels}"
            )

    @property
    def hint_factor(self) -> int:
        """How much larger the control image is than the latent (E(c)'s downsampling)."""
        return 2 ** (len(self.hint_block_channels) - 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControlNetConfig:
        _require_object(cls.__name__, data)
        data = dict(data)
        unet = UNetConfig.from_dict(data.pop("unet", {}))
        names = {"hint_channels", "hint_block_channels", "global_average_pooling"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"ControlNetConfig: unknown field(s) {unknown}; known fields are {sorted(names | {'unet'})}")
        return cls(unet=unet, **_tuple_fields(cls, data))
