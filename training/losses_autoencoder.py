"""Autoencoder objective of the LDM first stage (Rombach et al. 2022, Appendix G; Esser et al., VQGAN,
CVPR 2021, eq. 4-7), as the LDM repo's LPIPSWithDiscriminator / VQLPIPSWithDiscriminator:

    rec   = |x - x_rec| (or squared) + w_p * d_perceptual(x, x_rec)
    KL:   L = sum(rec / exp(s) + s) / B + w_kl * KL(q(z|x) || N(0, I)) + lambda * f * L_G     (s: learned log-variance)
    VQ:   L = mean(rec) + w_q * L_commit + lambda * f * L_G
    L_G = -mean D(x_rec);  lambda = ||grad_{D_L} rec|| / (||grad_{D_L} L_G|| + 1e-4) * w_d   (eq. 7, D_L the decoder's last layer)
    L_D = (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) / 2                            (hinge loss)

f switches the adversarial terms on after `disc_start` steps; before that the discriminator is not run at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .perceptual import VGGPerceptualLoss


@dataclass(frozen=True)
class AutoencoderLossConfig:
    rec_loss: str = "l1"  # "l1" or "l2" per-pixel term
    perceptual_weight: float = 1.0  # w_p; only used when a VGG16 weights file is given
    kl_weight: float = 1e-6  # w_kl: "slight" KL, so the latent keeps detail (paper Sec. 3.1)
    codebook_weight: float = 1.0  # w_q (kind "vq")
    disc_start: int = 2000  # step at which the adversarial terms switch on
    disc_weight: float = 0.5  # w_d
    disc_factor: float = 1.0  # f once switched on
    logvar_init: float = 0.0

    def __post_init__(self) -> None:
        if self.rec_loss not in ("l1", "l2"):
            raise ValueError(f"loss.rec_loss must be 'l1' or 'l2', got {self.rec_loss!r}")
        for name in ("perceptual_weight", "kl_weight", "codebook_weight", "disc_weight", "disc_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """VQGAN eq. 7: balance the adversarial gradient against the reconstruction one at the last layer."""
    nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


class AutoencoderLoss(nn.Module):
    """The loss weights and the frozen perceptual network; the learned log-variance s is a parameter of
    the trained module (see train_autoencoder.AutoencoderWithLogvar) so it is averaged across processes."""

    def __init__(self, config: AutoencoderLossConfig, kind: str, perceptual: VGGPerceptualLoss | None) -> None:
        super().__init__()
        self.config = config
        self.kind = kind
        self.perceptual = perceptual

    def disc_active(self, step: int) -> bool:
        return step >= self.config.disc_start and self.config.disc_factor > 0

    def reconstruction(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-pixel reconstruction term (B, C, H, W), perceptual distance broadcast over pixels."""
        rec = (x - recon).abs() if self.config.rec_loss == "l1" else (x - recon).pow(2)
        if self.perceptual is not None and self.config.perceptual_weight > 0:
            rec = rec + self.config.perceptual_weight * self.perceptual(x, recon).view(-1, 1, 1, 1)
        return rec

    def generator(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        regulariser: torch.Tensor,
        logvar: torch.Tensor | None,
        step: int,
        discriminator: nn.Module,
        last_layer: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Autoencoder loss. regulariser: KL per sample (B,) for "kl", the commitment loss for "vq";
        logvar: s (kind "kl")."""
        cfg = self.config
        rec = self.reconstruction(x, recon)
        if self.kind == "kl":
            nll = (rec / torch.exp(logvar) + logvar).sum() / x.shape[0]
            reg = cfg.kl_weight * regulariser.mean()
        else:
            nll = rec.mean()
            reg = cfg.codebook_weight * regulariser.mean()
        loss = nll + reg
        logs = {"rec": rec.detach().mean().item(), "nll": nll.item(), "reg": reg.item()}
        if self.disc_active(step):
            g_loss = -discriminator(recon).mean()
            weight = adaptive_weight(nll, g_loss, last_layer, cfg.disc_weight)
            loss = loss + weight * cfg.disc_factor * g_loss
            logs.update(g_loss=g_loss.item(), d_weight=weight.item())
        return loss, logs

    def discriminator(self, x: torch.Tensor, recon: torch.Tensor, discriminator: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
        logits_real = discriminator(x.detach())
        logits_fake = discriminator(recon.detach())
        d_loss = self.config.disc_factor * hinge_d_loss(logits_real, logits_fake)
        logs = {"d_loss": d_loss.item(), "logits_real": logits_real.mean().item(), "logits_fake": logits_fake.mean().item()}
        return d_loss, logs
