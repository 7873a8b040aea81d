"""Tiny random Stable-Diffusion-shaped models for tests (export, runtime, benchmark and reference tests).

Everything is built locally in a folder the caller gives: nothing is downloaded. diffusers and
transformers are used here only as test oracles to write the diffusers-layout folder; the
single-file and ldm-rt layouts are then derived from it with ldm-rt's own key maps.

    make_tiny_diffusers_sd(path, variant="v1" | "v2" | "inpaint")  # diffusers StableDiffusionPipeline folder
    make_tiny_single_file(diffusers_path, out_file, variant)         # original SD single file (.safetensors/.ckpt)
    make_tiny_ldm_rt_model(path)                                     # ldm-rt model folder (word-level tokenizer)
    make_tiny_sdxl(path, variant="base" | "refiner" | "turbo")       # diffusers SDXL folder, saved by its pipeline
    make_tiny_sdxl_single_file(sdxl_path, out_file)                  # sgm-layout SDXL single file (.safetensors)
    make_tiny_controlnet(path, base)                                 # diffusers ControlNetModel folder for a tiny SD
    make_tiny_controlnet_single_file(controlnet_path, out_file)      # original ControlNet file (.safetensors/.pth)

The random weights are drawn with a wider spread than a fresh init (norms included) and the
conditioning paths are amplified, so that a change of prompt, guidance, scheduler or step count moves the
final 8-bit image far more than any parity tolerance: a parity test on these models is sensitive.

Session-scoped fixtures (`tiny_sd_v1`, `tiny_sd_v2`, `tiny_sd_inpaint`, `tiny_ldm_rt_model`, `tiny_sdxl_base`,
`tiny_sdxl_refiner`, `tiny_sdxl_turbo`, ...) are at the end; register them for the whole suite with `pytest_plugins = ["tiny_models"]` in tests/conftest.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ldm_rt.runtime.schedulers import sd_scheduler_config as runtime_sd_scheduler_config

# Image size the tiny models are built for (the VAE halves it once, the UNet once more): any multiple of 4 works.
TINY_IMAGE_SIZE = 32
TINY_CONTEXT_DIM = 32  # CLIP hidden size == UNet cross_attention_dim
TINY_TEXT_HEADS = 2  # hidden 32 -> head width 16
TINY_MAX_LENGTH = 77  # CLIP context length, as in SD
# SD v1 fixes 8 attention heads; SD v2 fixes the head width (64 in the real model). The tiny v2 UNet
# (widths 32, 64) uses width-16 heads, which `reference/checkpoints.py` infers for models this narrow.
TINY_V1_UNET_HEADS = 8
TINY_V2_UNET_HEAD_WIDTH = 16
SCALE_FACTOR = 0.18215
ATTN2_GAIN = 4.0  # cross-attention value/output weights scaled up so the prompt visibly matters
VARIANTS = ("v1", "v2", "inpaint")

# Words with a BPE merge chain in the tiny vocabulary; anything else still tokenises, byte by byte.
TINY_WORDS = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "painting", "portrait", "cat", "dog", "horse",
    "astronaut", "riding", "red", "blue", "green", "car", "house", "tree", "mountain", "lake", "sunset", "city",
    "night", "blurry", "ugly", "low", "quality", "bad", "oil", "watercolor", "detailed", "sky", "castle",
)


# ---- tokenizer files -------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary in CLIP's order: 256 byte symbols, the same with "</w>", the merge
    results of TINY_WORDS, then <|startoftext|> and <|endoftext|> (the last two ids, as in CLIP)."""
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        if len(word) < 2:
            continue
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            if (current, part) not in merges:
                merges.append((current, part))
            current += part
            vocab.setdefault(current, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_tiny_clip_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """A diffusers `tokenizer/` folder in the layout SD repositories ship (vocab.json, merges.txt,
    tokenizer_config.json, special_tokens_map.json). SD v1 pads with <|endoftext|>, SD v2 with "!"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {**specials, "model_max_length": TINY_MAX_LENGTH, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


# ---- random weights --------------------------------------------------------------------------------
def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter: weights N(0, 1 / fan_in), norm scales 1 + N(0, 0.2^2), biases
    N(0, 0.1^2), embeddings N(0, 1). A fresh init leaves norms at (1, 0) and many biases at 0, which
    would let a parity test pass with those parameters wired wrongly."""
    with torch.no_grad():
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if isinstance(sub, torch.nn.Embedding):  # token / position / class embeddings
                    p.copy_(torch.randn(p.shape, generator=generator))
                elif isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name == "weight":
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
                elif p.ndim >= 2:
                    fan_in = math.prod(p.shape[1:])
                    p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def _strengthen_unet(unet: torch.nn.Module) -> None:
    """Make the prompt and the timestep matter: in a random UNet the cross-attention values and the
    time embedding are small next to the residual stream, so a new prompt barely moves the image.
    Works on both layouts (diffusers: time_embedding.*, conv_out; ours: time_embed.*, out.2)."""
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".attn2.to_v." in name or ".attn2.to_out.0." in name:
                p.mul_(ATTN2_GAIN)
            elif name.startswith(("time_embedding.", "time_embed.")) and name.endswith("weight"):
                p.mul_(2.0)
            elif name in ("conv_out.weight", "out.2.weight"):
                # Keep eps of order 1: the sampler divides by sqrt(alpha_bar) ~ 0.07 at the first steps.
                p.mul_(0.5)


def _diffusers_unet_config(variant: str) -> dict:
    config = dict(
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=9 if variant == "inpaint" else 4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TINY_CONTEXT_DIM,
        norm_num_groups=32,
    )
    if variant == "v2":
        # diffusers reads attention_head_dim as heads per level: width / head width.
        config.update(
            attention_head_dim=[32 // TINY_V2_UNET_HEAD_WIDTH, 64 // TINY_V2_UNET_HEAD_WIDTH],
            use_linear_projection=True,
            upcast_attention=True,
        )
    else:
        config.update(attention_head_dim=TINY_V1_UNET_HEADS)
    return config


def _text_config(variant: str, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_CONTEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=3 if variant == "v2" else 2,
        num_attention_heads=TINY_TEXT_HEADS,
        max_position_embeddings=TINY_MAX_LENGTH,
        hidden_act="gelu" if variant == "v2" else "quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _canonical_text_keys(file: Path) -> None:
    """transformers 5 saves CLIPTextModel without the `text_model.` level; real SD folders (written by
    4.x) have it, and both transformers versions read it. Write what the real folders hold."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(file))
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}, str(file), metadata={"format": "pt"})


def sd_scheduler_config(variant: str, prediction_type: str = "epsilon") -> dict:
    """The scheduler_config.json SD v1 (PNDM) / v2 (DDIM) ship, as diffusers writes it."""
    return runtime_sd_scheduler_config(
        _class_name="DDIMScheduler" if variant == "v2" else "PNDMScheduler", _diffusers_version="0.42.1", prediction_type=prediction_type
    )


def make_tiny_diffusers_sd(
    path: str | Path, variant: str = "v1", seed: int = 0, prediction_type: str = "epsilon"
) -> Path:
    """Write a diffusers-layout Stable Diffusion folder with random weights and return its path.

    variant "v1": OpenAI-CLIP-style text encoder (quick_gelu), 8 heads, conv proj_in, PNDM config;
    "v2": OpenCLIP-style (gelu, 3 layers), fixed head width, linear proj_in, DDIM config, "!" padding;
    "inpaint": v1 with a 9-channel UNet (latent + mask + masked-image latent), an Inpaint pipeline.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    unet = UNet2DConditionModel(**_diffusers_unet_config(variant))
    _randomise(unet, generator)
    _strengthen_unet(unet)
    unet.save_pretrained(path / "unet", safe_serialization=True)

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_IMAGE_SIZE,
        scaling_factor=SCALE_FACTOR,
    )
    _randomise(vae, generator)  # fan-in scaling spreads decoded pixels over about [-1, 1]: few clipped values
    vae.save_pretrained(path / "vae", safe_serialization=True)

    pad_token = "!" if variant == "v2" else "<|endoftext|>"
    write_tiny_clip_tokenizer(path / "tokenizer", pad_token=pad_token)
    vocab, _ = tiny_clip_vocab()
    config = _text_config(variant, len(vocab), vocab[pad_token], vocab["<|startoftext|>"], vocab["<|endoftext|>"])
    text_encoder = CLIPTextModel(config)
    _randomise(text_encoder, generator)
    text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    _canonical_text_keys(path / "text_encoder" / "model.safetensors")

    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(sd_scheduler_config(variant, prediction_type), indent=2)
    )
    pipeline = "StableDiffusionInpaintPipeline" if variant == "inpaint" else "StableDiffusionPipeline"
    scheduler_class = sd_scheduler_config(variant)["_class_name"]
    model_index = {
        "_class_name": pipeline,
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return path


def _load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (file,) = sorted(folder.glob("*.safetensors"))
    return load_file(str(file))


def single_file_state_dict(diffusers_path: str | Path, variant: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """The original SD single-file state dict of a tiny diffusers folder, converted with ldm-rt's key maps.

    v2 text encoders are written in OpenCLIP layout with one extra random last block (SD v2 uses the
    penultimate layer, so the loader must drop it), as the real SD v2 files are. Also adds the DDPM
    buffers and EMA bookkeeping real files carry, which a loader must skip.
    """
    from ldm_rt.reference.keymap_autoencoder import autoencoder_config_from_diffusers, autoencoder_state_dict_from_diffusers
    from ldm_rt.reference.keymap_unet import unet_config_from_diffusers, unet_state_dict_from_diffusers

    src = Path(diffusers_path)
    unet_config = unet_config_from_diffusers(json.loads((src / "unet" / "config.json").read_text()))
    vae_config = autoencoder_config_from_diffusers(json.loads((src / "vae" / "config.json").read_text()))
    out: dict[str, torch.Tensor] = {}
    for k, v in unet_state_dict_from_diffusers(_load_safetensors(src / "unet"), unet_config).items():
        out["model.diffusion_model." + k] = v
    for k, v in autoencoder_state_dict_from_diffusers(_load_safetensors(src / "vae"), vae_config).items():
        out["first_stage_model." + k] = v
    text = _load_safetensors(src / "text_encoder")
    if variant == "v2":
        from ldm_rt.reference.keymap_text_encoder import text_encoder_state_dict_to_openclip
        from ldm_rt.reference.text_encoder import text_encoder_config_from_transformers

        text_config = text_encoder_config_from_transformers(json.loads((src / "text_encoder" / "config.json").read_text()))
        openclip = text_encoder_state_dict_to_openclip(text, text_config)
        # SD v2 conditions on the penultimate layer: append a random last block the loader must drop.
        generator = torch.Generator().manual_seed(seed)
        last = f"transformer.resblocks.{text_config.num_hidden_layers}."
        for k, v in list(openclip.items()):
            if k.startswith("transformer.resblocks.0."):
                openclip[last + k[len("transformer.resblocks.0."):]] = torch.randn(v.shape, generator=generator) * 0.1
        openclip["text_projection"] = torch.randn(text_config.hidden_size, text_config.projection_dim, generator=generator)
        openclip["logit_scale"] = torch.tensor(4.6052)
        out.update({"cond_stage_model.model." + k: v for k, v in openclip.items()})
    else:
        out.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
        positions = text["text_model.embeddings.position_embedding.weight"].shape[0]
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    out["betas"] = betas.float()
    out["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return {k: v.contiguous() for k, v in out.items()}


def make_tiny_single_file(diffusers_path: str | Path, out_file: str | Path, variant: str = "v1") -> Path:
    """Convert a tiny diffusers folder to an original-layout SD single file: `.safetensors`, or `.ckpt`
    (a torch.save of {"state_dict": ...} with tensors only, loadable with weights_only=True)."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    sd = single_file_state_dict(diffusers_path, variant)
    if out_file.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(out_file))
    elif out_file.suffix == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 0}, out_file)
    else:
        raise ValueError(f"out_file must end in .safetensors or .ckpt, got {out_file.name}")
    return out_file


def make_tiny_ldm_rt_model(path: str | Path, seed: int = 0, max_length: int = 16) -> Path:
    """An ldm-rt model folder: a random LatentDiffusion (UNet 32/64, KL autoencoder 32/64, 2-layer text
    encoder of width 32) with a word-level tokenizer over TINY_WORDS, the paper's jointly trained tau_theta."""
    from ldm_rt.reference.configs import AutoencoderConfig, LDMConfig, TextEncoderConfig, UNetConfig
    from ldm_rt.reference.ldm import LatentDiffusion
    from ldm_rt.reference.model_folder import save_model_folder
    from ldm_rt.runtime.tokenizer import PromptTokenizer

    tokenizer = PromptTokenizer.word_level(list(TINY_WORDS), max_length=max_length)
    config = LDMConfig(
        unet=UNetConfig(
            model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
            num_heads=4, context_dim=TINY_CONTEXT_DIM,
        ),
        autoencoder=AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=TINY_IMAGE_SIZE),
        text_encoder=TextEncoderConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=TINY_CONTEXT_DIM, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=TINY_TEXT_HEADS, max_position_embeddings=max_length,
            hidden_act="gelu", bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        ),
        scale_factor=SCALE_FACTOR,
    )
    model = LatentDiffusion(config)
    generator = torch.Generator().manual_seed(seed)
    _randomise(model, generator)
    _strengthen_unet(model.unet)
    save_model_folder(path, model, tokenizer, sd_scheduler_config("v1"), info={"origin": "tests/tiny_models.py"})
    return Path(path)


# ---- SDXL ------------------------------------------------------------------------------------------
# Widths of the tiny SDXL's two encoders; the base UNet cross-attends to both (32 + 48), a refiner to the second.
TINY_SDXL_TEXT_DIM = 32
TINY_SDXL_TEXT_2_DIM = 48
TINY_SDXL_POOLED = 16  # text_encoder_2's projection_dim: the UNet's text_embeds
TINY_SDXL_TIME_DIM = 8  # addition_time_embed_dim: width of each time id's Fourier embedding
SDXL_SCALE_FACTOR = 0.13025
SDXL_VARIANTS = ("base", "refiner", "turbo")
ADD_EMBEDDING_GAIN = 4.0  # add_embedding (pooled text + time ids) scaled up so the micro-conditioning matters (see make_tiny_sdxl)


def _tiny_sdxl_unet_config(refiner: bool) -> dict:
    """diffusers UNet2DConditionModel kwargs. The base: SDXL's layout in miniature (no attention at the first
    level, per-level transformer depth 1/2 at the attention levels, 6 time ids); the refiner: attention only
    at the middle two of four levels, depth 2 everywhere, 5 time ids, a context of text_encoder_2's width.
    Heads are as wide as `reference/checkpoints.py` infers for a single file this narrow (min(64, width/2) at
    the narrowest attention level). 32 GroupNorm groups, as SDXL has (a single file does not show them), over
    at least 64 channels: with one channel per group, the norm after each ResBlock's time-embedding add would
    cancel that per-channel constant, and with it the time ids."""
    if refiner:
        widths, down = (64, 64, 128, 128), ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
        up, heads, depth, n_ids = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), (2, 2, 4, 4), 2, 5
        context = TINY_SDXL_TEXT_2_DIM
    else:
        widths, down = (64, 128, 128), ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        up, heads, depth, n_ids = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), (1, 2, 2), (1, 1, 2), 6
        context = TINY_SDXL_TEXT_DIM + TINY_SDXL_TEXT_2_DIM
    return dict(
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=widths,
        layers_per_block=1,
        norm_num_groups=32,
        attention_head_dim=heads,  # diffusers' name for heads per level
        transformer_layers_per_block=depth,
        cross_attention_dim=context,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=TINY_SDXL_POOLED + n_ids * TINY_SDXL_TIME_DIM,
    )


