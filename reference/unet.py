"""The LDM denoiser eps_theta(z_t, t, tau(y)): a time-conditional UNet with SpatialTransformers.

LDM paper (Rombach et al., CVPR 2022), Sec. 3.3 and Appendix; the layout is the original
`ldm/modules/diffusionmodules/openaimodel.py` (after Dhariwal & Nichol 2021), restricted to what the
Stable Diffusion family uses: no scale-shift norm, convolutional resampling, SpatialTransformer attention.
SDXL's additions follow Stability's `sgm/modules/diffusionmodules/openaimodel.py` (Podell et al. 2023):
per-level transformer depth and a vector condition (pooled text embeds + embedded size/crop time ids)
added to the time embedding. Attribute names reproduce the SD checkpoint keys (`model.diffusion_model.` stripped), so an SD
state dict loads without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SpatialTransformer
from .configs import ConfigError, UNetConfig

RESBLOCK_NORM_EPS = 1e-5
MAX_PERIOD = 10000


class UNetInputError(ValueError):
    """The inputs given to UNetModel.forward do not fit its config; the message says which and why."""


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), cos half first then sin half.

    Vaswani et al. 2017, Sec. 3.5, with frequencies max_period^(-i / (dim/2)), i = 0..dim/2-1, as in the
    original `timestep_embedding` (diffusers: flip_sin_to_cos=True, downscale_freq_shift=0).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )  # (dim/2,)
    args = timesteps[:, None].float() * freqs[None]  # (B, dim/2)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*(dim/2))
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (B, dim)
    return embedding


class ResBlock(nn.Module):
    """Residual block with the time embedding added between its two convolutions (Ho et al. 2020, App. B)."""

    def __init__(
        self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, channels, eps=RESBLOCK_NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, out_channels, eps=RESBLOCK_NORM_EPS),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # A 1x1 conv only where the channel count changes; identity keeps no checkpoint key.
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, kernel_size=1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C_out, 1, 1) broadcast over H, W
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 convolution.

    A constant scale factor exports to an ONNX Resize that works for any input size; inputs are
    multiples of the downsampling factor, so the result always matches the skip connection.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers that hands the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """eps_theta(x, t, context, y): the SD / LDM UNet, built from a UNetConfig.

    x is (B, in_channels, H, W) with any concat-conditioning already concatenated; H and W must be
    multiples of `config.downsampling_factor`. Returns (B, out_channels, H, W).
    """

    def __init__(self, config: UNetConfig, encoder_only: bool = False) -> None:
        """encoder_only: stop after the middle block (a ControlNet's trainable copy, reference/controlnet.py)."""
        super().__init__()
        self.config = config
        c = config
        time_embed_dim = c.model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(c.model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if c.time_cond_proj_dim is not None:  # LCM: w-embedding -> timestep-embedding width (diffusers' cond_proj)
            self.time_cond_proj = nn.Linear(c.time_cond_proj_dim, c.model_channels, bias=False)
        if c.num_classes is not None:
            self.label_emb: nn.Module = nn.Embedding(c.num_classes, time_embed_dim)
        elif c.adm_in_channels is not None:
            # Nested as in sgm's openaimodel (`label_emb.0.0`, `label_emb.0.2`), so SDXL keys load unrenamed.
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(c.adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
                )
            )

        def transformer(ch: int, level: int) -> SpatialTransformer:
            heads, dim_head = c.heads_for(ch, level)
            if heads < 1 or heads * dim_head != ch:
                raise ConfigError(
                    f"UNetConfig: {ch} channels do not split into heads (num_heads={c.num_heads}, "
                    f"num_head_channels={c.num_head_channels}); pick values that divide every level's width"
                )
            return SpatialTransformer(
                ch, heads, dim_head, c.depth_for(level), c.context_dim, c.use_linear_in_transformer,
                c.dropout, c.upcast_attention, c.norm_num_groups,
            )

        def resblock(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, ch_out, c.dropout, c.norm_num_groups)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1))]
        )
        skip_channels = [c.model_channels]  # channels of every input block output, consumed by the decoder
        ch = c.model_channels
        ds = 1  # current downsampling factor; attention_resolutions lists the ones with transformers
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch), transformer(ch, len(c.channel_mult) - 1), resblock(ch, ch)
        )
        if encoder_only:
            return

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                skip = skip_channels.pop()
                layers = [resblock(ch + skip, c.model_channels * mult)]
                ch = c.model_channels * mult
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, level))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(c.norm_num_groups, ch, eps=RESBLOCK_NORM_EPS),
            nn.SiLU(),
            nn.Conv2d(c.model_channels, c.out_channels, 3, padding=1),
        )

    def added_condition(self, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """SDXL's vector condition y: (B, P) pooled text embeds and (B, N) time ids -> (B, P + N * D).

        Each time id gets the same sinusoidal embedding as a timestep (D = addition_time_embed_dim);
        sgm computes it in its conditioner (ConcatTimestepEmbedderND), diffusers in the UNet (add_time_proj).
        """
        b = text_embeds.shape[0]
        ids = timestep_embedding(time_ids.reshape(-1), self.config.addition_time_embed_dim)  # (B*N, D)
        return torch.cat([text_embeds, ids.reshape(b, -1).to(text_embeds.dtype)], dim=-1)  # (B, P + N*D)

    def _check_inputs(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None,
        y: torch.Tensor | None,
        text_embeds: torch.Tensor | None,
        time_ids: torch.Tensor | None,
    ) -> None:
        c = self.config
        added = text_embeds is not None or time_ids is not None
        if c.adm_in_channels is not None and (text_embeds is None or time_ids is None):
            raise UNetInputError(
                f"UNetModel: config.adm_in_channels={c.adm_in_channels} (SDXL added conditioning), so pass "
                "text_embeds (B, P) (the pooled text embedding) and time_ids (B, N) (size and crop micro-conditioning)"
            )
        if c.adm_in_channels is None and added:
            raise UNetInputError("UNetModel: got text_embeds/time_ids but config.adm_in_channels is None; drop them")
        if c.num_classes is not None and y is None:
            raise UNetInputError(f"UNetModel: config.num_classes={c.num_classes}, so pass class labels y of shape (B,)")
        if c.num_classes is None and y is not None:
            raise UNetInputError("UNetModel: got class labels y but config.num_classes is None; drop y")
        if c.context_dim is not None and context is None:
            raise UNetInputError(
                f"UNetModel: config.context_dim={c.context_dim}, so pass context (B, T, {c.context_dim}); "
                "for unconditional guidance pass the empty-prompt embedding"
            )
        if c.context_dim is None and context is not None:
            raise UNetInputError("UNetModel: got a context but config.context_dim is None; drop context")
        if torch.jit.is_tracing():
            return  # shapes are symbolic while exporting; the checks below would freeze them
        f = c.downsampling_factor
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise UNetInputError(
                f"UNetModel: x must be (B, {c.in_channels}, H, W) with H and W multiples of {f}, "
                f"got {tuple(x.shape)}; pad or resize the latent"
            )
        if timesteps.numel() not in (1, x.shape[0]):
            raise UNetInputError(
                f"UNetModel: timesteps must be a scalar or have one entry per sample ({x.shape[0]}), "
                f"got shape {tuple(timesteps.shape)}"
            )
        if context is not None and (context.ndim != 3 or context.shape[-1] != c.context_dim):
            raise UNetInputError(
                f"UNetModel: context must be (B, T, {c.context_dim}), got {tuple(context.shape)}"
            )
        if text_embeds is not None and time_ids is not None:
            b, d = x.shape[0], c.addition_time_embed_dim
            if (
                text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[0] != b or time_ids.shape[0] != b
                or text_embeds.shape[1] + time_ids.shape[1] * d != c.adm_in_channels
            ):
                raise UNetInputError(
                    f"UNetModel: text_embeds (B, P) and time_ids (B, N) with B = {b} and P + N * {d} = "
                    f"{c.adm_in_channels} (adm_in_channels), got {tuple(text_embeds.shape)} and {tuple(time_ids.shape)}"
                )

    def _check_timestep_cond(self, x: torch.Tensor, timestep_cond: torch.Tensor | None) -> None:
        d = self.config.time_cond_proj_dim
        if d is None and timestep_cond is not None:
            raise UNetInputError("UNetModel: got timestep_cond but config.time_cond_proj_dim is None; drop it")
        if d is not None and timestep_cond is None:
            raise UNetInputError(
                f"UNetModel: config.time_cond_proj_dim={d} (an LCM-distilled UNet), so pass timestep_cond (B, {d}): "
                "the guidance scale's w-embedding"
            )
        if timestep_cond is not None and not torch.jit.is_tracing() and tuple(timestep_cond.shape) != (x.shape[0], d):
            raise UNetInputError(f"UNetModel: timestep_cond must be (B, {d}) with B = {x.shape[0]}, got {tuple(timestep_cond.shape)}")

    def embedding(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None,
        y: torch.Tensor | None,
        text_embeds: torch.Tensor | None,
        time_ids: torch.Tensor | None,
        timestep_cond: torch.Tensor | None,
    ) -> torch.Tensor:
        """Check the inputs and embed what every ResBlock adds: the timestep (plus an LCM's w-embedding), and
        class labels or SDXL's vector condition -> emb (B, 4*C). Shared with the ControlNet's encoder copy."""
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.tensor(timesteps, device=x.device)
        self._check_inputs(x, timesteps, context, y, text_embeds, time_ids)
        self._check_timestep_cond(x, timestep_cond)
        timesteps = timesteps.reshape(-1).expand(x.shape[0])  # (B,); a scalar or (1,) is broadcast
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(x.dtype)  # (B, C)
        if timestep_cond is not None:
            t_emb = t_emb + self.time_cond_proj(timestep_cond.to(x.dtype))  # (B, C), diffusers' TimestepEmbedding
        emb = self.time_embed(t_emb)  # (B, 4*C)
        if self.config.num_classes is not None:
            emb = emb + self.label_emb(y)  # (B, 4*C)
        elif text_embeds is not None and time_ids is not None:
            emb = emb + self.label_emb(self.added_condition(text_embeds, time_ids).to(emb.dtype))  # (B, 4*C)
        return emb

    def _check_residuals(self, down: Sequence[torch.Tensor] | None, mid: torch.Tensor | None) -> None:
        if (down is None) != (mid is None):
            raise UNetInputError(
                "UNetModel: pass both down_block_additional_residuals and mid_block_additional_residual "
                "(a ControlNet's outputs) or neither"
            )
        if down is not None and len(down) != len(self.input_blocks):
            raise UNetInputError(
                f"UNetModel: down_block_additional_residuals needs one tensor per input block "
                f"({len(self.input_blocks)}), got {len(down)}; the ControlNet was made for another base model"
            )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """text_embeds (B, P) and time_ids (B, N): SDXL's added conditioning (diffusers' `added_cond_kwargs`),
        required exactly when config.adm_in_channels is set. timestep_cond (B, time_cond_proj_dim): an LCM's
        guidance-scale embedding, required exactly when config.time_cond_proj_dim is set.
        down_block_additional_residuals (one per input block, shaped as its output) and
        mid_block_additional_residual (shaped as the middle block's output): a ControlNet's residuals
        (reference/controlnet.py), added to the skip connections and the middle block's output as diffusers does."""
        emb = self.embedding(x, timesteps, context, y, text_embeds, time_ids, timestep_cond)
        self._check_residuals(down_block_additional_residuals, mid_block_additional_residual)

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]  # the skips only, not h
        h = self.middle_block(h, emb, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = block(h, emb, context)
        return self.out(h)
