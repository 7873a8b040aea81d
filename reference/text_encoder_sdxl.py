"""SDXL's two text encoders and its prompt embedding (Podell et al. 2023, "SDXL", Sec. 2.1).

- `text_encoder`: CLIP ViT-L/14 (transformers' `CLIPTextModel`); SDXL reads its penultimate layer.
- `text_encoder_2`: OpenCLIP ViT-bigG/14 (`CLIPTextModelWithProjection`); its penultimate layer joins the
  sequence and its projected pooled output (`text_embeds`) conditions the UNet's `add_embedding`.

The prompt embedding is the two penultimate hidden states concatenated on the channel axis (768 + 1280 =
2048 in SDXL), as diffusers' `StableDiffusionXLPipeline.encode_prompt` computes it with `clip_skip=None`.
Each encoder reads the ids of its own tokenizer: SDXL's second tokenizer pads with "!" (id 0), the first
with <|endoftext|>; `runtime.tokenizer.PromptTokenizer.from_diffusers_folder` reads each folder's pad.

Single files (sgm's `GeneralConditioner`): `conditioner.embedders.0.transformer.` + Hugging Face CLIP keys
(`FrozenCLIPEmbedder`), and `conditioner.embedders.1.model.` + OpenCLIP keys (`FrozenOpenCLIPEmbedder2`).
Unlike SD v2, every resblock is kept (the encoder is run with hidden states and index -2 is taken), and
`text_projection` ((width, proj), applied as `x @ P`) becomes the Linear weight `P.T`, as diffusers'
`convert_open_clip_checkpoint` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .checkpoint_errors import CheckpointError, check_state_dict
from .configs import TextEncoderConfig
from .keymap_text_encoder import (
    IGNORED_HF_KEYS,
    text_encoder_state_dict_from_openclip,
    text_encoder_state_dict_to_openclip,
)
from .text_encoder import DEFAULT_ATTN_IMPLEMENTATION

SDXL_EMBEDDER_0_PREFIX = "conditioner.embedders.0.transformer."
SDXL_EMBEDDER_1_PREFIX = "conditioner.embedders.1.model."
# The refiner's conditioner has only the OpenCLIP embedder (then the size/crop/score embedders, no weights).
SDXL_REFINER_EMBEDDER_PREFIX = "conditioner.embedders.0.model."
SDXL_CONDITIONER_PREFIX = "conditioner.embedders."
OPENCLIP_PROJECTION = "text_projection"
HF_PROJECTION = "text_projection.weight"
# SDXL conditions on the layer before the last (diffusers' clip_skip=None), for both encoders.
PENULTIMATE = -2


def load_sdxl_text_encoder(folder: str | Path, with_projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A diffusers `text_encoder/` (CLIPTextModel) or, with_projection, `text_encoder_2/`
    (CLIPTextModelWithProjection) folder, in eval mode with eager attention (see text_encoder.py)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; pass the model's text_encoder/ or text_encoder_2/ folder")
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls.from_pretrained(str(folder), attn_implementation=DEFAULT_ATTN_IMPLEMENTATION).eval()


def sdxl_prompt_embeds(
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    input_ids: torch.Tensor,
    input_ids_2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, L, C1 + C2), pooled_prompt_embeds (B, P)) from each tokenizer's ids (B, L)."""
    if input_ids.shape != input_ids_2.shape:
        raise ValueError(f"token ids of the two tokenizers differ in shape: {tuple(input_ids.shape)} vs {tuple(input_ids_2.shape)}; tokenize the same prompts to the same length")
    first = text_encoder(input_ids=input_ids, output_hidden_states=True)
    second = text_encoder_2(input_ids=input_ids_2, output_hidden_states=True)
    embeds = torch.cat([first.hidden_states[PENULTIMATE], second.hidden_states[PENULTIMATE]], dim=-1)
    return embeds, second.text_embeds


