"""ControlNet layouts -> ours, and loading a ControlNet from local files.

    controlnet = load_controlnet("models/control_v11p_sd15_canny", base=loaded.model.config.unet)  # diffusers folder
    controlnet = load_controlnet("models/control_sd15_canny.safetensors", base=loaded.model.config.unet)  # original

Our layout is the original `cldm` one (lllyasviel's control_sd15_*.pth / control_v11*.pth, `control_model.`
stripped): `time_embed`, `input_blocks`, `middle_block` (named as the UNet's, so their map to diffusers is
keymap_unet's), `input_hint_block` (E(c)), `zero_convs`, `middle_block_out`. diffusers' `ControlNetModel` names
the last three `controlnet_cond_embedding` (conv_in, blocks.k, conv_out), `controlnet_down_blocks` and
`controlnet_mid_block`; the explicit map below (_CONTROLNET_ONLY) is the one in diffusers'
`convert_controlnet_checkpoint`, generalised to any number of E(c) widths.

An original single file holds no config: it is inferred from the tensors' shapes as for an SD single file
(reference/checkpoints.py), with the facts the weights do not show (attention heads, upcast attention, SDXL's
time-id width) taken from `base`, the UNet the ControlNet will steer, when given (else as Stable Diffusion's:
8 heads at a 768-wide context, 64-wide heads otherwise). Pickles load only through torch.load(weights_only=True).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint_errors import CheckpointError, check_state_dict
from .checkpoints import _convert_config, _read_component_weights, infer_unet_config, read_state_dict
from .configs import ConfigError, ControlNetConfig, UNetConfig
from .controlnet import ControlNetModel, check_controlnet_fits, residual_layout
from .keymap_unet import unet_config_from_diffusers, unet_key_map
from .model_folder import check_materialised, load_strict, parameters_on_meta

# The original files' prefix (a whole ControlLDM checkpoint also holds the SD model under its own prefixes).
ORIGINAL_PREFIX = "control_model."
# One key each layout always has, to tell them apart.
DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"
ORIGINAL_MARKER = "input_hint_block.0.weight"
# diffusers ControlNetModel options that are not the encoder's (the rest is a UNet2DConditionModel config).
_DIFFUSERS_CONTROLNET_OPTIONS = {
    "conditioning_channels", "controlnet_conditioning_channel_order", "conditioning_embedding_out_channels",
    "global_pool_conditions",
}
_UP_FOR_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
_SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # diffusers' default down_block_types


def controlnet_config_from_diffusers(cfg: Mapping[str, Any]) -> ControlNetConfig:
    """ControlNetConfig from a diffusers ControlNetModel `config.json` dict (SD 1.x/2.x; SDXL's text_time)."""
    name = cfg.get("_class_name", "ControlNetModel")
    if name != "ControlNetModel":
        raise ConfigError(f"diffusers ControlNet config: _class_name {name!r} is not supported; expected ControlNetModel")
    order = cfg.get("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise ConfigError(
            f"diffusers ControlNet config: controlnet_conditioning_channel_order={order!r} is not supported; "
            "only 'rgb' (every published ControlNet)"
        )
    down = list(cfg.get("down_block_types", _SD_DOWN_BLOCKS))
    if any(t not in _UP_FOR_DOWN for t in down):
        raise ConfigError(f"diffusers ControlNet config: down_block_types {down} not supported; use (CrossAttn)DownBlock2D")
    # The encoder is a UNet2DConditionModel's first half: give the converter the mirrored decoder it checks for.
    unet = {k: v for k, v in cfg.items() if k not in _DIFFUSERS_CONTROLNET_OPTIONS and not k.startswith("_")}
    unet.update(
        _class_name="UNet2DConditionModel",
        down_block_types=down,
        up_block_types=[_UP_FOR_DOWN[t] for t in reversed(down)],
        out_channels=cfg.get("in_channels", 4),
    )
    hint = cfg.get("conditioning_embedding_out_channels")
    return ControlNetConfig(
        unet=unet_config_from_diffusers(unet),
        hint_channels=int(cfg.get("conditioning_channels", 3)),
        hint_block_channels=ControlNetConfig.hint_block_channels if hint is None else tuple(hint),
        global_average_pooling=bool(cfg.get("global_pool_conditions", False)),
    )


def _controlnet_only_prefixes(config: ControlNetConfig) -> dict[str, str]:
    """Ours -> diffusers for the modules the UNet does not have: E(c) and the zero convolutions."""
    widths = len(config.hint_block_channels)
    out = {"input_hint_block.0": "controlnet_cond_embedding.conv_in"}
    # Sequential indices: conv_in 0, then (conv, SiLU) pairs: block k at 2 (k + 1), conv_out after the 2 (w - 1) blocks.
    out.update({f"input_hint_block.{2 * (k + 1)}": f"controlnet_cond_embedding.blocks.{k}" for k in range(2 * (widths - 1))})
    out[f"input_hint_block.{4 * (widths - 1) + 2}"] = "controlnet_cond_embedding.conv_out"
    out.update({f"zero_convs.{i}.0": f"controlnet_down_blocks.{i}" for i in range(len(residual_layout(config.unet).down))})
    out["middle_block_out.0"] = "controlnet_mid_block"
    return out


@functools.lru_cache(maxsize=8)
def controlnet_parameter_shapes(config: ControlNetConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ControlNetModel(config)'s state dict, in our (original) layout."""
    with torch.device("meta"):
        model = ControlNetModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=8)
def controlnet_key_map(config: ControlNetConfig) -> dict[str, str]:
    """Our (original) key -> diffusers key, for every parameter of ControlNetModel(config): the encoder's
    through keymap_unet's UNet map (same keys as the UNet's), the rest through _controlnet_only_prefixes."""
    unet_map = unet_key_map(config.unet)
    only = _controlnet_only_prefixes(config)
    out = {}
    for key in controlnet_parameter_shapes(config):
        module, _, param = key.rpartition(".")
        out[key] = f"{only[module]}.{param}" if module in only else unet_map[key]
    return out


def controlnet_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor], config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers ControlNetModel state dict to our layout; CheckpointError naming any mismatch."""
    key_map = controlnet_key_map(config)
    shapes = controlnet_parameter_shapes(config)
    check_state_dict(
        {key_map[k]: s for k, s in shapes.items()}, sd, "diffusers ControlNet",
        hint="check the ControlNet config.json that came with these weights",
    )
    inverse = {d: o for o, d in key_map.items()}
    return {inverse[k]: v for k, v in sd.items()}


def controlnet_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor], config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """Rename our (original) ControlNet state dict to diffusers' layout; CheckpointError naming any mismatch."""
    check_state_dict(controlnet_parameter_shapes(config), sd, "ControlNet")
    key_map = controlnet_key_map(config)
    return {key_map[k]: v for k, v in sd.items()}