def sdxl_scheduler_config(turbo: bool = False) -> dict:
    """The scheduler_config.json SDXL base/refiner ship (Euler), or SDXL-Turbo's (Euler ancestral, trailing)."""
    if turbo:
        return runtime_sd_scheduler_config(
            _class_name="EulerAncestralDiscreteScheduler", _diffusers_version="0.42.1", timestep_spacing="trailing"
        )
    return runtime_sd_scheduler_config(
        _class_name="EulerDiscreteScheduler", _diffusers_version="0.42.1", interpolation_type="linear", use_karras_sigmas=False
    )


def make_tiny_sdxl(path: str | Path, variant: str = "base", seed: int = 0) -> Path:
    """Write a diffusers-layout SDXL folder with random weights, saved by diffusers' own pipeline, and return it.

    "base" (StableDiffusionXLPipeline): tokenizer/ (pads with <|endoftext|>) + text_encoder/ (CLIPTextModel,
    quick_gelu), tokenizer_2/ (pads with "!") + text_encoder_2/ (CLIPTextModelWithProjection, gelu), a text_time
    UNet, a VAE with SDXL's scale factor, Euler; force_zeros_for_empty_prompt true, as SDXL ships.
    "refiner" (StableDiffusionXLImg2ImgPipeline): only tokenizer_2/ + text_encoder_2/, a 5-time-id UNet,
    requires_aesthetics_score true, force_zeros_for_empty_prompt false, as the refiner ships.
    "turbo": the base with SDXL-Turbo's scheduler (Euler ancestral, trailing spacing).
    """
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if variant not in SDXL_VARIANTS:
        raise ValueError(f"variant must be one of {SDXL_VARIANTS}, got {variant!r}")
    refiner = variant == "refiner"
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    unet = UNet2DConditionModel(**_tiny_sdxl_unet_config(refiner))
    _randomise(unet, generator)
    _strengthen_unet(unet)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.startswith("add_embedding.") and name.endswith("weight"):
                p.mul_(ADD_EMBEDDING_GAIN)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        sample_size=TINY_IMAGE_SIZE, scaling_factor=SDXL_SCALE_FACTOR,
    )  # fmt: skip
    _randomise(vae, generator)

    vocab, _ = tiny_clip_vocab()
    tokenizers = {}
    pads = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
    for name, pad in pads.items():
        tokenizers[name] = CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(path / name, pad_token=pad)))
    common = dict(
        vocab_size=len(vocab), intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=TINY_MAX_LENGTH, layer_norm_eps=1e-5, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
    )  # fmt: skip
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=TINY_SDXL_TEXT_2_DIM, hidden_act="gelu", projection_dim=TINY_SDXL_POOLED, pad_token_id=vocab["!"], **common,
    ))  # fmt: skip
    _randomise(text_encoder_2, generator)
    if refiner:
        text_encoder, tokenizer = None, None
    else:
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=TINY_SDXL_TEXT_DIM, hidden_act="quick_gelu", pad_token_id=vocab["<|endoftext|>"], **common,
        ))  # fmt: skip
        _randomise(text_encoder, generator)
        tokenizer = tokenizers["tokenizer"]
    scheduler_cls = EulerAncestralDiscreteScheduler if variant == "turbo" else EulerDiscreteScheduler
    scheduler = scheduler_cls.from_config(sdxl_scheduler_config(turbo=variant == "turbo"))
    parts = dict(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizers["tokenizer_2"], unet=unet, scheduler=scheduler,
    )  # fmt: skip
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    else:
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(path), safe_serialization=True)
    # transformers 5 writes a tokenizer.json only; SDXL repositories ship vocab.json + merges.txt: write those.
    for name, pad in pads.items():
        shutil.rmtree(path / name)
        if not (refiner and name == "tokenizer"):
            write_tiny_clip_tokenizer(path / name, pad_token=pad)
    if not refiner:
        _canonical_text_keys(path / "text_encoder" / "model.safetensors")
    return path