def sdxl_text_encoder_state_dict_from_single_file(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Embedder 0 of an SDXL single file (CLIP ViT-L, already in Hugging Face layout) -> CLIPTextModel keys."""
    out = {k[len(SDXL_EMBEDDER_0_PREFIX):]: v for k, v in sd.items() if k.startswith(SDXL_EMBEDDER_0_PREFIX)}
    if not out:
        raise CheckpointError(f"no key starts with {SDXL_EMBEDDER_0_PREFIX!r}: this is not an SDXL base checkpoint with a CLIP ViT-L encoder")
    return {k: v for k, v in out.items() if k not in IGNORED_HF_KEYS}


def _projection_shapes(config: CLIPTextConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    return {k: tuple(v.shape) for k, v in canonical_clip_keys(model.state_dict()).items() if k not in IGNORED_HF_KEYS}


def sdxl_text_encoder_2_state_dict_from_single_file(
    sd: Mapping[str, torch.Tensor], num_attention_heads: int | None = None, prefix: str = SDXL_EMBEDDER_1_PREFIX
) -> tuple[dict[str, torch.Tensor], CLIPTextConfig]:
    """The OpenCLIP bigG embedder of an SDXL single file (`conditioner.embedders.1.model.` in a base,
    `conditioner.embedders.0.model.` (SDXL_REFINER_EMBEDDER_PREFIX) in a refiner: pass it as `prefix`) ->
    (CLIPTextModelWithProjection state dict, its config inferred from shapes). Missing, unexpected and
    misshaped keys raise CheckpointError naming them. num_attention_heads: as in
    `text_encoder_state_dict_from_openclip` (default width // 64, as OpenCLIP builds it)."""
    tower = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not tower:
        raise CheckpointError(f"no key starts with {prefix!r}: this is not an SDXL checkpoint with an OpenCLIP bigG encoder")
    projection = tower.get(OPENCLIP_PROJECTION)
    if projection is None:
        raise CheckpointError(f"OpenCLIP text encoder: missing {prefix}{OPENCLIP_PROJECTION}; SDXL's second encoder needs its text projection")
    out, config = text_encoder_state_dict_from_openclip(tower, num_attention_heads, drop_last_layer=False)
    if projection.ndim != 2 or projection.shape[0] != config.hidden_size:
        raise CheckpointError(
            f"shape of {prefix}{OPENCLIP_PROJECTION}: checkpoint {list(projection.shape)}, "
            f"model [{config.hidden_size}, projection_dim]; check that the file is an SDXL checkpoint"
        )
    out[HF_PROJECTION] = projection.T.contiguous()  # OpenCLIP: x @ P; nn.Linear: x @ W.T
    hf_config = CLIPTextConfig(**{**config.transformers_fields(), "projection_dim": int(projection.shape[1])})
    check_state_dict(_projection_shapes(hf_config), out, "SDXL text_encoder_2")
    return out, hf_config


def sdxl_text_encoder_2_state_dict_to_single_file(
    model: CLIPTextModelWithProjection, prefix: str = SDXL_EMBEDDER_1_PREFIX
) -> dict[str, torch.Tensor]:
    """The inverse of `sdxl_text_encoder_2_state_dict_from_single_file` (prefixed OpenCLIP keys, fused
    in_proj, transposed projection); builds single-file fixtures."""
    sd = {k: v for k, v in canonical_clip_keys(model.state_dict()).items() if k not in IGNORED_HF_KEYS}
    fields = TextEncoderConfig.__dataclass_fields__
    config = TextEncoderConfig(**{name: getattr(model.config, name) for name in fields if hasattr(model.config, name)})
    tower = {k: v for k, v in sd.items() if k != HF_PROJECTION}
    out = text_encoder_state_dict_to_openclip(tower, config)
    out[OPENCLIP_PROJECTION] = sd[HF_PROJECTION].T.contiguous()
    return {prefix + k: v for k, v in out.items()}


def canonical_clip_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 names CLIPTextModel's parameters without the `text_model.` level that checkpoints
    (4.x folders, SDXL single files) and CLIPTextModelWithProjection have; put it back."""
    return {k if k.startswith("text_model.") or k == HF_PROJECTION else f"text_model.{k}": v for k, v in sd.items()}


def load_state_dict_strict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], component: str) -> None:
    """Load `sd` (canonical or the model's own key names) into a CLIPTextModel(WithProjection) after
    checking keys and shapes (CheckpointError names every mismatch)."""
    own = {k: v for k, v in model.state_dict().items() if k not in IGNORED_HF_KEYS}
    canonical_to_own = dict(zip(canonical_clip_keys(own), own))
    given = {k: v for k, v in canonical_clip_keys(sd).items() if k not in IGNORED_HF_KEYS}
    check_state_dict({k: tuple(own[o].shape) for k, o in canonical_to_own.items()}, given, component)
    # Not strict only for position_ids, a buffer the model builds itself (checked above otherwise).
    model.load_state_dict({canonical_to_own[k]: v for k, v in given.items()}, strict=False)
