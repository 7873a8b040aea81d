"""The conditioning encoder tau_theta (LDM paper, Sec. 3.3): a CLIP-style causal text transformer.

Stable Diffusion uses CLIP ViT-L/14's text tower (v1) or OpenCLIP ViT-H/14's penultimate layer (v2);
both are transformers' `CLIPTextModel` here (Radford et al. 2021). The same wrapper serves the small
encoder trained jointly with a UNet, as the paper trains tau_theta with epsilon_theta (eq. 3).

`TextEncoder`'s state-dict keys are the canonical Hugging Face checkpoint keys
(`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.0.self_attn.q_proj.weight`,
...): the keys of a diffusers `text_encoder/` and of an SD v1 single file after its
`cond_stage_model.transformer.` prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .configs import ConfigError, TextEncoderConfig

# Eager attention exports as plain MatMul/Add/Softmax with the causal mask as a constant-shaped Add,
# which every ONNX runtime and TensorRT take with dynamic batch; it also keeps softmax in fp32.
DEFAULT_ATTN_IMPLEMENTATION = "eager"


def build_text_encoder(
    config: TextEncoderConfig, attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION, with_projection: bool = False
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A randomly initialised CLIPTextModel (or, with_projection, CLIPTextModelWithProjection) of this
    shape (nothing is downloaded)."""
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**config.transformers_fields(), attn_implementation=attn_implementation))


def text_encoder_config_from_transformers(cfg: Mapping[str, Any]) -> TextEncoderConfig:
    """TextEncoderConfig from a transformers/diffusers `text_encoder/config.json` (CLIPTextModel, or a
    full CLIPModel config whose `text_config` is used)."""
    if cfg.get("model_type") == "clip" and "text_config" in cfg:
        cfg = cfg["text_config"]
    model_type = cfg.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise ConfigError(f"text encoder config: model_type {model_type!r} is not a CLIP text model; only CLIPTextModel is supported")
    fields = TextEncoderConfig.__dataclass_fields__
    return TextEncoderConfig(**{name: cfg[name] for name in fields if cfg.get(name) is not None})


class TextEncoder(nn.Module):
    """tau_theta: token ids (B, L) int64 -> hidden states (B, L, hidden_size), with a causal mask (token i
    attends to tokens <= i), as SD feeds its UNet: the last layer after the final LayerNorm, or the layer
    `config.hidden_states_index` names (SDXL: the penultimate, without the final LayerNorm)."""

    def __init__(self, config: TextEncoderConfig, attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION) -> None:
        super().__init__()
        self.config = config
        model = build_text_encoder(config, attn_implementation)
        # transformers 5 flattened CLIPTextModel (embeddings, encoder, final_layer_norm directly on it);
        # 4.x wraps those in `.text_model`. Holding that part as `text_model` gives the canonical keys on both.
        self.text_model = getattr(model, "text_model", model)

    def _run(self, input_ids: torch.Tensor):
        k = self.config.hidden_states_index
        out = self.text_model(input_ids=input_ids, output_hidden_states=k is not None)
        return (out.last_hidden_state if k is None else out.hidden_states[k]), out

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run(input_ids)[0]


class TextEncoderWithProjection(TextEncoder):
    """SDXL's second encoder (OpenCLIP bigG as transformers' CLIPTextModelWithProjection): token ids (B, L)
    -> (hidden states (B, L, hidden_size) as TextEncoder chooses them, text_embeds (B, projection_dim): the
    final-LayerNorm state at the first end token, through the bias-free `text_projection`).

    State-dict keys are CLIPTextModelWithProjection's (`text_model.*`, `text_projection.weight`), the keys
    of a diffusers `text_encoder_2/`."""

    def __init__(self, config: TextEncoderConfig, attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION) -> None:
        nn.Module.__init__(self)
        self.config = config
        model = build_text_encoder(config, attn_implementation, with_projection=True)
        self.text_model = model.text_model  # CLIPTextModel (transformers 5) or CLIPTextTransformer (4.x)
        self.text_projection = model.text_projection

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        hidden, out = self._run(input_ids)
        return hidden, self.text_projection(out.pooler_output)
