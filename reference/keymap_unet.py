"""diffusers <-> original (CompVis/SD) layout of the UNet: config and state-dict key map.

The key map follows diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py`
(`unet_conversion_map*`), generalised from its hard-coded SD v1 shape (4 levels, 2 res blocks) to any
UNetConfig: one prefix pair per module, with ResBlock children renamed and transformer subtrees
(`attn1.to_q`, `ff.net.0.proj`, ...) identical in both layouts.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch

from .checkpoint_errors import CheckpointError, check_state_dict
from .configs import ConfigError, UNetConfig
from .unet import UNetModel

logger = logging.getLogger(__name__)

# Whole modules outside the levels: ours -> diffusers.
_TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# Children of a ResBlock (original) / ResnetBlock2D (diffusers).
_RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

# diffusers UNet2DConditionModel options we reproduce only at their default (SD family) value.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
# Keys that carry no architecture (or that we read explicitly below).
_DIFFUSERS_READ = {
    "sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "norm_num_groups", "cross_attention_dim", "transformer_layers_per_block",
    "attention_head_dim", "use_linear_projection", "num_class_embeds", "upcast_attention", "dropout",
    "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
    "addition_embed_type_num_heads",  # only used by addition_embed_type "text"/"text_image", which we reject
    "time_cond_proj_dim",
}
_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # -> has attention
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}


def _one_value(cfg: Mapping[str, Any], name: str, default: Any, n: int) -> Any:
    """A per-level diffusers option that we hold as one value: an int, or a list of n equal ints."""
    value = cfg.get(name, default)
    if isinstance(value, (list, tuple)):
        if len(value) != n or len(set(value)) != 1:
            raise ConfigError(f"diffusers UNet config: {name}={value} varies per level; ldm-rt needs one value")
        value = value[0]
    return value


def _heads(
    cfg: Mapping[str, Any], widths: list[int], attn_levels: list[int]
) -> tuple[int | tuple[int, ...], int]:
    """(num_heads, num_head_channels) from diffusers' `attention_head_dim`.

    diffusers reads `attention_head_dim` as the number of heads per level (a historical misnomer, see its
    UNet2DConditionModel.__init__ and diffusers issue #2011): SD v1 has 8 (fixed heads), SD v2 has
    [5, 10, 20, 20] and SDXL [5, 10, 20] (fixed head width 64). The mid block uses the last level's value.
    A layout that fixes neither becomes one head count per level.
    """
    raw = cfg.get("attention_head_dim", 8)
    per_level = list(raw) if isinstance(raw, (list, tuple)) else [raw] * len(widths)
    if len(per_level) != len(widths):
        raise ConfigError(f"diffusers UNet config: attention_head_dim={raw} needs one value per block")
    used = sorted(set(attn_levels) | {len(widths) - 1})
    heads = {per_level[i] for i in used}
    if len(heads) == 1:
        return heads.pop(), -1
    if any(widths[i] % per_level[i] for i in used):
        raise ConfigError(f"diffusers UNet config: attention_head_dim={raw} does not divide block_out_channels")
    head_dims = {widths[i] // per_level[i] for i in used}
    if len(head_dims) == 1:
        return -1, head_dims.pop()
    return tuple(per_level), -1


def _per_level(cfg: Mapping[str, Any], name: str, default: int, n: int) -> int | tuple[int, ...]:
    """A per-level diffusers option held as one int when all levels agree, else as a tuple of n ints."""
    value = cfg.get(name, default)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"diffusers UNet config: {name}={value} needs one value per block ({n})")
        return value[0] if len(set(value)) == 1 else tuple(value)
    return value


def _added_conditioning(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """UNetConfig fields of diffusers' added conditioning: none, or SDXL's "text_time"."""
    kind = cfg.get("addition_embed_type")
    if kind is None:
        return {}  # diffusers ignores the two widths then
    if kind != "text_time":
        raise ConfigError(
            f"diffusers UNet config: addition_embed_type={kind!r} is not supported by the reference UNet "
            "(only None, as in SD 1.x/2.x, or 'text_time', as in SDXL)"
        )
    fields = {}
    for ours, theirs in (
        ("adm_in_channels", "projection_class_embeddings_input_dim"),
        ("addition_time_embed_dim", "addition_time_embed_dim"),
    ):
        value = cfg.get(theirs)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"diffusers UNet config: addition_embed_type 'text_time' needs {theirs} > 0, got {value!r}")
        fields[ours] = value
    return fields


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """UNetConfig from a diffusers `unet/config.json` dict of an SD 1.x/2.x or SDXL UNet2DConditionModel."""
    name = cfg.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise ConfigError(
            f"diffusers UNet config: _class_name {name!r} is not supported; expected UNet2DConditionModel"
        )
    for key, default in _DIFFUSERS_DEFAULTS.items():
        if key in cfg and cfg[key] != default:
            raise ConfigError(
                f"diffusers UNet config: {key}={cfg[key]!r} is not supported by the reference UNet "
                f"(only {default!r}, as in Stable Diffusion 1.x/2.x and SDXL)"
            )
    known = _DIFFUSERS_DEFAULTS.keys() | _DIFFUSERS_READ
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
    if unknown:
        logger.warning("diffusers UNet config: ignoring unknown option(s) %s", unknown)

    widths = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    down = list(cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(cfg.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    if not (len(widths) == len(down) == len(up)):
        raise ConfigError(
            "diffusers UNet config: block_out_channels, down_block_types and up_block_types differ in length"
        )
    bad = [t for t in down if t not in _DOWN_TYPES] + [t for t in up if t not in _UP_TYPES]
    if bad:
        raise ConfigError(f"diffusers UNet config: block type(s) {bad} not supported; use (CrossAttn)Down/UpBlock2D")
    attn_levels = [i for i, t in enumerate(down) if _DOWN_TYPES[t]]
    if [_UP_TYPES[t] for t in reversed(up)] != [_DOWN_TYPES[t] for t in down]:
        raise ConfigError(f"diffusers UNet config: up_block_types {up} must mirror down_block_types {down}")
    model_channels = widths[0]
    if any(w % model_channels for w in widths):
        raise ConfigError(f"diffusers UNet config: block_out_channels {widths} must be multiples of the first")
    num_heads, num_head_channels = _heads(cfg, widths, attn_levels)
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        model_channels=model_channels,
        channel_mult=tuple(w // model_channels for w in widths),
        num_res_blocks=_one_value(cfg, "layers_per_block", 2, len(widths)),
        attention_resolutions=tuple(2**i for i in reversed(attn_levels)),  # YAML order: (4, 2, 1)
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=_per_level(cfg, "transformer_layers_per_block", 1, len(widths)),
        context_dim=_one_value(cfg, "cross_attention_dim", 1280, len(widths)),
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        num_classes=cfg.get("num_class_embeds"),
        dropout=float(cfg.get("dropout", 0.0)),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        time_cond_proj_dim=cfg.get("time_cond_proj_dim"),
        **_added_conditioning(cfg),
    )


def _module_prefixes(config: UNetConfig) -> list[tuple[str, str, bool]]:
    """(ours, diffusers, is_resblock) module prefixes for every module of a UNet with this config."""
    n = config.num_res_blocks
    levels = len(config.channel_mult)
    out: list[tuple[str, str, bool]] = [(o, d, False) for o, d in _TOP_LEVEL.items()]
    if config.time_cond_proj_dim is not None:
        out.append(("time_cond_proj", "time_embedding.cond_proj", False))
    if config.num_classes is not None:
        out.append(("label_emb", "class_embedding", False))
    elif config.adm_in_channels is not None:  # sgm's nested Sequential vs diffusers' TimestepEmbedding
        out += [("label_emb.0.0", "add_embedding.linear_1", False), ("label_emb.0.2", "add_embedding.linear_2", False)]
    for i in range(levels):
        has_attn = 2**i in config.attention_resolutions
        for j in range(n):
            block = 1 + i * (n + 1) + j  # input_blocks.0 is conv_in; each level adds n blocks + a Downsample
            out.append((f"input_blocks.{block}.0", f"down_blocks.{i}.resnets.{j}", True))
            if has_attn:
                out.append((f"input_blocks.{block}.1", f"down_blocks.{i}.attentions.{j}", False))
        if i < levels - 1:
            out.append((f"input_blocks.{(i + 1) * (n + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv", False))
    out.append(("middle_block.0", "mid_block.resnets.0", True))
    out.append(("middle_block.1", "mid_block.attentions.0", False))
    out.append(("middle_block.2", "mid_block.resnets.1", True))
    for i in range(levels):  # diffusers up_blocks.0 is the deepest level, as are our first output blocks
        has_attn = 2 ** (levels - 1 - i) in config.attention_resolutions
        for j in range(n + 1):
            block = i * (n + 1) + j
            out.append((f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}", True))
            if has_attn:
                out.append((f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}", False))
        if i < levels - 1:
            upsample = f"output_blocks.{i * (n + 1) + n}.{2 if has_attn else 1}"  # after the transformer, if any
            out.append((upsample, f"up_blocks.{i}.upsamplers.0", False))
    return out


def _to_diffusers_key(key: str, prefixes: list[tuple[str, str, bool]]) -> str:
    for ours, theirs, is_resblock in prefixes:
        if key.startswith(ours + "."):
            rest = key[len(ours) + 1 :]
            if is_resblock:
                module, _, param = rest.rpartition(".")
                rest = f"{_RESBLOCK[module]}.{param}"
            return f"{theirs}.{rest}"
    raise KeyError(f"no diffusers name for UNet parameter {key}")  # a bug in _module_prefixes


@functools.lru_cache(maxsize=8)
def unet_parameter_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of UNetModel(config), in our (original SD) layout."""
    with torch.device("meta"):
        model = UNetModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=8)
