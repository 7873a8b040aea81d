"""The latent diffusion model as one bundle: first stage, denoiser, conditioner (LDM paper, Fig. 3).

Only holds the three networks and the facts that tie them together (latent scale factor, how the
condition reaches the UNet). Sampling lives in `pipeline.py`, training in `ldm_rt.training`.
"""

from __future__ import annotations

import torch
from torch import nn

from .autoencoder import AutoencoderKL, VQModel
from .configs import LDMConfig
from .text_encoder import TextEncoder, TextEncoderWithProjection
from .unet import UNetModel


def build_autoencoder(config: LDMConfig) -> AutoencoderKL | VQModel:
    ae = config.autoencoder
    return AutoencoderKL(ae) if ae.kind == "kl" else VQModel(ae)


class LatentDiffusion(nn.Module):
    """epsilon_theta(z_t, t, tau_theta(y)) together with E, D and tau_theta (paper eq. 3)."""

    def __init__(self, config: LDMConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = UNetModel(config.unet)
        self.autoencoder = build_autoencoder(config)
        self.text_encoder = None if config.text_encoder is None else TextEncoder(config.text_encoder)
        # SDXL's second encoder (the refiner's only one): sequence and projected pooled embedding.
        te2 = config.text_encoder_2
        self.text_encoder_2 = None if te2 is None else TextEncoderWithProjection(te2)

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    def encode_image(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image in [-1, 1] (B, 3, H, W) -> scaled latent z (B, C, H/f, W/f); the KL posterior's mode
        unless a generator asks for a sample."""
        if isinstance(self.autoencoder, VQModel):
            z = self.autoencoder.encode(x)
        else:
            posterior = self.autoencoder.encode(x)
            z = posterior.mode() if generator is None else posterior.sample(generator)
        return z * self.scale_factor

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in about [-1, 1]."""
        return self.autoencoder.decode(z / self.scale_factor)

    def encode_text(self, input_ids: torch.Tensor | None, input_ids_2: torch.Tensor | None = None):
        """Token ids (B, L) -> context (B, L, context_dim) for SD 1.x/2.x.

        SDXL: each tokenizer's ids (B, L) -> (context (B, L, C1 + C2), pooled text_embeds (B, P)), the two
        encoders' sequences concatenated on the channel axis (diffusers' `encode_prompt`); a refiner has only
        the second encoder, so it takes input_ids=None and input_ids_2 (context (B, L, C2))."""
        if self.text_encoder_2 is None:
            if self.text_encoder is None:
                raise ValueError("this model has no text encoder; it takes no prompt")
            if input_ids_2 is not None:
                raise ValueError("this model has one text encoder; pass input_ids only")
            return self.text_encoder(input_ids)
        if input_ids_2 is None:
            raise ValueError("an SDXL model needs input_ids_2, the ids of its second tokenizer (tokenizer_2)")
        hidden_2, pooled = self.text_encoder_2(input_ids_2)
        if self.text_encoder is None:
            if input_ids is not None:
                raise ValueError("this SDXL refiner has only text_encoder_2; pass input_ids=None and input_ids_2")
            return hidden_2, pooled
        if input_ids is None or input_ids.shape != input_ids_2.shape:
            got = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(
                f"an SDXL base model needs the ids of both tokenizers in one shape: input_ids {got}, "
                f"input_ids_2 {tuple(input_ids_2.shape)}; tokenize the same prompts with tokenizer and tokenizer_2"
            )
        return torch.cat([self.text_encoder(input_ids), hidden_2], dim=-1), pooled