def sdxl_single_file_state_dict(diffusers_path: str | Path) -> dict[str, torch.Tensor]:
    """The sgm single-file state dict of a tiny SDXL folder, converted with ldm-rt's key maps: UNet and VAE
    in the original layout, `conditioner.embedders.0.transformer.` (CLIP, Hugging Face keys) and
    `conditioner.embedders.1.model.` (OpenCLIP: fused in_proj, (width, proj) projection) for a base,
    `conditioner.embedders.0.model.` alone for a refiner; plus a DDPM buffer a loader must skip."""
    from transformers import CLIPTextModelWithProjection

    from ldm_rt.reference.keymap_autoencoder import autoencoder_config_from_diffusers, autoencoder_state_dict_from_diffusers
    from ldm_rt.reference.keymap_unet import unet_config_from_diffusers, unet_state_dict_from_diffusers
    from ldm_rt.reference.text_encoder_sdxl import (
        SDXL_EMBEDDER_0_PREFIX,
        SDXL_EMBEDDER_1_PREFIX,
        SDXL_REFINER_EMBEDDER_PREFIX,
        sdxl_text_encoder_2_state_dict_to_single_file,
    )

    src = Path(diffusers_path)
    unet_config = unet_config_from_diffusers(json.loads((src / "unet" / "config.json").read_text()))
    vae_config = autoencoder_config_from_diffusers(json.loads((src / "vae" / "config.json").read_text()))
    out: dict[str, torch.Tensor] = {}
    for k, v in unet_state_dict_from_diffusers(_load_safetensors(src / "unet"), unet_config).items():
        out["model.diffusion_model." + k] = v
    for k, v in autoencoder_state_dict_from_diffusers(_load_safetensors(src / "vae"), vae_config).items():
        out["first_stage_model." + k] = v
    refiner = not (src / "text_encoder").is_dir()
    if not refiner:
        out.update({SDXL_EMBEDDER_0_PREFIX + k: v for k, v in _load_safetensors(src / "text_encoder").items()})
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(str(src / "text_encoder_2"))
    out.update(sdxl_text_encoder_2_state_dict_to_single_file(text_encoder_2, SDXL_REFINER_EMBEDDER_PREFIX if refiner else SDXL_EMBEDDER_1_PREFIX))
    out["alphas_cumprod"] = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    return {k: v.contiguous() for k, v in out.items()}


