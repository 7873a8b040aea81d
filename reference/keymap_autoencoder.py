"""diffusers <-> original (CompVis / Stable Diffusion) layout of the first-stage autoencoder.

Our `AutoencoderKL` / `VQModel` use the original key names; diffusers renames modules and stores the
attention projections as Linear weights [C, C] where the original has 1x1 convs [C, C, 1, 1]. The map
follows diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` (`vae_conversion_map`,
`vae_conversion_map_attn`, `reshape_weight_for_sd`), extended to attention inside resolution levels
(Attn{Down,Up}{Encoder,Decoder}Block2D) and to VQModel's `quantize.embedding`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .autoencoder import AutoencoderKL, VQModel
from .checkpoint_errors import check_state_dict
from .configs import AutoencoderConfig, ConfigError

# Submodules of a residual block and of an attention block: ours -> diffusers.
RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers before 0.15 named the attention projections differently; read those too.
LEGACY_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Attention projections whose weight is [C, C, 1, 1] for us and [C, C] in diffusers.
LINEAR_AS_CONV = ("q", "k", "v", "proj_out")

ENCODER_BLOCKS = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}  # type -> has attention
DECODER_BLOCKS = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def autoencoder_config_from_diffusers(cfg: Mapping[str, Any]) -> AutoencoderConfig:
    """AutoencoderConfig from a diffusers `vae/config.json` (AutoencoderKL) or `vqvae/config.json` (VQModel)."""
    class_name = cfg.get("_class_name", "AutoencoderKL")
    if class_name not in ("AutoencoderKL", "VQModel"):
        raise ConfigError(f"autoencoder config: class {class_name!r} is not supported; only AutoencoderKL and VQModel are")
    unsupported = {
        "act_fn": "silu",
        "norm_type": "group",
        "mid_block_add_attention": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "lookup_from_codebook": False,
    }
    for name, default in unsupported.items():
        if cfg.get(name, default) != default:
            raise ConfigError(f"autoencoder config: {name}={cfg[name]!r} is not supported (only {default!r})")

    channels = list(cfg.get("block_out_channels", (64,)))
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ConfigError(f"autoencoder config: block_out_channels {channels} are not multiples of the first one")
    levels = len(channels)
    down = list(cfg.get("down_block_types", ("DownEncoderBlock2D",) * levels))
    up = list(cfg.get("up_block_types", ("UpDecoderBlock2D",) * levels))
    if len(down) != levels or len(up) != levels:
        raise ConfigError(f"autoencoder config: need {levels} down_block_types and up_block_types (one per block_out_channels)")
    unknown = [n for n in down if n not in ENCODER_BLOCKS] + [n for n in up if n not in DECODER_BLOCKS]
    if unknown:
        raise ConfigError(
            f"autoencoder config: block type(s) {unknown} are not supported; "
            f"use {sorted(ENCODER_BLOCKS)} (down) and {sorted(DECODER_BLOCKS)} (up)"
        )
    encoder_attn = [ENCODER_BLOCKS[name] for name in down]
    decoder_attn = [DECODER_BLOCKS[name] for name in reversed(up)]  # up_blocks run from the lowest resolution
    if encoder_attn != decoder_attn:
        raise ConfigError(
            "autoencoder config: encoder and decoder put attention at different levels; the original layout cannot express that"
        )

    sample_size = cfg.get("sample_size", 256)
    resolution = int(sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size)
    latent = int(cfg.get("latent_channels", 4))
    vq = class_name == "VQModel"
    return AutoencoderConfig(
        kind="vq" if vq else "kl",
        in_channels=int(cfg.get("in_channels", 3)),
        out_ch=int(cfg.get("out_channels", 3)),
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=int(cfg.get("layers_per_block", 1)),
        attn_resolutions=tuple(resolution // 2**i for i, has in enumerate(encoder_attn) if has),
        resolution=resolution,
        z_channels=latent,
        embed_dim=int(cfg.get("vq_embed_dim") or latent) if vq else latent,
        n_embed=int(cfg.get("num_vq_embeddings", 256)) if vq else AutoencoderConfig.n_embed,
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
    )


def autoencoder_config_to_diffusers(config: AutoencoderConfig) -> dict[str, Any]:
    """The diffusers config dict of the same architecture (for AutoencoderKL / VQModel constructors)."""
    if config.kind == "kl" and config.embed_dim != config.z_channels:
        raise ConfigError("diffusers' AutoencoderKL needs embed_dim == z_channels; this autoencoder has no diffusers equivalent")
    attn = [config.resolution // 2**i in config.attn_resolutions for i in range(len(config.ch_mult))]
    out: dict[str, Any] = {
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": config.resolution,
    }
    if config.kind == "vq":
        out.update(num_vq_embeddings=config.n_embed, vq_embed_dim=config.embed_dim)
    return out


def _module_map(config: AutoencoderConfig) -> dict[str, str]:
    """Module path ours -> diffusers, for every module that holds parameters."""
    levels = len(config.ch_mult)
    pairs: dict[str, str] = {
        "quant_conv": "quant_conv",
        "post_quant_conv": "post_quant_conv",
        "quantize.embedding": "quantize.embedding",
    }
    resnets: dict[str, str] = {}
    attns: dict[str, str] = {}
    for part in ("encoder", "decoder"):
        pairs[f"{part}.conv_in"] = f"{part}.conv_in"
        pairs[f"{part}.norm_out"] = f"{part}.conv_norm_out"
        pairs[f"{part}.conv_out"] = f"{part}.conv_out"
        resnets[f"{part}.mid.block_1"] = f"{part}.mid_block.resnets.0"
        resnets[f"{part}.mid.block_2"] = f"{part}.mid_block.resnets.1"
        attns[f"{part}.mid.attn_1"] = f"{part}.mid_block.attentions.0"
    for i in range(levels):
        for j in range(config.num_res_blocks):
            resnets[f"encoder.down.{i}.block.{j}"] = f"encoder.down_blocks.{i}.resnets.{j}"
            attns[f"encoder.down.{i}.attn.{j}"] = f"encoder.down_blocks.{i}.attentions.{j}"
        pairs[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        # diffusers' up_blocks[0] is the lowest resolution; our up[levels - 1].
        ours = levels - 1 - i
        for j in range(config.num_res_blocks + 1):
            resnets[f"decoder.up.{ours}.block.{j}"] = f"decoder.up_blocks.{i}.resnets.{j}"
            attns[f"decoder.up.{ours}.attn.{j}"] = f"decoder.up_blocks.{i}.attentions.{j}"
        pairs[f"decoder.up.{ours}.upsample.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    for ours, theirs in resnets.items():
        pairs.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in RESNET_PARTS.items()})
    for ours, theirs in attns.items():
        pairs.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in ATTN_PARTS.items()})
    return pairs


def autoencoder_parameter_shapes(config: AutoencoderConfig) -> dict[str, tuple[int, ...]]:
    """Our key -> shape, from the model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = AutoencoderKL(config) if config.kind == "kl" else VQModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def autoencoder_key_map(config: AutoencoderConfig) -> dict[str, str]:
    """One entry per tensor: our key -> diffusers key."""
    return _key_map(config, autoencoder_parameter_shapes(config))


