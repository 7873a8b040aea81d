"""Vector quantiser of the VQ-regularised first stage (VQ-VAE, van den Oord et al. 2017, eq. 3; as
used by VQGAN (Esser et al. 2021) and the LDM paper, Sec. 3.1, "VQ-reg.").

Follows taming-transformers' `VectorQuantizer2` with `legacy=True`, the formulation the LDM
checkpoints were trained with: the commitment weight beta multiplies the codebook term, not the
encoder term (a historical slip kept for compatibility).
"""

from __future__ import annotations

import torch
from torch import nn


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation with a straight-through gradient.

    The parameter is named `embedding` so the state dict reads `quantize.embedding.weight`, as in the
    original LDM VQModel checkpoints.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        # taming's initialisation: small uniform codes so early assignments spread over the codebook.
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, embed_dim, h, w) -> (z_q (B, embed_dim, h, w), commitment loss (scalar), indices (B, h, w))."""
        z = z.permute(0, 2, 3, 1)  # (B, h, w, C)
        flat = z.reshape(-1, self.embed_dim)  # (B*h*w, C)
        codebook = self.embedding.weight  # (n_embed, C)
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, the expansion the original code uses.
        distances = (
            flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1) - 2.0 * flat @ codebook.t()
        )  # (B*h*w, n_embed)
        indices = distances.argmin(dim=1).reshape(z.shape[:3])  # (B, h, w)
        z_q = self.embedding(indices)  # (B, h, w, C)

        # Legacy weighting: || sg[z_q] - z ||^2 + beta * || z_q - sg[z] ||^2.
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        # Straight-through estimator: forward uses z_q, backward copies the gradient to z.
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), loss, indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices (B, h, w) -> quantised latents (B, embed_dim, h, w)."""
        return self.embedding(indices).permute(0, 3, 1, 2)
