"""Load a latent diffusion model from local files: an ldm-rt model folder, a diffusers folder, or an
original Stable Diffusion v1/v2 or SDXL single file. Nothing is ever downloaded.

    loaded = load_model("models/sd15.safetensors", tokenizer="models/sd15-tokenizer/")
    loaded = load_model("models/stable-diffusion-2-1", prediction_type="v_prediction")
    loaded = load_model("models/sd_xl_base_1.0.safetensors", tokenizer="xl/tokenizer", tokenizer_2="xl/tokenizer_2")

What each source gives:
- ldm-rt model folder (ldm_rt_model.json): everything (see model_folder.py).
- diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/): configs through
  the key-map modules' config converters, weights renamed to the original layout with their explicit key
  maps; *.safetensors, or *.bin via torch.load(weights_only=True) only where no safetensors exist.
  SDXL folders add text_encoder_2/ and tokenizer_2/ (a refiner has only those two), and model_index.json's
  force_zeros_for_empty_prompt (diffusers' default for SDXL: true) and requires_aesthetics_score (checked
  against the UNet's 5 or 6 time ids). SDXL-Turbo folders are base folders with their own scheduler.
- single file (.safetensors; .ckpt/.pt only via torch.load(weights_only=True)): the original
  CompVis/Stability layout, split by prefix; every config is inferred from tensor shapes. Some facts are
  not in the weights and follow Stable Diffusion: attention heads (v1: 8 heads; v2 and CLIP text towers:
  64-wide heads), the latent scale factor 0.18215, the SD scheduler (scaled_linear 0.00085..0.012,
  steps_offset 1), and the prediction type, which the weights cannot reveal: SD 2.x 768-v models
  predict v, so pass `prediction_type="v_prediction"` for them (default "epsilon"). A single file holds no
  tokenizer: pass `tokenizer=` (a diffusers tokenizer/ folder or a tokenizer.json).
- SDXL single file (sgm layout: `conditioner.embedders.0.transformer.` CLIP ViT-L and
  `conditioner.embedders.1.model.` OpenCLIP bigG in a base, only `conditioner.embedders.0.model.` in a
  refiner): pass `tokenizer_2=` (SDXL's tokenizer_2/, which pads with "!") and, for a base, `tokenizer=`.
  Not in the weights: 64-wide heads, the VAE scale factor 0.13025, SDXL's Euler scheduler, and how many
  of the added-embedding channels each time id takes (the base has 6 ids, the refiner 5: the rest of
  adm_in_channels after the pooled width, shared equally).

Pickles are never loaded unrestricted: safetensors first, torch.load(weights_only=True) otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ldm_rt.runtime.files import inside
from ldm_rt.runtime.schedulers import PREDICTION_TYPES, sd_scheduler_config
from ldm_rt.runtime.tokenizer import PromptTokenizer, TokenizerError

from .checkpoint_errors import CheckpointError
from .configs import (
    BASE_TIME_IDS,
    REFINER_TIME_IDS,
    AutoencoderConfig,
    ConfigError,
    LDMConfig,
    TextEncoderConfig,
    UNetConfig,
)
from .keymap_autoencoder import autoencoder_config_from_diffusers, autoencoder_state_dict_from_diffusers
from .keymap_text_encoder import (
    IGNORED_HF_KEYS,
    SD_V1_PREFIX,
    SD_V2_PREFIX,
    text_encoder_state_dict_from_openclip,
)
from .keymap_unet import unet_config_from_diffusers, unet_state_dict_from_diffusers
from .model_folder import (
    LoadedModel,
    check_materialised,
    empty_model,
    is_model_folder,
    load_model_folder,
    load_strict,
    read_json_object,
)
from .text_encoder import text_encoder_config_from_transformers
from .text_encoder_sdxl import (
    PENULTIMATE,
    SDXL_CONDITIONER_PREFIX,
    SDXL_EMBEDDER_0_PREFIX,
    SDXL_EMBEDDER_1_PREFIX,
    SDXL_REFINER_EMBEDDER_PREFIX,
    canonical_clip_keys,
    sdxl_text_encoder_2_state_dict_from_single_file,
)

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ZIP_MAGIC = b"PK\x03\x04"  # a zip archive's first local file header: torch.save's format since torch 1.6
# Keys of an original LatentDiffusion checkpoint that hold no weights we use: the DDPM schedule buffers
# (the scheduler recomputes them) and EMA bookkeeping.
IGNORED_SINGLE_FILE_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
})  # fmt: skip
# The non-EMA UNet is used, as diffusers' converter does by default; model_ema.* holds the EMA copy.
IGNORED_SINGLE_FILE_PREFIXES = ("model_ema.",)

SD_V1_UNET_HEADS = 8  # SD v1 fixes the head count (CompVis v1-inference.yaml: num_heads 8)
HEAD_WIDTH = 64  # SD v2 UNet (num_head_channels 64) and CLIP / OpenCLIP text towers
SD_SCALE_FACTOR = 0.18215
SDXL_SCALE_FACTOR = 0.13025  # SDXL's retrained VAE (its diffusers vae/config.json scaling_factor)
SDXL_RESOLUTION = 1024  # SDXL's native image size (its VAE's sample_size), the pipeline's default


def load_model(
    path: str | Path,
    *,
    prediction_type: str | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: str | Path | PromptTokenizer | None = None,
    tokenizer_2: str | Path | PromptTokenizer | None = None,
) -> LoadedModel:
    """Load whatever `path` is (ldm-rt model folder, diffusers folder, SD or SDXL single file).

    prediction_type: "epsilon" | "v_prediction" | "sample" overrides the scheduler config (None keeps
    the folder's; single files default to "epsilon": pass "v_prediction" for SD 2.x 768-v).
    tokenizer: required for a single file (except an SDXL refiner's); overrides a folder's own otherwise.
    tokenizer_2: SDXL's second tokenizer, required for an SDXL single file; overrides a folder's own.
    """
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise CheckpointError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    own_tokenizer = None if tokenizer is None else _load_tokenizer(tokenizer)
    own_tokenizer_2 = None if tokenizer_2 is None else _load_tokenizer(tokenizer_2)
    if path.is_dir():
        if is_model_folder(path):
            loaded = load_model_folder(path, dtype)
            loaded.info = {**loaded.info, "source_kind": "ldm-rt", "path": str(path)}
        elif (path / "model_index.json").is_file():
            loaded = load_diffusers_folder(path, dtype=dtype)
        else:
            raise CheckpointError(
                f"{path} is neither an ldm-rt model folder (ldm_rt_model.json) nor a diffusers folder "
                "(model_index.json); pass one of those or an SD single file"
            )
        if own_tokenizer is not None:
            loaded.tokenizer = own_tokenizer
        if own_tokenizer_2 is not None:
            loaded.tokenizer_2 = own_tokenizer_2
    elif path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; expected one of {SINGLE_FILE_SUFFIXES}")
        if own_tokenizer is None and own_tokenizer_2 is None:
            raise CheckpointError(
                f"{path} is a single-file checkpoint and holds no tokenizer: pass tokenizer= a diffusers "
                "tokenizer/ folder (vocab.json, merges.txt) or a tokenizer.json of the model's CLIP tokenizer "
                "(and, for SDXL, tokenizer_2= its tokenizer_2/ folder)"
            )
        loaded = load_single_file(path, own_tokenizer, dtype=dtype, tokenizer_2=own_tokenizer_2)
    else:
        raise CheckpointError(f"{path} does not exist; pass a model folder, a diffusers folder or an SD single file")
    if prediction_type is not None:
        loaded.scheduler_config = {**loaded.scheduler_config, "prediction_type": prediction_type}
    _check_tokenizer_fits(loaded, path)
    return loaded


# ---- diffusers folder ------------------------------------------------------------------------------
def load_diffusers_folder(path: str | Path, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A diffusers StableDiffusion(Inpaint)Pipeline folder -> LoadedModel (weights in the original layout)."""
    path = Path(path)
    index = read_json_object(path / "model_index.json")
    for part in ("unet", "vae", "scheduler"):
        if not (path / part).is_dir():
            raise CheckpointError(f"{path} has no {part}/ folder; a diffusers Stable Diffusion folder needs unet/, vae/ and scheduler/")
    unet_config = _convert_config(unet_config_from_diffusers, path / "unet" / "config.json")
    vae_json = read_json_object(path / "vae" / "config.json")
    autoencoder_config = _convert_config(autoencoder_config_from_diffusers, path / "vae" / "config.json", vae_json)
    text_config, tokenizer = _diffusers_text_encoder(path, "text_encoder", "tokenizer")
    text_config_2, tokenizer_2 = _diffusers_text_encoder(path, "text_encoder_2", "tokenizer_2")
    sdxl: dict[str, Any] = {}
    if unet_config.adm_in_channels is not None or text_config_2 is not None:
        sdxl = _sdxl_fields(index, path / "model_index.json", unet_config, text_config_2)
        # SDXL conditions on the penultimate layer of both encoders (diffusers' clip_skip=None).
        text_config = _penultimate(text_config)
        sdxl["text_encoder_2"] = _penultimate(text_config_2)
    config = _ldm_config(
        path / "model_index.json",
        unet=unet_config,
        autoencoder=autoencoder_config,
        text_encoder=text_config,
        scale_factor=_scale_factor(vae_json, path / "vae" / "config.json"),
        **sdxl,
    )
    model = empty_model(config)  # parameters on meta until the file's tensors are assigned

    unet_sd, unet_file = _read_component_weights(path / "unet")
    _load(model.unet, _renamed(unet_state_dict_from_diffusers, unet_sd, unet_config, unet_file), unet_file)
    vae_sd, vae_file = _read_component_weights(path / "vae")
    _load(model.autoencoder, _renamed(autoencoder_state_dict_from_diffusers, vae_sd, autoencoder_config, vae_file), vae_file)
    if model.text_encoder is not None:
        text_sd, text_file = _read_component_weights(path / "text_encoder")
        _load(model.text_encoder, hf_text_keys(text_sd), text_file)
    if model.text_encoder_2 is not None:
        text_sd, text_file = _read_component_weights(path / "text_encoder_2")
        _load(model.text_encoder_2, hf_text_keys(text_sd), text_file)

    check_materialised(model, str(path))
    scheduler_config = read_json_object(path / "scheduler" / "scheduler_config.json")
    info = {"source_kind": "diffusers", "path": str(path), "pipeline": index.get("_class_name")}
    return LoadedModel(model.to(dtype).eval(), tokenizer, scheduler_config, info, tokenizer_2)


def _diffusers_text_encoder(path: Path, encoder: str, tokenizer: str) -> tuple[TextEncoderConfig | None, PromptTokenizer | None]:
    """The config of a diffusers folder's text encoder `encoder`/ (with its tokenizer's special ids) and
    that tokenizer, or (None, None) when the folder has no such encoder."""
    if not (path / encoder).is_dir():
        return None, None
    config = _convert_config(text_encoder_config_from_transformers, path / encoder / "config.json")
    if not (path / tokenizer).is_dir():
        raise CheckpointError(f"{path} has a {encoder}/ but no {tokenizer}/ folder; copy the model's {tokenizer}/ in")
    loaded = _load_tokenizer(path / tokenizer)
    return _with_token_ids(config, loaded), loaded


def _penultimate(config: TextEncoderConfig | None) -> TextEncoderConfig | None:
    return None if config is None else dataclasses.replace(config, hidden_states_index=PENULTIMATE)


def _sdxl_fields(index: dict[str, Any], where: Path, unet: UNetConfig, text_config_2: TextEncoderConfig | None) -> dict[str, Any]:
    """LDMConfig's SDXL fields from model_index.json: force_zeros_for_empty_prompt (diffusers' SDXL pipelines
    default to true), and requires_aesthetics_score, which must agree with the UNet's time ids."""
    fields: dict[str, Any] = {}
    for name, default in (("force_zeros_for_empty_prompt", True), ("requires_aesthetics_score", None)):
        value = index.get(name, default)
        if value is not None and not isinstance(value, bool):
            raise CheckpointError(f"{where}: {name} must be true or false, got {value!r}; fix model_index.json")
        fields[name] = value
    aesthetics = fields.pop("requires_aesthetics_score")
    if aesthetics is not None and unet.adm_in_channels is not None and text_config_2 is not None:
        n = (unet.adm_in_channels - text_config_2.projection_dim) / unet.addition_time_embed_dim
        if aesthetics != (n == REFINER_TIME_IDS):
            kind = "a refiner's (5 time ids, with the aesthetic score)" if n == REFINER_TIME_IDS else "a base's (6 time ids)"
            raise CheckpointError(
                f"{where}: requires_aesthetics_score is {str(aesthetics).lower()} but the UNet is {kind}; "
                "the folder mixes a base and a refiner: use the model_index.json and unet/ of one model"
            )
    return fields


def _shard_path(folder: Path, name: Any, index: Path) -> Path:
    """folder/name for a shard named in `index`, refused unless it stays inside `folder`. The shard file itself
    may be a symlink (a Hugging Face cache snapshot links every file to its blob store): it is a file of the
    folder, and its content is in the source hash like any other."""
    path = inside(folder, name, last_link_may_leave=True)
    if path is None:
        raise CheckpointError(
            f"{index}: weight_map names {name!r}, which is not a relative file name inside {folder} (an absolute "
            "path, '..', a backslash or drive, or a symlinked folder); refusing to read it; re-download the model"
        )
    return path


def _scale_factor(vae_config: dict[str, Any], where: Path) -> float:
    value = vae_config.get("scaling_factor", SD_SCALE_FACTOR)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{where}: scaling_factor must be a number, got {value!r}")
    return float(value)


def _read_component_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of one diffusers component folder: its *.safetensors (or shards listed in an index),
    else its *.bin through torch.load(weights_only=True)."""
    for suffix in (".safetensors", ".bin"):
        index = sorted(folder.glob(f"*{suffix}.index.json"))
        if index:
            weight_map = read_json_object(index[0], "re-download the model").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index[0]}: weight_map must be a JSON object of key -> shard file; re-download the model")
            shards = {_shard_path(folder, name, index[0]) for name in weight_map.values()}
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(shards):
                state.update(read_state_dict(shard))
            return state, index[0]
        files = sorted(folder.glob(f"*{suffix}"))
        if files:
            canonical = [f for f in files if f.name in (f"diffusion_pytorch_model{suffix}", f"model{suffix}")]
            chosen = canonical[0] if canonical else files[0]
            if len(files) > 1 and not canonical:
                logger.warning("%s holds several weight files %s; using %s", folder, [f.name for f in files], chosen.name)
            return read_state_dict(chosen), chosen
    raise CheckpointError(f"{folder} holds no weights (*.safetensors or *.bin); the diffusers folder is incomplete")


# ---- single file -----------------------------------------------------------------------------------
def load_single_file(
    path: str | Path,
    tokenizer: PromptTokenizer | None,
    *,
    dtype: torch.dtype = torch.float32,
    tokenizer_2: PromptTokenizer | None = None,
) -> LoadedModel:
    """An original SD v1/v2 or SDXL single file -> LoadedModel, every config inferred from the tensors'
    shapes. SD needs `tokenizer`; SDXL `tokenizer_2` and, for a base, `tokenizer` too."""
    path = Path(path)
    sd = read_state_dict(path)
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if any(isinstance(k, str) and k.startswith(SDXL_CONDITIONER_PREFIX) for k in sd):
        return _load_sdxl_single_file(path, sd, tokenizer, tokenizer_2, dtype)
    if tokenizer is None:
        raise CheckpointError(f"{path} is an SD v1/v2 checkpoint: pass tokenizer= its CLIP tokenizer (tokenizer_2 is for SDXL)")
    parts = split_single_file(sd, path)
    v2 = parts["text_layout"] == "openclip"

    unet_config = infer_unet_config(parts["unet"], v2=v2, where=str(path))
    autoencoder_config = infer_autoencoder_config(parts["autoencoder"], where=str(path))
    if v2:
        hidden = _shape(parts["text"], "token_embedding.weight", f"{path} (prefix {SD_V2_PREFIX})")[1]
        try:
            text_sd, text_config = text_encoder_state_dict_from_openclip(parts["text"], num_attention_heads=hidden // _head_width(hidden))
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    else:
        text_sd = parts["text"]
        text_config = infer_clip_text_config(text_sd, where=str(path))
    text_config = _with_token_ids(text_config, tokenizer)
    # SD 2.x computes attention in fp32 where fp16 would overflow; in fp32 this changes nothing.
    unet_config = dataclasses.replace(unet_config, upcast_attention=v2)
    config = _ldm_config(path, unet=unet_config, autoencoder=autoencoder_config, text_encoder=text_config, scale_factor=SD_SCALE_FACTOR)
    model = empty_model(config)  # parameters on meta until the file's tensors are assigned
    _load(model.unet, parts["unet"], f"{path} (UNet, prefix {UNET_PREFIX})")
    _load(model.autoencoder, parts["autoencoder"], f"{path} (autoencoder, prefix {VAE_PREFIX})")
    _load(model.text_encoder, text_sd, f"{path} (text encoder, prefix {SD_V2_PREFIX if v2 else SD_V1_PREFIX})")
    check_materialised(model, str(path))
    scheduler_config = sd_scheduler_config(_class_name="DDIMScheduler") if v2 else sd_scheduler_config()  # as each ships
    info = {"source_kind": "single_file", "path": str(path), "variant": "v2" if v2 else "v1"}
    return LoadedModel(model.to(dtype).eval(), tokenizer, scheduler_config, info)


def _load_sdxl_single_file(
    path: Path,
    sd: Mapping[str, Any],
    tokenizer: PromptTokenizer | None,
    tokenizer_2: PromptTokenizer | None,
    dtype: torch.dtype,
) -> LoadedModel:
    """An sgm-layout SDXL base or refiner single file (see the module docstring) -> LoadedModel."""
    parts = split_sdxl_single_file(sd, path)
    refiner = parts["text"] is None
    kind = "SDXL refiner" if refiner else "SDXL base"
    if tokenizer_2 is None or (tokenizer is None and not refiner):
        needs = "tokenizer_2= its tokenizer_2/ folder" if refiner else "tokenizer= its tokenizer/ and tokenizer_2= its tokenizer_2/ folder"
        raise CheckpointError(f"{path} is an {kind} checkpoint and holds no tokenizer: pass {needs} (tokenizer_2 pads with \"!\")")
    if refiner and tokenizer is not None:
        raise CheckpointError(f"{path} is an {kind} checkpoint with only the second text encoder: pass tokenizer_2= alone, not tokenizer=")
    config, text_sd_2 = sdxl_single_file_config(parts, path, tokenizer, tokenizer_2)
    model = empty_model(config)  # parameters on meta until the file's tensors are assigned
    _load(model.unet, parts["unet"], f"{path} (UNet, prefix {UNET_PREFIX})")
    _load(model.autoencoder, parts["autoencoder"], f"{path} (autoencoder, prefix {VAE_PREFIX})")
    if model.text_encoder is not None:
        _load(model.text_encoder, parts["text"], f"{path} (text encoder, prefix {SDXL_EMBEDDER_0_PREFIX})")
    prefix_2 = SDXL_REFINER_EMBEDDER_PREFIX if refiner else SDXL_EMBEDDER_1_PREFIX
    _load(model.text_encoder_2, hf_text_keys(text_sd_2), f"{path} (text encoder 2, prefix {prefix_2})")
    check_materialised(model, str(path))
    # SDXL base/refiner ship diffusers' Euler scheduler on SD's training schedule.
    scheduler_config = sd_scheduler_config(_class_name="EulerDiscreteScheduler", interpolation_type="linear", use_karras_sigmas=False)
    info = {"source_kind": "single_file", "path": str(path), "variant": "sdxl-refiner" if refiner else "sdxl"}
    return LoadedModel(model.to(dtype).eval(), tokenizer, scheduler_config, info, tokenizer_2)


def sdxl_single_file_config(
    parts: Mapping[str, Any],
    where: str | Path,
    tokenizer: PromptTokenizer | None = None,
    tokenizer_2: PromptTokenizer | None = None,
) -> tuple[LDMConfig, dict[str, torch.Tensor]]:
    """(LDMConfig inferred from the shapes of `split_sdxl_single_file`'s parts, text_encoder_2's state dict in
    CLIPTextModelWithProjection keys). Tokenizers, where given, set the encoders' special ids. Runs on
    meta tensors too, so full-size layouts can be checked without the weights."""
    refiner = parts["text"] is None
    prefix_2 = SDXL_REFINER_EMBEDDER_PREFIX if refiner else SDXL_EMBEDDER_1_PREFIX
    hidden_2 = _shape(parts["text_2"], "token_embedding.weight", f"{where} (prefix {prefix_2})")[1]
    try:
        text_sd_2, hf_config_2 = sdxl_text_encoder_2_state_dict_from_single_file(
            {prefix_2 + k: v for k, v in parts["text_2"].items()}, hidden_2 // _head_width(hidden_2), prefix=prefix_2
        )
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    text_config_2 = text_encoder_config_from_transformers(hf_config_2.to_dict())
    text_config = None if refiner else infer_clip_text_config(parts["text"], where=str(where))
    if tokenizer_2 is not None:
        text_config_2 = _with_token_ids(text_config_2, tokenizer_2)
    if tokenizer is not None and text_config is not None:
        text_config = _with_token_ids(text_config, tokenizer)

    unet_config = infer_unet_config(parts["unet"], v2=True, where=str(where))
    if unet_config.adm_in_channels is None:
        raise CheckpointError(f"{where}: the UNet has no label_emb.0.0 (SDXL's added conditioning) but the text encoders are SDXL's; the file mixes models")
    n_ids, kind = (REFINER_TIME_IDS, "SDXL refiner") if refiner else (BASE_TIME_IDS, "SDXL base")
    time_width, rest = divmod(unet_config.adm_in_channels - text_config_2.projection_dim, n_ids)
    if rest or time_width < 1:
        raise CheckpointError(
            f"{where}: the UNet's added conditioning takes {unet_config.adm_in_channels} channels, which is not the "
            f"second encoder's pooled {text_config_2.projection_dim} + {n_ids} time ids of equal width ({kind}); "
            "the UNet and text encoders come from different models"
        )
    unet_config = dataclasses.replace(unet_config, addition_time_embed_dim=time_width)
    autoencoder_config = infer_autoencoder_config(parts["autoencoder"], where=str(where), resolution=SDXL_RESOLUTION)
    config = _ldm_config(
        Path(where), unet=unet_config, autoencoder=autoencoder_config, text_encoder=_penultimate(text_config),
        scale_factor=SDXL_SCALE_FACTOR, text_encoder_2=_penultimate(text_config_2),
        force_zeros_for_empty_prompt=not refiner,  # as each ships (model_index.json)
    )  # fmt: skip
    return config, text_sd_2


def split_sdxl_single_file(sd: Mapping[str, Any], where: str | Path) -> dict[str, Any]:
    """Split an sgm SDXL state dict by prefix: {"unet", "autoencoder", "text" (CLIP ViT-L in HF keys; None
    in a refiner), "text_2" (OpenCLIP bigG keys)}, prefixes stripped."""
    prefixes = {
        "unet": UNET_PREFIX, "autoencoder": VAE_PREFIX, "text": SDXL_EMBEDDER_0_PREFIX,
        "text_2": SDXL_EMBEDDER_1_PREFIX, "refiner_text_2": SDXL_REFINER_EMBEDDER_PREFIX,
    }  # fmt: skip
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in prefixes}
    unknown = []
    for key, value in sd.items():
        name = next((n for n, p in prefixes.items() if isinstance(value, torch.Tensor) and key.startswith(p)), None)
        if name is not None:
            parts[name][key[len(prefixes[name]):]] = value
        elif key not in IGNORED_SINGLE_FILE_KEYS and not key.startswith(IGNORED_SINGLE_FILE_PREFIXES):
            unknown.append(key)
    if unknown:
        logger.warning("%s: ignoring %d key(s) outside the UNet, autoencoder and text encoders: %s", where, len(unknown), unknown[:8])
    if not parts["unet"]:
        raise CheckpointError(f"{where} has no {UNET_PREFIX}* keys: it is not an original-layout SDXL checkpoint")
    if not parts["autoencoder"]:
        raise CheckpointError(f"{where} has no {VAE_PREFIX}* keys: the autoencoder is missing from this checkpoint")
    base, refiner = parts["text"] or parts["text_2"], parts["refiner_text_2"]
    if base and refiner:
        raise CheckpointError(f"{where} holds both SDXL base ({SDXL_EMBEDDER_0_PREFIX}*) and refiner ({SDXL_REFINER_EMBEDDER_PREFIX}*) text encoder keys; expected one model")
    if base and not (parts["text"] and parts["text_2"]):
        missing, there = (SDXL_EMBEDDER_1_PREFIX, SDXL_EMBEDDER_0_PREFIX) if parts["text"] else (SDXL_EMBEDDER_0_PREFIX, SDXL_EMBEDDER_1_PREFIX)
        raise CheckpointError(f"{where} has SDXL {there}* keys but no {missing}* keys: an SDXL base needs both text encoders; the file is incomplete")
    if not (base or refiner):
        raise CheckpointError(
            f"{where} has {SDXL_CONDITIONER_PREFIX}* keys but no text encoder ({SDXL_EMBEDDER_0_PREFIX}* + "
            f"{SDXL_EMBEDDER_1_PREFIX}* for an SDXL base, {SDXL_REFINER_EMBEDDER_PREFIX}* for a refiner)"
        )
    return {
        "unet": parts["unet"],
        "autoencoder": parts["autoencoder"],
        "text": hf_text_keys(parts["text"]) if base else None,
        "text_2": parts["text_2"] if base else refiner,
    }


def split_single_file(sd: Mapping[str, Any], where: str | Path) -> dict[str, Any]:
    """Split an original SD state dict by prefix: {"unet": ..., "autoencoder": ..., "text": ...,
    "text_layout": "hf" (SD v1, CLIP) | "openclip" (SD v2)}, prefixes stripped."""
    unet, vae, text_v1, text_v2, unknown = {}, {}, {}, {}, []
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            unknown.append(key)  # training bookkeeping (global_step, epoch, ...) in a flat checkpoint
        elif key.startswith(UNET_PREFIX):
            unet[key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            vae[key[len(VAE_PREFIX):]] = value
        elif key.startswith(SD_V1_PREFIX):
            text_v1[key[len(SD_V1_PREFIX):]] = value
        elif key.startswith(SD_V2_PREFIX):
            text_v2[key[len(SD_V2_PREFIX):]] = value
        elif key not in IGNORED_SINGLE_FILE_KEYS and not key.startswith(IGNORED_SINGLE_FILE_PREFIXES):
            unknown.append(key)
    if unknown:
        logger.warning("%s: ignoring %d key(s) outside the UNet, autoencoder and text encoder: %s", where, len(unknown), unknown[:8])
    if not unet:
        raise CheckpointError(f"{where} has no {UNET_PREFIX}* keys: it is not an original-layout Stable Diffusion checkpoint")
    if not vae:
        raise CheckpointError(f"{where} has no {VAE_PREFIX}* keys: the autoencoder is missing from this checkpoint")
    if text_v1 and text_v2:
        raise CheckpointError(f"{where} holds both {SD_V1_PREFIX}* and {SD_V2_PREFIX}* keys; expected one text encoder")
    if not (text_v1 or text_v2):
        raise CheckpointError(f"{where} has no text encoder keys ({SD_V1_PREFIX}* for SD v1, {SD_V2_PREFIX}* for SD v2)")
    return {"unet": unet, "autoencoder": vae, "text": hf_text_keys(text_v1) if text_v1 else text_v2, "text_layout": "hf" if text_v1 else "openclip"}


def hf_text_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel(WithProjection) weights with the canonical `text_model.` level (transformers < 4.13 and
    >= 5 save them without it) and without the position_ids buffer some files carry."""
    return {k: v for k, v in canonical_clip_keys(sd).items() if k not in IGNORED_HF_KEYS}


def _shape(sd: Mapping[str, torch.Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{where}: key {key} is missing, so the architecture cannot be inferred; the file is incomplete")
    return tuple(sd[key].shape)


def _indices(sd: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) over the keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def _head_width(narrowest: int) -> int:
    """64-wide heads, as SD v2 and CLIP build them; a model narrower than 128 channels (a tiny test
    model) gets two heads at its narrowest attention layer instead."""
    return min(HEAD_WIDTH, max(narrowest // 2, 1))


def infer_unet_config(sd: Mapping[str, torch.Tensor], *, v2: bool, where: str) -> UNetConfig:
    """UNetConfig from an original-layout UNet state dict (prefix stripped).

    Heads are not visible in shapes: SD v1 uses 8 heads, SD v2 and SDXL 64-wide heads (min(64, narrowest
    attention width // 2) for models narrower than 128 channels); pass v2=True for SDXL. SDXL's added
    conditioning (`label_emb.0.0`) sets adm_in_channels; addition_time_embed_dim, which shapes do not show,
    is left at its default for the caller to set."""
    model_channels, in_channels = _shape(sd, "input_blocks.0.0.weight", where)[:2]
    out_channels = _shape(sd, "out.2.weight", where)[0]
    downsamplers = _indices(sd, r"input_blocks\.(\d+)\.0\.op\.weight$")
    num_res_blocks = downsamplers[0] - 1 if downsamplers else max(_indices(sd, r"input_blocks\.(\d+)\."))
    levels = len(downsamplers) + 1
    channel_mult, attention_resolutions, widths = [], [], []
    for level in range(levels):
        block = 1 + level * (num_res_blocks + 1)
        width = _shape(sd, f"input_blocks.{block}.0.out_layers.3.weight", where)[0]
        channel_mult.append(width // model_channels)
        if f"input_blocks.{block}.1.proj_in.weight" in sd:
            attention_resolutions.append(2**level)
            widths.append(width)
    mid = "middle_block.1."
    widths.append(_shape(sd, f"{mid}proj_in.weight", where)[0])
    context_dim = _shape(sd, f"{mid}transformer_blocks.0.attn2.to_k.weight", where)[1]
    linear = len(_shape(sd, f"{mid}proj_in.weight", where)) == 2
    depth = _transformer_depth(sd, levels, num_res_blocks, where)
    num_classes = _shape(sd, "label_emb.weight", where)[0] if "label_emb.weight" in sd else None
    adm = _shape(sd, "label_emb.0.0.weight", where)[1] if "label_emb.0.0.weight" in sd else None
    if v2 or context_dim == 1024:
        heads, head_channels = -1, _head_width(min(widths))
    else:
        heads, head_channels = SD_V1_UNET_HEADS, -1
    try:
        return UNetConfig(
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(attention_resolutions),
            num_heads=heads,
            num_head_channels=head_channels,
            transformer_depth=depth,
            context_dim=context_dim,
            use_linear_in_transformer=linear,
            num_classes=num_classes,
            adm_in_channels=adm,
        )
    except ConfigError as e:
        raise CheckpointError(f"{where}: inferred UNet config is invalid ({e})") from None


def _transformer_depth(sd: Mapping[str, torch.Tensor], levels: int, num_res_blocks: int, where: str) -> int | tuple[int, ...]:
    """Transformer blocks per SpatialTransformer: one int when every level with attention and the middle
    block agree (SD 1.x/2.x, the SDXL refiner), else one per level (SDXL base: 1, 2, 10; a level without
    attention gets 1, the last level the middle block's depth, as UNetConfig reads it)."""
    middle = len(_indices(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    per_level = [
        len(_indices(sd, rf"input_blocks\.{1 + level * (num_res_blocks + 1)}\.1\.transformer_blocks\.(\d+)\."))
        for level in range(levels)
    ]
    if per_level[-1] not in (0, middle):
        raise CheckpointError(
            f"{where}: the last level has {per_level[-1]} transformer blocks but the middle block {middle}; "
            "the reference UNet needs them equal (as SD and SDXL build them)"
        )
    if all(d in (0, middle) for d in per_level):
        return middle
    return tuple(d or 1 for d in per_level[:-1]) + (middle,)


def infer_autoencoder_config(sd: Mapping[str, torch.Tensor], *, where: str, resolution: int = 512) -> AutoencoderConfig:
    """AutoencoderConfig from an original-layout first-stage state dict (prefix stripped). `resolution`
    only places attn_resolutions (SD has none) and sets the pipeline's default image size."""
    ch, in_channels = _shape(sd, "encoder.conv_in.weight", where)[:2]
    levels = _indices(sd, r"encoder\.down\.(\d+)\.block\.0\.")
    if not levels:
        raise CheckpointError(f"{where}: no encoder.down.N.block.0 keys; the autoencoder is incomplete")
    num_res_blocks = len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."))
    ch_mult = tuple(_shape(sd, f"encoder.down.{i}.block.0.conv2.weight", where)[0] // ch for i in levels)
    attn = tuple(resolution // 2**i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd)
    z_channels = _shape(sd, "decoder.conv_in.weight", where)[1]
    embed_dim = _shape(sd, "post_quant_conv.weight", where)[1]
    vq = "quantize.embedding.weight" in sd
    try:
        return AutoencoderConfig(
            kind="vq" if vq else "kl",
            in_channels=in_channels,
            out_ch=_shape(sd, "decoder.conv_out.weight", where)[0],
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=attn,
            resolution=resolution,
            z_channels=z_channels,
            embed_dim=embed_dim,
            n_embed=_shape(sd, "quantize.embedding.weight", where)[0] if vq else AutoencoderConfig.n_embed,
        )
    except ConfigError as e:
        raise CheckpointError(f"{where}: inferred autoencoder config is invalid ({e})") from None


def infer_clip_text_config(sd: Mapping[str, torch.Tensor], *, where: str) -> TextEncoderConfig:
    """TextEncoderConfig of an SD v1 (OpenAI CLIP, quick_gelu) text encoder in transformers' keys."""
    vocab_size, hidden = _shape(sd, "text_model.embeddings.token_embedding.weight", where)
    layers = _indices(sd, r"text_model\.encoder\.layers\.(\d+)\.")
    return TextEncoderConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=_shape(sd, "text_model.encoder.layers.0.mlp.fc1.weight", where)[0],
        num_hidden_layers=len(layers),
        num_attention_heads=hidden // _head_width(hidden),
        max_position_embeddings=_shape(sd, "text_model.embeddings.position_embedding.weight", where)[0],
        hidden_act="quick_gelu",
    )


# ---- shared pieces ---------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, Any]:
    """A safetensors file, or a pickle checkpoint through torch.load(weights_only=True); one-line
    CheckpointError for an unreadable, truncated or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises several types (SafetensorError, OSError, ...) for a bad file
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download or re-convert it") from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            # A zip checkpoint (torch.save's format since torch 1.6) is mapped, not read: its tensors are views of
            # the file, as safetensors' are, so an SD .ckpt (4-7 GB with its EMA copy) is never resident whole and
            # its pages can be given back during the export. A legacy pickle cannot be mapped: it is read whole.
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path} cannot be loaded safely with torch.load(weights_only=True) ({first}); convert it to safetensors"
            ) from None
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state dict")
        return dict(data)
    raise CheckpointError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors or {PICKLE_SUFFIXES}")


def _is_zip(path: Path) -> bool:
    """A zip archive (torch.save's default format), by its first bytes, as torch.load itself tells them apart."""
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def _convert_config(convert, path: Path, data: dict[str, Any] | None = None):
    data = read_json_object(path) if data is None else data
    try:
        return convert(data)
    except (ValueError, TypeError, KeyError) as e:  # ConfigError, or a field of the wrong JSON type (int("x"))
        raise CheckpointError(f"{path}: {e}") from None


def _ldm_config(where: Path, **fields: Any) -> LDMConfig:
    unet, text = fields["unet"], fields["text_encoder"]
    if unet.num_classes is not None:
        conditioning = "class"
    elif unet.context_dim is None:
        conditioning = "none"
    elif unet.in_channels == 2 * fields["autoencoder"].embed_dim + 1:
        conditioning = "hybrid"  # inpainting: latent + mask + masked-image latent, and the prompt
    else:
        conditioning = "crossattn"
    if conditioning in ("crossattn", "hybrid") and text is None and fields.get("text_encoder_2") is None:
        raise CheckpointError(f"{where}: the UNet cross-attends to text but the model has no text encoder")
    try:
        return LDMConfig(conditioning=conditioning, **fields)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _renamed(convert, sd, config, file: Path) -> dict[str, torch.Tensor]:
    try:
        return convert(sd, config)
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from None


def _load(module: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str | Path) -> None:
    """The tensors of `state` become the parameters of `module` (built by empty_model): no copy is made, so a
    safetensors file's weights stay views of the file, read from disk where they are first used."""
    load_strict(module, dict(state), where=str(where), assign=True)


def _load_tokenizer(tokenizer: str | Path | PromptTokenizer) -> PromptTokenizer:
    if isinstance(tokenizer, PromptTokenizer):
        return tokenizer
    path = Path(tokenizer)
    try:
        if path.is_dir():
            return PromptTokenizer.from_diffusers_folder(path)
        return PromptTokenizer.from_file(path)
    except TokenizerError as e:
        raise CheckpointError(f"tokenizer {path}: {e}") from None


def _with_token_ids(config: TextEncoderConfig, tokenizer: PromptTokenizer) -> TextEncoderConfig:
    """The text config with the tokenizer's special ids (SD v1.5's config.json carries stale ones)."""
    return dataclasses.replace(config, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)


def _check_tokenizer_fits(loaded: LoadedModel, where: Path) -> None:
    config = loaded.model.config
    pairs = (
        ("tokenizer", "the text encoder", config.text_encoder, loaded.tokenizer),
        ("tokenizer_2", "text_encoder_2", config.text_encoder_2, loaded.tokenizer_2),
    )
    for name, encoder_name, encoder, tokenizer in pairs:
        if encoder is None or tokenizer is None:
            continue
        if tokenizer.vocab_size > encoder.vocab_size:
            raise CheckpointError(
                f"{where}: the {name} has {tokenizer.vocab_size} tokens but {encoder_name} embeds {encoder.vocab_size}; "
                f"pass the {name} that belongs to this model"
            )
        if tokenizer.max_length > encoder.max_position_embeddings:
            raise CheckpointError(
                f"{where}: the {name} pads to {tokenizer.max_length} tokens but {encoder_name} has "
                f"{encoder.max_position_embeddings} positions; pass the {name} that belongs to this model"
            )
    tokenizer_2 = loaded.tokenizer_2
    if config.text_encoder_2 is not None and tokenizer_2 is not None and tokenizer_2.pad_id == tokenizer_2.eos_id:
        # SDXL's second encoder was trained on "!"-padded ids; end-token padding runs but draws other images.
        logger.warning("%s: tokenizer_2 pads with its end token; SDXL's tokenizer_2 pads with \"!\": check it is the model's tokenizer_2/", where)


__all__ = [
    "CheckpointError",
    "LoadedModel",
    "infer_autoencoder_config",
    "infer_clip_text_config",
    "infer_unet_config",
    "load_diffusers_folder",
    "load_model",
    "load_single_file",
    "read_state_dict",
    "sdxl_single_file_config",
    "split_sdxl_single_file",
    "split_single_file",
]
