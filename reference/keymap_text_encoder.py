"""Single-file checkpoint layouts of the text encoder -> transformers' CLIPTextModel keys.

- SD v1 (`FrozenCLIPEmbedder`): `cond_stage_model.transformer.` + the Hugging Face keys; only the
  prefix goes.
- SD v2 (`FrozenOpenCLIPEmbedder`, OpenCLIP ViT-H/14): `cond_stage_model.model.` + OpenCLIP keys
  (`transformer.resblocks.N.attn.in_proj_weight`, `ln_1`, `mlp.c_fc`, `ln_final`, ...). SD v2 conditions
  on the penultimate layer's output passed through `ln_final`, so the last resblock is dropped and
  `ln_final` becomes `final_layer_norm` (diffusers does the same and sets num_hidden_layers=23). The map
  follows diffusers' `convert_open_clip_checkpoint` (`textenc_conversion_lst`,
  `textenc_transformer_conversion_lst`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .checkpoint_errors import CheckpointError, check_state_dict
from .configs import TextEncoderConfig
from .text_encoder import TextEncoder

SD_V1_PREFIX = "cond_stage_model.transformer."
SD_V2_PREFIX = "cond_stage_model.model."
# Buffers some checkpoints carry that the model recomputes (or never needs).
IGNORED_HF_KEYS = ("text_model.embeddings.position_ids",)
IGNORED_OPENCLIP_KEYS = ("text_projection", "logit_scale", "attn_mask")
# OpenCLIP builds its text towers with 64-wide heads (heads = width // 64); shapes cannot tell heads apart.
OPENCLIP_HEAD_WIDTH = 64

OPENCLIP_GLOBALS = {  # OpenCLIP -> HF
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
OPENCLIP_LAYER = {  # inside resblock N -> inside text_model.encoder.layers.N (in_proj is split separately)
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# OpenCLIP's fused in-projection stacks q, k, v along the output dimension, in this order.
IN_PROJ = {"weight": "attn.in_proj_weight", "bias": "attn.in_proj_bias"}
QKV = ("q_proj", "k_proj", "v_proj")
RESBLOCK = "transformer.resblocks."


def text_encoder_parameter_shapes(config: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """TextEncoder key -> shape, from the model built on the meta device."""
    with torch.device("meta"):
        model = TextEncoder(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def text_encoder_state_dict_from_sd_v1(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD v1 single-file state dict (or its text-encoder part) -> TextEncoder keys."""
    out = {k[len(SD_V1_PREFIX):]: v for k, v in sd.items() if k.startswith(SD_V1_PREFIX)}
    if not out:
        raise CheckpointError(f"no key starts with {SD_V1_PREFIX!r}: this is not an SD v1 checkpoint with a CLIP text encoder")
    return {k: v for k, v in out.items() if k not in IGNORED_HF_KEYS}


def _strip_openclip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith(SD_V2_PREFIX) for k in sd):
        return {k[len(SD_V2_PREFIX):]: v for k, v in sd.items() if k.startswith(SD_V2_PREFIX)}
    return dict(sd)


def _num_resblocks(keys: list[str]) -> int:
    indices = {int(k[len(RESBLOCK):].split(".")[0]) for k in keys if k.startswith(RESBLOCK)}
    if not indices:
        raise CheckpointError(f"no {RESBLOCK}N keys: this is not an OpenCLIP text tower")
    return max(indices) + 1


def text_encoder_state_dict_from_openclip(
    sd: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    drop_last_layer: bool = True,
) -> tuple[dict[str, torch.Tensor], TextEncoderConfig]:
    """OpenCLIP text tower (SD v2 single file, with or without `cond_stage_model.model.`) -> (TextEncoder
    state dict, TextEncoderConfig inferred from shapes).

    drop_last_layer: SD v2 conditions on the penultimate layer (see the module docstring).
    num_attention_heads: not visible in shapes; defaults to hidden_size // 64 as OpenCLIP builds it.
    """
    sd = _strip_openclip_prefix(sd)
    layers = _num_resblocks(list(sd))
    kept = layers - 1 if drop_last_layer else layers
    missing = [k for k in OPENCLIP_GLOBALS if k not in sd]
    for n in range(layers):
        missing += [f"{RESBLOCK}{n}.{k}" for k in (*OPENCLIP_LAYER, *IN_PROJ.values()) if f"{RESBLOCK}{n}.{k}" not in sd]
    if missing:
        raise CheckpointError(f"OpenCLIP text encoder: missing {len(missing)} key(s): {', '.join(missing[:10])}")

    vocab_size, hidden = sd["token_embedding.weight"].shape
    heads = num_attention_heads or hidden // OPENCLIP_HEAD_WIDTH
    if hidden % heads or heads < 1:
        raise CheckpointError(f"OpenCLIP text encoder: hidden size {hidden} does not split into {heads} heads; pass num_attention_heads")
    projection = sd.get("text_projection")
    config = TextEncoderConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=sd[f"{RESBLOCK}0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=kept,
        num_attention_heads=heads,
        max_position_embeddings=sd["positional_embedding"].shape[0],
        hidden_act="gelu",  # OpenCLIP uses exact GELU, OpenAI CLIP quick_gelu
        # CLIP's BPE vocabulary ends with <|startoftext|>, <|endoftext|>; SD v2 pads with "!" (id 0).
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=0,
        projection_dim=projection.shape[1] if projection is not None else TextEncoderConfig.projection_dim,
    )

    out = {theirs: sd[ours] for ours, theirs in OPENCLIP_GLOBALS.items()}
    for n in range(kept):
        src, dst = f"{RESBLOCK}{n}.", f"text_model.encoder.layers.{n}."
        out.update({dst + theirs: sd[src + ours] for ours, theirs in OPENCLIP_LAYER.items()})
        for param, fused in IN_PROJ.items():
            for name, part in zip(QKV, torch.chunk(sd[src + fused], 3, dim=0)):
                out[f"{dst}self_attn.{name}.{param}"] = part
    used = set(OPENCLIP_GLOBALS) | {
        f"{RESBLOCK}{n}.{k}" for n in range(layers) for k in (*OPENCLIP_LAYER, *IN_PROJ.values())
    }
    unexpected = sorted(k for k in sd if k not in used and k not in IGNORED_OPENCLIP_KEYS)
    if unexpected:
        raise CheckpointError(f"OpenCLIP text encoder: {len(unexpected)} unexpected key(s): {', '.join(unexpected[:10])}")
    check_state_dict(text_encoder_parameter_shapes(config), out, "OpenCLIP text encoder")
    return out, config


def text_encoder_state_dict_to_openclip(
    sd: Mapping[str, torch.Tensor], config: TextEncoderConfig
) -> dict[str, torch.Tensor]:
    """TextEncoder keys -> OpenCLIP text-tower keys (no prefix, no text_projection), every layer kept.
    Used to build fixtures; `from_openclip(..., drop_last_layer=False)` inverts it exactly."""
    check_state_dict(text_encoder_parameter_shapes(config), sd, "text encoder")
    out = {ours: sd[theirs] for ours, theirs in OPENCLIP_GLOBALS.items()}
    for n in range(config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{n}.", f"{RESBLOCK}{n}."
        out.update({dst + ours: sd[src + theirs] for ours, theirs in OPENCLIP_LAYER.items()})
        for param, fused in IN_PROJ.items():
            out[dst + fused] = torch.cat([sd[f"{src}self_attn.{name}.{param}"] for name in QKV], dim=0)
    return out
