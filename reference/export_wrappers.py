"""The exported functions: one nn.Module per component whose forward maps the contract's inputs, in the
contract's order, to its output (runtime/contracts.py states names, dtypes and shapes).

The ONNX exporter traces exactly these modules, the torch backend runs them, and the reference
pipeline samples through them, so all three compute the same function. Contract conventions kept here:
float inputs and outputs are float32 whatever the weights' dtype (an fp16 module casts inside); the VAE
decoder takes the *scaled* latent and divides by the scale factor itself; the VAE encoder returns the
distribution parameters (KL: mean and logvar; VQ: the pre-quantisation latent), unscaled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm_rt.runtime.contracts import CONTROLNET_DOWN, CONTROLNET_MID, ControlNetFacts, controlnet_name, residual_input_names

from .autoencoder import AutoencoderKL, VQModel
from .controlnet import ControlNetModel, residual_layout
from .ldm import LatentDiffusion
from .text_encoder import TextEncoder, TextEncoderWithProjection
from .unet import UNetModel


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class TextEncoderExport(nn.Module):
    """input_ids (B, L) int64 -> last_hidden_state (B, L, D) float32: tau_theta(y) of the LDM paper (the layer
    the encoder's config names: SDXL's first encoder returns its penultimate layer under this name)."""

    input_names = ("input_ids",)
    output_names = ("last_hidden_state",)

    def __init__(self, text_encoder: TextEncoder) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids).float()


class TextEncoder2Export(nn.Module):
    """SDXL's second encoder: input_ids (B, L) int64 -> (last_hidden_state (B, L, D2): its penultimate layer,
    text_embeds (B, P): the projected pooled output), both float32."""

    input_names = ("input_ids",)
    output_names = ("last_hidden_state", "text_embeds")

    def __init__(self, text_encoder: TextEncoderWithProjection) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = self.text_encoder(input_ids)
        return hidden.float(), pooled.float()


class UNetExport(nn.Module):
    """(sample, timestep[, encoder_hidden_states][, class_labels][, text_embeds, time_ids][, timestep_cond]) ->
    out_sample, all float32 but labels.

    `sample` (B, in_channels, h, w) already holds any concat conditioning (inpainting: latent, mask,
    masked-image latent); `timestep` (B,) float32; the optional inputs follow in the contract's order and
    exist exactly when the UNet has cross-attention / a class embedding / SDXL's added conditioning (pooled
    text embeds (B, P) and micro-conditioning time ids (B, N)) / an LCM's w-embedding, as `input_names` lists.
    """

    output_names = ("out_sample",)

    def __init__(self, unet: UNetModel, controlnet_residuals: int = 0) -> None:
        super().__init__()
        self.unet = unet
        self.has_context = unet.config.context_dim is not None
        self.has_classes = unet.config.num_classes is not None
        self.input_names = ("sample", "timestep") + ("encoder_hidden_states",) * self.has_context + ("class_labels",) * self.has_classes
        self.has_added = unet.config.adm_in_channels is not None  # SDXL
        self.input_names += ("text_embeds", "time_ids") * self.has_added
        # LCM: the guidance scale's w-embedding, the contract's last UNet input.
        self.has_timestep_cond = unet.config.time_cond_proj_dim is not None
        self.input_names += ("timestep_cond",) * self.has_timestep_cond
        # A ControlNet folder's UNet: the summed residuals, one per input block then the middle block's, last.
        self.controlnet_residuals = controlnet_residuals
        self.input_names += tuple(residual_input_names(controlnet_residuals)) if controlnet_residuals else ()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conditioning: torch.Tensor) -> torch.Tensor:
        if len(conditioning) != len(self.input_names) - 2:
            raise TypeError(f"UNetExport takes inputs {self.input_names}, got {2 + len(conditioning)} tensors")
        dtype = _dtype_of(self.unet)
        rest = list(conditioning)
        residuals = {}
        if self.controlnet_residuals:  # (B, C_k, h_k, w_k) each, added to the skips and the middle block
            *rest, mid = rest
            rest, down = rest[: -self.controlnet_residuals], rest[-self.controlnet_residuals :]
            residuals = {"down_block_additional_residuals": [r.to(dtype) for r in down], "mid_block_additional_residual": mid.to(dtype)}
        timestep_cond = rest.pop().to(dtype) if self.has_timestep_cond else None
        context = rest.pop(0).to(dtype) if self.has_context else None
        labels = rest.pop(0) if self.has_classes else None
        added = {}
        if self.has_added:  # the time ids stay float32: their sinusoidal embedding needs the exact pixel values
            added = {"text_embeds": rest.pop(0).to(dtype), "time_ids": rest.pop(0)}
        return self.unet(sample.to(dtype), timestep, context, labels, timestep_cond=timestep_cond, **added, **residuals).float()


class VaeDecoderExport(nn.Module):
    """latent (B, C, h, w), scaled as the UNet sees it -> image (B, 3, f*h, f*w) in about [-1, 1]
    (not clamped): D(z / scale_factor). A VQ decoder quantises first ("absorbed into the decoder")."""

    input_names = ("latent",)
    output_names = ("image",)

    def __init__(self, autoencoder: AutoencoderKL | VQModel, scale_factor: float) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.scale_factor = float(scale_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent.to(_dtype_of(self.autoencoder)) / self.scale_factor
        return self.autoencoder.decode(z).float()


class VaeEncoderExport(nn.Module):
    """image (B, 3, H, W) in [-1, 1] -> latent_parameters, unscaled: KL (B, 2C, h, w) = [mean, logvar]
    along channels (no sampling inside); VQ (B, C, h, w) = the pre-quantisation latent."""

    input_names = ("image",)
    output_names = ("latent_parameters",)

    def __init__(self, autoencoder: AutoencoderKL | VQModel) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(_dtype_of(self.autoencoder))
        if isinstance(self.autoencoder, VQModel):
            return self.autoencoder.encode(x).float()
        return self.autoencoder.encode_moments(x).float()


class ControlNetExport(nn.Module):
    """(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale[, text_embeds, time_ids]) ->
    (down_block_res_sample_0 .. n-1, mid_block_res_sample), all float32: diffusers' ControlNetModel(...,
    guess_mode=False, return_dict=False). controlnet_cond (B, hint channels, H, W): the control image in [0, 1] at
    the output size; conditioning_scale (1,). Guess mode's per-residual scales are the runtime's
    (runtime/controlnet.py), applied to these outputs."""

    def __init__(self, controlnet: ControlNetModel) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.has_added = controlnet.config.adm_in_channels is not None  # SDXL's ControlNet
        self.input_names = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale")
        self.input_names += ("text_embeds", "time_ids") * self.has_added
        n = len(residual_layout(controlnet.config).down)
        self.output_names = tuple(CONTROLNET_DOWN.format(k) for k in range(n)) + (CONTROLNET_MID,)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, *added) -> tuple[torch.Tensor, ...]:
        dtype = _dtype_of(self.controlnet)
        extra = {"text_embeds": added[0].to(dtype), "time_ids": added[1]} if self.has_added else {}
        down, mid = self.controlnet(
            sample.to(dtype), timestep, encoder_hidden_states.to(dtype), controlnet_cond.to(dtype), conditioning_scale.to(dtype), **extra
        )
        return (*[r.float() for r in down], mid.float())


def controlnet_facts(controlnet: ControlNetModel) -> ControlNetFacts:
    """What runtime/contracts.add_controlnets needs of this ControlNet."""
    config = controlnet.controlnet_config
    layout = residual_layout(config.unet)
    return ControlNetFacts(layout.down, layout.mid, config.hint_channels, config.global_average_pooling)


def export_wrappers(model: LatentDiffusion, controlnets: Sequence[ControlNetModel] = ()) -> dict[str, nn.Module]:
    """The wrapper of every component this model has, by contract name (no text encoder: no entry); with
    `controlnets` (export order), controlnet_<k> each and a UNet that takes their residuals."""
    residuals = len(residual_layout(model.unet.config).down) if controlnets else 0
    wrappers: dict[str, nn.Module] = {
        "unet": UNetExport(model.unet, residuals),
        "vae_decoder": VaeDecoderExport(model.autoencoder, model.scale_factor),
        "vae_encoder": VaeEncoderExport(model.autoencoder),
    }
    if getattr(model, "text_encoder_2", None) is not None:
        wrappers = {"text_encoder_2": TextEncoder2Export(model.text_encoder_2), **wrappers}
    if model.text_encoder is not None:
        wrappers = {"text_encoder": TextEncoderExport(model.text_encoder), **wrappers}
    for index, controlnet in enumerate(controlnets):
        wrappers[controlnet_name(index)] = ControlNetExport(controlnet)
    return {name: w.eval() for name, w in wrappers.items()}
