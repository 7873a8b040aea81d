"""Transformer blocks that condition the LDM UNet on a context (LDM paper, Sec. 3.3, Eq. 3).

Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V with Q = W_Q phi(z_t), K = W_K tau(y), V = W_V tau(y):
phi(z_t) is the flattened UNet feature map and tau(y) the encoded condition (text tokens).
Module and parameter names follow the original CompVis/Stability `ldm/modules/attention.py`, so SD
checkpoint keys (`transformer_blocks.0.attn1.to_q.weight`, `ff.net.0.proj.weight`, ...) load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# LayerNorm eps is PyTorch's default in the original; the SpatialTransformer GroupNorm uses 1e-6.
SPATIAL_NORM_EPS = 1e-6


class CrossAttention(nn.Module):
    """Multi-head scaled dot-product attention of `x` onto `context` (self-attention when context is None).

    Vaswani et al. 2017, Eq. 1; LDM paper Eq. 3. `upcast` computes Q K^T and the softmax in fp32 for
    half-precision inputs, as SD 2.x needs (its fp16 attention scores overflow).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b = t.shape[0]
        return t.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)  # (B, heads, T, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))  # (B, heads, N, d)
        k = self._split_heads(self.to_k(context))  # (B, heads, T, d)
        v = self._split_heads(self.to_v(context))  # (B, heads, T, d)
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        # SDPA exports to ONNX (opset >= 14) as MatMul-Softmax-MatMul with the default 1/sqrt(d) scale.
        out = F.scaled_dot_product_attention(q, k, v).to(dtype)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(x.shape[0], -1, self.heads * self.dim_head)  # (B, N, heads*d)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection: x W + b split in two halves a, g -> a * GELU(g) (Shazeer 2020, Eq. 5)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (B, N, dim_out)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Position-wise feed-forward with a GEGLU input projection and 4x hidden width (original `gated_ff`)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention onto the context, GEGLU feed-forward.

    With no context (context_dim None) the second attention attends to the features themselves, as in
    the original code.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout, upcast)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout, upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, with a residual around it (LDM paper, Appendix E.2.1).

    GroupNorm, project in (1x1 conv in SD v1, Linear in SD v2), flatten to tokens, `depth` transformer
    blocks, project out, reshape back, add the input.
    """

    def __init__(
        self,
        in_channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        use_linear: bool = False,
        dropout: float = 0.0,
        upcast: bool = False,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(norm_groups, in_channels, eps=SPATIAL_NORM_EPS)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner_dim)
            self.proj_out: nn.Module = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, dropout, upcast) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # (B, inner, H, W)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)  # (B, H*W, inner)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)  # (B, H*W, C)
        x = x.transpose(1, 2).reshape(b, -1, h, w)  # (B, C, H, W)
        if not self.use_linear:
            x = self.proj_out(x)  # (B, C, H, W)
        return x + x_in
