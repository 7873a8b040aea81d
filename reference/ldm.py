"""The latent diffusion model as one bundle: first stage, denoiser, conditioner (LDM paper, Fig. 3).

Only holds the three networks and the facts that tie them together (latent scale factor, how the
condition reaches the UNet). Sampling lives in `pipeline.py`, training in `ldm_rt.training`.
"""

from __future__ import annotations

import torch
from torch import nn

from .autoencoder import AutoencoderKL, VQModel
from .configs import LDMConfig
from .text_encoder import TextEncoder
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

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> context (B, L, context_dim)."""
        if self.text_encoder is None:
            raise ValueError("this model has no text encoder; it takes no prompt")
        return self.text_encoder(input_ids)