def make_tiny_sdxl_single_file(diffusers_path: str | Path, out_file: str | Path) -> Path:
    """An sgm-layout SDXL single file (.safetensors) of a tiny SDXL folder (base or refiner)."""
    from safetensors.torch import save_file

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(sdxl_single_file_state_dict(diffusers_path), str(out_file))
    return out_file


# ---- ControlNet ------------------------------------------------------------------------------------
# E(c)'s widths: one stride-2 step, as the tiny VAE's, so a TINY_IMAGE_SIZE control image meets the latent's size.
TINY_HINT_BLOCK_CHANNELS = (16, 32)
# E(c)'s last convolution scaled up: a new control image then moves the UNet's eps by about 25 % (unscaled: 3 %).
HINT_GAIN = 8.0


def make_tiny_controlnet(
    path: str | Path, base: str | Path, seed: int = 0, hint_block_channels: tuple[int, ...] = TINY_HINT_BLOCK_CHANNELS
) -> Path:
    """A diffusers ControlNetModel folder for the tiny SD folder `base`, made as users make one
    (ControlNetModel.from_unet), then every weight redrawn: the zero convolutions too, or a parity test on
    them would compare zeros."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(base) / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_block_channels)
    generator = torch.Generator().manual_seed(1000 + seed)
    _randomise(controlnet, generator)
    _strengthen_unet(controlnet)
    with torch.no_grad():
        controlnet.controlnet_cond_embedding.conv_out.weight.mul_(HINT_GAIN)
    controlnet.save_pretrained(path, safe_serialization=True)
    return Path(path)


def controlnet_single_file_state_dict(controlnet_path: str | Path) -> dict[str, torch.Tensor]:
    """The original (`control_model.`-prefixed cldm) state dict of a tiny diffusers ControlNet folder, converted
    with ldm-rt's key map (tests cross-check it against diffusers' own converter)."""
    from ldm_rt.reference.keymap_controlnet import ORIGINAL_PREFIX, controlnet_config_from_diffusers, controlnet_state_dict_from_diffusers

    folder = Path(controlnet_path)
    config = controlnet_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    ours = controlnet_state_dict_from_diffusers(_load_safetensors(folder), config)
    return {ORIGINAL_PREFIX + k: v.contiguous() for k, v in ours.items()}


def make_tiny_controlnet_single_file(controlnet_path: str | Path, out_file: str | Path) -> Path:
    """An original-layout ControlNet file: `.safetensors`, or `.pth` (a torch.save of the tensors only, loadable
    with weights_only=True, as lllyasviel's control_v11*.pth)."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    sd = controlnet_single_file_state_dict(controlnet_path)
    if out_file.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(out_file))
    elif out_file.suffix == ".pth":
        torch.save(sd, out_file)
    else:
        raise ValueError(f"out_file must end in .safetensors or .pth, got {out_file.name}")
    return out_file


