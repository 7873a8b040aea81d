"""First-stage autoencoders of latent diffusion (Rombach et al., CVPR 2022, Sec. 3.1 and Appendix G).

The encoder E maps an image x (B, 3, H, W) to a latent z (B, c, H/f, W/f), the decoder D maps it back;
f = 2 ** (len(ch_mult) - 1). Two regularisers: a slight KL penalty towards N(0, I) ("KL-reg.",
`AutoencoderKL`) or a vector quantisation layer absorbed into the decoder ("VQ-reg.", `VQModel`).

The module tree reproduces `ldm/modules/diffusionmodules/model.py` of the original code, so parameter
names equal the keys of a Stable Diffusion checkpoint with the `first_stage_model.` prefix removed
(`encoder.down.0.block.0.norm1.weight`, `decoder.mid.attn_1.q.weight`, `quant_conv.weight`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import AutoencoderConfig, ConfigError
from .quantizer import VectorQuantizer


def Normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm(eps 1e-6), the normalisation of every block of the original autoencoder (32 groups there;
    diffusers' `norm_num_groups`)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016) without time embedding: norm-swish-conv twice."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32) -> None:
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # A 1x1 conv matches channel counts on the skip path ("network-in-network" shortcut).
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all h*w positions (Vaswani et al. 2017, eq. 1), with
    q, k, v and the output projection as 1x1 convolutions, as in the original checkpoints."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        channels = h.shape[1]
        # Scale q before the product (not the scores after it) so fp16 scores stay in range.
        q = self.q(h).flatten(2).transpose(1, 2) * channels**-0.5  # (B, hw, C)
        k = self.k(h).flatten(2)  # (B, C, hw)
        v = self.v(h).flatten(2)  # (B, C, hw)
        scores = torch.bmm(q, k)  # (B, hw_query, hw_key)
        # Softmax in fp32: the VAE's attention is a known fp16 overflow spot; a no-op in fp32.
        weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.bmm(v, weights.transpose(1, 2))  # (B, C, hw_query)
        return x + self.proj_out(out.reshape(x.shape))  # (B, C, h, w)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric zero padding (right and bottom by one), as in the original."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock - AttnBlock - ResnetBlock at the lowest resolution (names block_1, attn_1, block_2)."""

    def __init__(self, channels: int, dropout: float, groups: int = 32) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: residual blocks, each optionally followed by attention, then a resampler.

    Holds `block`, `attn` and `downsample` (encoder) or `upsample` (decoder), the original key names.
    """

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int, use_attn: bool, dropout: float, groups: int = 32
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(num_blocks):
            self.block.append(ResnetBlock(in_channels, out_channels, dropout, groups))
            in_channels = out_channels
            if use_attn:
                self.attn.append(AttnBlock(out_channels, groups))

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


def _level_has_attn(config: AutoencoderConfig, level: int) -> bool:
    # attn_resolutions lists feature-map sizes for an input of `resolution` pixels, as in the LDM YAML.
    return config.resolution // 2**level in config.attn_resolutions


class Encoder(nn.Module):
    """E: image (B, in_channels, H, W) -> (B, 2*z_channels or z_channels, H/f, W/f)."""

    def __init__(self, config: AutoencoderConfig, double_z: bool = True) -> None:
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        self.conv_in = nn.Conv2d(config.in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, m in enumerate(mult):
            down = Level(
                block_in, ch * m, config.num_res_blocks, _level_has_attn(config, level), config.dropout, config.norm_num_groups
            )
            block_in = ch * m
            if level != len(mult) - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = MidBlock(block_in, config.dropout, config.norm_num_groups)
        self.norm_out = Normalize(block_in, config.norm_num_groups)
        out_channels = 2 * config.z_channels if double_z else config.z_channels
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            h = down.run_blocks(h)
            if level != len(self.down) - 1:
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """D: latent (B, z_channels, h, w) -> image (B, out_ch, f*h, f*w).

    `up[i]` is resolution level i (up[0] the full-resolution one), built and run from the last level,
    so keys match the encoder's `down[i]`; each level has num_res_blocks + 1 residual blocks.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(block_in, config.dropout, config.norm_num_groups)
        levels: list[Level] = []
        for level in reversed(range(len(mult))):
            up = Level(
                block_in, ch * mult[level], config.num_res_blocks + 1, _level_has_attn(config, level), config.dropout,
                config.norm_num_groups,
            )
            block_in = ch * mult[level]
            if level != 0:
                up.upsample = Upsample(block_in)
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in, config.norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            h = self.up[level].run_blocks(h)
            if level != 0:
                h = self.up[level].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """The KL autoencoder's posterior q(z|x) = N(mean, diag(exp(logvar))) (Kingma & Welling 2014)."""

    def __init__(self, moments: torch.Tensor) -> None:
        """moments (B, 2c, h, w): mean and log-variance stacked on channels, as the encoder emits them."""
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)  # (B, c, h, w) each
        # Clamp as the original does, so exp() stays finite for untrained or extreme inputs.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample mean + std * eps; eps drawn on the generator's device so a CPU
        generator gives the same sample whatever device the model is on."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions: (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (LDM paper Sec. 3.1): encoder -> quant_conv gives (mean, logvar) of
    q(z|x); post_quant_conv -> decoder reconstructs."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        if config.kind != "kl":
            raise ConfigError(f"AutoencoderKL needs an AutoencoderConfig with kind 'kl', got {config.kind!r}; use VQModel")
        self.config = config
        self.encoder = Encoder(config, double_z=True)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) in [-1, 1] -> posterior parameters (B, 2*embed_dim, H/f, W/f): mean then
        logvar (unclamped). What the ONNX encoder exports: deterministic, no sampling inside."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.encode_moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (B, embed_dim, h, w) -> image (B, out_ch, f*h, f*w), not clamped."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VQModel(nn.Module):
    """VQ-regularised autoencoder (LDM paper Sec. 3.1): the diffusion model works on the continuous
    pre-quantisation latents h; quantisation is "absorbed into the decoder" and happens in decode()."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        if config.kind != "vq":
            raise ConfigError(f"VQModel needs an AutoencoderConfig with kind 'vq', got {config.kind!r}; use AutoencoderKL")
        self.config = config
        self.encoder = Encoder(config, double_z=False)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, kernel_size=1)
        # Named `quantize` for the checkpoint keys; calling it returns (quant, commitment_loss, indices).
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, beta=config.beta)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> pre-quantisation latents h (B, embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) -> image; quantises first unless force_not_quantize."""
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices (B, h, w) -> image."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(indices)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (reconstruction, commitment loss)."""
        quant, qloss, _ = self.quantize(self.encode(x))
        return self.decoder(self.post_quant_conv(quant)), qloss