def unet_key_map(config: UNetConfig) -> dict[str, str]:
    """Our (original SD) state-dict key -> diffusers key, for every parameter of UNetModel(config)."""
    prefixes = _module_prefixes(config)
    return {k: _to_diffusers_key(k, prefixes) for k in unet_parameter_shapes(config)}


def unet_state_dict_from_diffusers(
    sd: Mapping[str, torch.Tensor], config: UNetConfig
) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to our layout; CheckpointError on any mismatch."""
    key_map = unet_key_map(config)
    shapes = unet_parameter_shapes(config)
    check_state_dict(
        {key_map[k]: s for k, s in shapes.items()},
        sd,
        "diffusers UNet",
        hint="check the UNet config.json that came with these weights",
    )
    inverse = {d: o for o, d in key_map.items()}
    return {inverse[k]: v for k, v in sd.items()}


def unet_state_dict_to_diffusers(
    sd: Mapping[str, torch.Tensor], config: UNetConfig
) -> dict[str, torch.Tensor]:
    """Rename our (original SD) UNet state dict to diffusers' layout; CheckpointError on any mismatch."""
    check_state_dict(unet_parameter_shapes(config), sd, "UNet")
    key_map = unet_key_map(config)
    return {key_map[k]: v for k, v in sd.items()}


def load_unet_state_dict(model: UNetModel, sd: Mapping[str, torch.Tensor]) -> None:
    """Load an original-layout state dict into `model` after checking every key and shape."""
    hint = "check that the checkpoint matches the UNet config"
    if any(k.startswith("model.diffusion_model.") for k in sd):
        hint = "strip the 'model.diffusion_model.' prefix of the SD checkpoint keys first"
    elif "conv_in.weight" in sd:
        hint = "this is a diffusers-layout UNet; convert it with unet_state_dict_from_diffusers first"
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(expected, sd, "UNet", hint=hint)
    model.load_state_dict(dict(sd), strict=True)


__all__ = [
    "CheckpointError",
    "load_unet_state_dict",
    "unet_config_from_diffusers",
    "unet_key_map",
    "unet_parameter_shapes",
    "unet_state_dict_from_diffusers",
    "unet_state_dict_to_diffusers",
]