# ---- session-scoped fixtures (register with pytest_plugins = ["tiny_models"]) ------------------------
@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models are dominated by per-op overhead: one intra-op thread is as fast, and does not collapse (OpenMP
    spin-waits) when other processes share the two cores. A test file opts in with
    `pytestmark = pytest.mark.usefixtures("torch_one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd_v1(tmp_path_factory) -> Path:
    return make_tiny_diffusers_sd(tmp_path_factory.mktemp("tiny_sd_v1"), "v1")


@pytest.fixture(scope="session")
def tiny_sd_v2(tmp_path_factory) -> Path:
    """SD-v2-shaped, v-prediction (as SD 2.x 768-v)."""
    return make_tiny_diffusers_sd(tmp_path_factory.mktemp("tiny_sd_v2"), "v2", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sd_inpaint(tmp_path_factory) -> Path:
    return make_tiny_diffusers_sd(tmp_path_factory.mktemp("tiny_sd_inpaint"), "inpaint")


@pytest.fixture(scope="session")
def tiny_single_file_v1(tiny_sd_v1, tmp_path_factory) -> Path:
    return make_tiny_single_file(tiny_sd_v1, tmp_path_factory.mktemp("single_v1") / "tiny-v1.safetensors", "v1")


@pytest.fixture(scope="session")
def tiny_single_file_v2(tiny_sd_v2, tmp_path_factory) -> Path:
    return make_tiny_single_file(tiny_sd_v2, tmp_path_factory.mktemp("single_v2") / "tiny-v2.safetensors", "v2")


@pytest.fixture(scope="session")
def tiny_ldm_rt_model(tmp_path_factory) -> Path:
    return make_tiny_ldm_rt_model(tmp_path_factory.mktemp("tiny_ldm_rt") / "model")


@pytest.fixture(scope="session")
def tiny_sdxl_base(tmp_path_factory) -> Path:
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl_base"), "base")


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory) -> Path:
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl_refiner"), "refiner", seed=1)


@pytest.fixture(scope="session")
def tiny_sdxl_turbo(tmp_path_factory) -> Path:
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl_turbo"), "turbo", seed=2)


@pytest.fixture(scope="session")
def tiny_controlnet_v1(tiny_sd_v1, tmp_path_factory) -> Path:
    return make_tiny_controlnet(tmp_path_factory.mktemp("tiny_controlnet_v1") / "controlnet", tiny_sd_v1)


@pytest.fixture(scope="session")
def tiny_controlnet_v1_b(tiny_sd_v1, tmp_path_factory) -> Path:
    """A second ControlNet for the same base (MultiControlNet tests)."""
    return make_tiny_controlnet(tmp_path_factory.mktemp("tiny_controlnet_v1_b") / "controlnet", tiny_sd_v1, seed=1)