def _key_map(config: AutoencoderConfig, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    modules = _module_map(config)
    out = {}
    for key in shapes:
        module, _, param = key.rpartition(".")
        out[key] = f"{modules[module]}.{param}"
    return out


def _is_linear_as_conv(our_key: str) -> bool:
    module, _, param = our_key.rpartition(".")
    return param == "weight" and ".attn" in module and module.rpartition(".")[2] in LINEAR_AS_CONV


def _modernise_attention_names(key: str) -> str:
    prefix, sep, rest = key.partition(".attentions.")
    if not sep:
        return key
    index, _, tail = rest.partition(".")
    name, _, param = tail.partition(".")
    if name in LEGACY_ATTN_NAMES:
        return f"{prefix}.attentions.{index}.{LEGACY_ATTN_NAMES[name]}.{param}"
    return key


def autoencoder_state_dict_from_diffusers(
    sd: Mapping[str, torch.Tensor], config: AutoencoderConfig
) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL / VQModel state dict -> ours (original layout). Raises CheckpointError
    naming every missing, unexpected or misshaped key."""
    shapes = autoencoder_parameter_shapes(config)
    key_map = _key_map(config, shapes)
    linear = {theirs for ours, theirs in key_map.items() if _is_linear_as_conv(ours)}
    sd = {_modernise_attention_names(k): v for k, v in sd.items()}
    # Some converted files keep the attention projections conv-shaped [C, C, 1, 1]; accept both.
    sd = {k: v.flatten(1) if k in linear and v.dim() == 4 and v.shape[2:] == (1, 1) else v for k, v in sd.items()}
    # Check in diffusers' names, so the message names keys as they appear in the file.
    expected = {theirs: shapes[ours][:2] if theirs in linear else shapes[ours] for ours, theirs in key_map.items()}
    check_state_dict(expected, sd, "diffusers autoencoder", hint="check that the diffusers config matches these weights")
    return {ours: sd[theirs].reshape(shapes[ours]) for ours, theirs in key_map.items()}


def autoencoder_state_dict_to_diffusers(
    sd: Mapping[str, torch.Tensor], config: AutoencoderConfig
) -> dict[str, torch.Tensor]:
    """Ours (original layout) -> diffusers AutoencoderKL / VQModel naming; the inverse of
    `autoencoder_state_dict_from_diffusers`."""
    shapes = autoencoder_parameter_shapes(config)
    check_state_dict(shapes, sd, "autoencoder", hint="check that the AutoencoderConfig matches these weights")
    return {
        theirs: sd[ours].reshape(shapes[ours][:2]) if _is_linear_as_conv(ours) else sd[ours]
        for ours, theirs in _key_map(config, shapes).items()
    }