def original_controlnet_state_dict(sd: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors of an original file, prefix stripped: `control_model.*` (a ControlNet file or a
    whole ControlLDM checkpoint, whose SD model is dropped), or unprefixed keys (files such as thibaud's SD 2.1)."""
    if any(isinstance(k, str) and k.startswith(ORIGINAL_PREFIX) for k in sd):
        out = {k[len(ORIGINAL_PREFIX):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(ORIGINAL_PREFIX)}
    elif ORIGINAL_MARKER in sd:
        out = dict(sd)
    elif DIFFUSERS_MARKER in sd:
        raise CheckpointError(
            f"{where} is a diffusers-layout ControlNet without its config: pass the folder that holds it and config.json"
        )
    else:
        raise CheckpointError(
            f"{where} is not a ControlNet: no {ORIGINAL_PREFIX}* keys and no {ORIGINAL_MARKER}; "
            "pass a ControlNet file (control_sd15_*, control_v11*) or a diffusers ControlNetModel folder"
        )
    bad = sorted(k for k, v in out.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{where}: {bad[:3]} are not tensors; the file is damaged or not a ControlNet")
    return out


def _hint_block_channels(sd: Mapping[str, torch.Tensor], where: str) -> tuple[int, ...]:
    """E(c)'s widths from its convolutions at Sequential indices 0, 2, ..., 4 (w - 1) + 2 (see _controlnet_only_prefixes)."""
    indices = sorted({int(m.group(1)) for k in sd if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k))})
    last = indices[-1] if indices else 0
    if last < 2 or last % 4 != 2 or indices != list(range(0, last + 1, 2)):
        raise CheckpointError(
            f"{where}: input_hint_block has convolutions at {indices}, not at 0, 2, ..., 4n + 2 as the "
            "ControlNet's conditioning encoder; the file is damaged or another kind of model"
        )
    widths = (last - 2) // 4 + 1
    return (sd["input_hint_block.0.weight"].shape[0],) + tuple(
        sd[f"input_hint_block.{4 * k}.weight"].shape[0] for k in range(1, widths)
    )


def infer_controlnet_config(
    sd: Mapping[str, torch.Tensor], *, where: str, base: UNetConfig | None = None, global_average_pooling: bool = False
) -> ControlNetConfig:
    """ControlNetConfig of an original-layout ControlNet state dict (prefix stripped), from tensor shapes and,
    for what shapes do not show, `base` (the UNet it steers) when given."""
    if "input_blocks.0.0.weight" not in sd:
        raise CheckpointError(f"{where}: key input_blocks.0.0.weight is missing, so the architecture cannot be inferred")
    in_channels = sd["input_blocks.0.0.weight"].shape[1]
    # infer_unet_config reads the output head's width, which an encoder copy has not: it is unused here.
    unet = infer_unet_config(
        {**sd, "out.2.weight": torch.empty(in_channels, device="meta")}, v2="label_emb.0.0.weight" in sd, where=where
    )
    # YAML order (largest first), as keymap_unet's diffusers converter gives it, so both sources compare equal.
    unet = dataclasses.replace(unet, attention_resolutions=tuple(sorted(unet.attention_resolutions, reverse=True)))
    if base is not None:  # heads, norm groups, upcasting, the time-id width are not in the weights: the base's
        _check_fits(ControlNetConfig(unet=unet), base, where)  # first: a foreign base's heads may not even apply
        unet = dataclasses.replace(
            unet, num_heads=base.num_heads, num_head_channels=base.num_head_channels,
            norm_num_groups=base.norm_num_groups, upcast_attention=base.upcast_attention,
            addition_time_embed_dim=base.addition_time_embed_dim,
        )
    hint = sd.get(ORIGINAL_MARKER)
    if hint is None or hint.ndim != 4:
        raise CheckpointError(f"{where}: {ORIGINAL_MARKER} is missing or not a convolution; the file is damaged")
    try:
        return ControlNetConfig(
            unet=unet, hint_channels=hint.shape[1], hint_block_channels=_hint_block_channels(sd, where),
            global_average_pooling=global_average_pooling,
        )
    except ConfigError as e:
        raise CheckpointError(f"{where}: inferred ControlNet config is invalid ({e})") from None


def _check_fits(config: ControlNetConfig, base: UNetConfig, where: str) -> None:
    try:
        check_controlnet_fits(config, base)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def load_controlnet(
    path: str | Path,
    *,
    base: UNetConfig | None = None,
    global_average_pooling: bool = False,
    dtype: torch.dtype = torch.float32,
) -> ControlNetModel:
    """A ControlNet from a diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors,
    or .bin through torch.load(weights_only=True)) or an original single file (.safetensors; .pth/.ckpt/.pt
    through torch.load(weights_only=True) only). `base`: the UNet config it will steer; a ControlNet for another
    base model is refused (CheckpointError, one line). `global_average_pooling`: for original files of the
    "shuffle" ControlNet, whose yaml sets it (a diffusers folder says so in config.json)."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} is not a diffusers ControlNetModel folder: config.json is missing")
        config = _convert_config(controlnet_config_from_diffusers, config_file)
        weights, file = _read_component_weights(path)
        where = str(file)
        try:
            state = controlnet_state_dict_from_diffusers(weights, config)
        except CheckpointError as e:
            raise CheckpointError(f"{file}: {e}") from None
    else:
        raw = read_state_dict(path)
        if "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
            raw = raw["state_dict"]
        where = str(path)
        state = original_controlnet_state_dict(raw, where)
        config = infer_controlnet_config(state, where=where, base=base, global_average_pooling=global_average_pooling)
    if base is not None:
        _check_fits(config, base, str(path))
    with parameters_on_meta():  # the checkpoint's tensors become the weights: no random init, no second copy
        model = ControlNetModel(config)
    load_strict(model, dict(state), where=where, assign=True)
    check_materialised(model, where)
    return model.to(dtype).eval()


__all__ = [
    "controlnet_config_from_diffusers",
    "controlnet_key_map",
    "controlnet_parameter_shapes",
    "controlnet_state_dict_from_diffusers",
    "controlnet_state_dict_to_diffusers",
    "infer_controlnet_config",
    "load_controlnet",
    "original_controlnet_state_dict",
]
