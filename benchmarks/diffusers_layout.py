"""An ldm-rt model folder (the shipped default model) rewritten as a diffusers StableDiffusionPipeline folder,
so diffusers and Optimum can be measured on the same weights.

Weights go through ldm-rt's key maps (reference/keymap_unet.py, keymap_autoencoder.py) into diffusers'
own classes with strict loading, so a wrong map fails here, naming the key. The word-level tokenizer.json
is self-contained (vocabulary, padding, truncation, bos/eos template), so transformers'
PreTrainedTokenizerFast reads it as it is. The scheduler is DDIM with the model's schedule.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ldm_rt.reference.configs import UNetConfig
from ldm_rt.runtime.tokenizer import PromptTokenizer


def unet_config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """UNet2DConditionModel arguments of the same architecture (the inverse of keymap_unet.unet_config_from_diffusers)."""
    widths = [config.model_channels * m for m in config.channel_mult]
    attn = [2**i in config.attention_resolutions for i in range(len(widths))]
    # diffusers' `attention_head_dim` is the number of heads per level (see keymap_unet._heads).
    heads = [w // config.num_head_channels for w in widths] if config.num_head_channels > 0 else config.num_heads
    out: dict[str, Any] = {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": widths,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "layers_per_block": config.num_res_blocks,
        "attention_head_dim": heads,
        "cross_attention_dim": config.context_dim,
        "transformer_layers_per_block": config.transformer_depth,
        "use_linear_projection": config.use_linear_in_transformer,
        "upcast_attention": config.upcast_attention,
        "norm_num_groups": config.norm_num_groups,
    }
    if config.num_classes is not None:
        out["num_class_embeds"] = config.num_classes
    return out


def write_tokenizer_folder(tokenizer: PromptTokenizer, folder: Path) -> Path:
    """A diffusers `tokenizer/` folder holding a self-contained tokenizer.json (vocabulary, padding, truncation,
    bos/eos template): transformers' PreTrainedTokenizerFast and ldm-rt's loader both read it as it is."""
    from tokenizers import Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(folder / "tokenizer.json")
    vocab = Tokenizer.from_str(tokenizer.to_str())
    specials = {name: vocab.id_to_token(i) for name, i in
                (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id))}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "model_max_length": tokenizer.max_length, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return folder


def ldm_rt_to_diffusers(model_folder: Path, out: Path) -> Path:
    """Write `out` as a diffusers folder holding the weights of the ldm-rt model folder `model_folder`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    from ldm_rt.reference.keymap_autoencoder import autoencoder_config_to_diffusers, autoencoder_state_dict_to_diffusers
    from ldm_rt.reference.keymap_unet import unet_state_dict_to_diffusers
    from ldm_rt.reference.model_folder import read_model_json

    config, _ = read_model_json(model_folder)
    if config.text_encoder is None or config.autoencoder.kind != "kl":
        raise ValueError(f"{model_folder}: only text-conditional models with a KL autoencoder have a StableDiffusionPipeline equivalent")
    out.mkdir(parents=True, exist_ok=True)

    unet = UNet2DConditionModel(**unet_config_to_diffusers(config.unet))
    unet.load_state_dict(unet_state_dict_to_diffusers(load_file(str(model_folder / "unet.safetensors")), config.unet), strict=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)

    vae = AutoencoderKL(**autoencoder_config_to_diffusers(config.autoencoder), scaling_factor=float(config.scale_factor))
    vae.load_state_dict(autoencoder_state_dict_to_diffusers(load_file(str(model_folder / "autoencoder.safetensors")), config.autoencoder), strict=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)

    # Canonical `text_model.*` keys, which transformers 4.x and 5.x both load.
    (out / "text_encoder").mkdir(exist_ok=True)
    config.text_encoder.to_transformers().save_pretrained(out / "text_encoder")
    shutil.copyfile(model_folder / "text_encoder.safetensors", out / "text_encoder" / "model.safetensors")

    write_tokenizer_folder(PromptTokenizer.from_file(model_folder / "tokenizer.json"), out / "tokenizer")

    schedule = json.loads((model_folder / "scheduler_config.json").read_text())
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps({**schedule, "_class_name": "DDIMScheduler"}, indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1", "feature_extractor": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }, indent=2))
    return out
