"""ControlNet: a trainable copy of the UNet's encoder that steers a frozen UNet with a control image.

Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models" (ICCV 2023), Sec. 3.2-3.3:
the copy of the time embedding, input blocks and middle block (built by reference/unet.py's UNetModel with
`encoder_only=True`, so the blocks are the UNet's own classes), a small conditioning-image encoder E(c)
(`input_hint_block`: 3x3 convolutions with SiLU, stride 2 between widths) whose output is added after the first
convolution, and one zero-initialised 1x1 convolution per input block (`zero_convs`) and after the middle block
(`middle_block_out`). The outputs are the residuals the UNet adds to its skip connections and middle block
(UNetModel.forward's `down_block_additional_residuals`, `mid_block_additional_residual`).

Attribute names reproduce the original `cldm` checkpoint keys (`control_model.` stripped), so an original
single file loads without renaming; reference/keymap_controlnet.py maps diffusers' `ControlNetModel` layout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ldm_rt.runtime.controlnet import GUESS_MODE_FIRST_SCALE_LOG10

from .configs import ConfigError, ControlNetConfig, UNetConfig
from .unet import UNetInputError, UNetModel


class ResidualLayout(NamedTuple):
    """(channels, downsampling factor) of each residual: one per input block, then the middle block's."""

    down: tuple[tuple[int, int], ...]
    mid: tuple[int, int]


def residual_layout(config: UNetConfig) -> ResidualLayout:
    """The residuals a ControlNet with this encoder gives, which are the skip connections a UNet with this
    config takes: input block 0 (the first convolution), each ResBlock (+ transformer), each Downsample."""
    down = [(config.model_channels, 1)]
    factor = 1
    for level, mult in enumerate(config.channel_mult):
        down += [(mult * config.model_channels, factor)] * config.num_res_blocks
        if level != len(config.channel_mult) - 1:
            factor *= 2
            down.append((mult * config.model_channels, factor))
    return ResidualLayout(tuple(down), (config.channel_mult[-1] * config.model_channels, factor))


def check_controlnet_fits(controlnet: ControlNetConfig, unet: UNetConfig) -> None:
    """ConfigError naming the first difference that stops this ControlNet's residuals from fitting this UNet."""
    ours, theirs = residual_layout(controlnet.unet), residual_layout(unet)
    if ours != theirs:
        raise ConfigError(
            f"the ControlNet gives {len(ours.down)} residuals of {[c for c, _ in ours.down]} channels (middle "
            f"{ours.mid[0]}) but the UNet's skip connections are {len(theirs.down)} of {[c for c, _ in theirs.down]} "
            f"(middle {theirs.mid[0]}): it was made for another base model; use a ControlNet trained for this one"
        )
    if controlnet.unet.context_dim != unet.context_dim:
        raise ConfigError(
            f"the ControlNet cross-attends to {controlnet.unet.context_dim}-wide text embeddings but the UNet to "
            f"{unet.context_dim}: it was made for another base model (SD 1.x: 768, SD 2.x: 1024, SDXL: 2048)"
        )
    if controlnet.unet.adm_in_channels != unet.adm_in_channels:
        raise ConfigError(
            f"the ControlNet's added conditioning is {controlnet.unet.adm_in_channels} wide but the UNet's "
            f"{unet.adm_in_channels}: it was made for another base model (only SDXL ControlNets take text_embeds/time_ids)"
        )


def guess_mode_scales(count: int) -> torch.Tensor:
    """(count,) scales 0.1 .. 1.0, evenly spaced in log10, as diffusers' guess mode (torch.logspace(-1, 0, n));
    the constant is the runtime's (runtime/controlnet.py), which applies the same scales to exported residuals."""
    return torch.logspace(GUESS_MODE_FIRST_SCALE_LOG10, 0.0, count)


def _conv(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)


class ControlNetModel(UNetModel):
    """ControlNet residuals from (x, t, context, control image); `config` is the encoder's UNetConfig (as
    UNetModel's checks read it), `controlnet_config` the whole ControlNetConfig."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__(config.unet, encoder_only=True)
        self.controlnet_config = config
        widths = config.hint_block_channels
        layers: list[nn.Module] = [_conv(config.hint_channels, widths[0]), nn.SiLU()]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [_conv(c_in, c_in), nn.SiLU(), _conv(c_in, c_out, stride=2), nn.SiLU()]
        layers.append(_conv(widths[-1], config.unet.model_channels))  # a zero convolution when trained from scratch
        self.input_hint_block = nn.Sequential(*layers)
        layout = residual_layout(config.unet)
        # Sequential(conv) keeps the original keys `zero_convs.N.0.*` and `middle_block_out.0.*`.
        self.zero_convs = nn.ModuleList(nn.Sequential(_conv(c, c, kernel=1)) for c, _ in layout.down)
        self.middle_block_out = nn.Sequential(_conv(layout.mid[0], layout.mid[0], kernel=1))

    def _check_control_image(self, x: torch.Tensor, control_image: torch.Tensor) -> None:
        if torch.jit.is_tracing():
            return  # shapes are symbolic while exporting
        f, c = self.controlnet_config.hint_factor, self.controlnet_config.hint_channels
        b, _, h, w = x.shape
        if control_image.ndim != 4 or control_image.shape[0] not in (1, b) or tuple(control_image.shape[1:]) != (c, h * f, w * f):
            raise UNetInputError(
                f"ControlNetModel: control_image must be (B, {c}, {h * f}, {w * f}) (the latent's size times {f}) "
                f"with B = {b} or 1, got {tuple(control_image.shape)}; resize the control image to the output size"
            )

    def residuals(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None,
        control_image: torch.Tensor,
        y: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The unscaled residuals: (one per input block, shaped as its output; the middle block's)."""
        emb = self.embedding(x, timesteps, context, y, text_embeds, time_ids, timestep_cond)  # (B, 4*C)
        self._check_control_image(x, control_image)
        hint = self.input_hint_block(control_image.to(x.dtype))  # (B, C, H, W): E(c), the latent's size
        down = []
        h = x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + hint  # after the first convolution, as cldm and diffusers add it
            down.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        return down, self.middle_block_out(h)

    def scale(
        self,
        down: list[torch.Tensor],
        mid: torch.Tensor,
        conditioning_scale: float | torch.Tensor = 1.0,
        guess_mode: bool = False,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Multiply the residuals by the conditioning scale (a float, or a tensor of one value or one per
        sample), in guess mode also by guess_mode_scales; average them over H, W for a pooling ControlNet."""
        if isinstance(conditioning_scale, torch.Tensor):
            conditioning_scale = conditioning_scale.to(mid.dtype).reshape(-1, 1, 1, 1)  # (1 or B, 1, 1, 1)
        if guess_mode and not self.controlnet_config.global_average_pooling:
            steps = guess_mode_scales(len(down) + 1).to(mid.device, mid.dtype)
            scales = [steps[k] * conditioning_scale for k in range(len(down) + 1)]
        else:
            scales = [conditioning_scale] * (len(down) + 1)
        down = [r * s for r, s in zip(down, scales)]
        mid = mid * scales[-1]
        if self.controlnet_config.global_average_pooling:
            down = [r.mean(dim=(2, 3), keepdim=True) for r in down]  # (B, C, 1, 1)
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None,
        control_image: torch.Tensor,
        conditioning_scale: float | torch.Tensor = 1.0,
        guess_mode: bool = False,
        y: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B, in_channels, H, W), control_image (B or 1, hint_channels, H * hint_factor, W * hint_factor) in
        [0, 1] -> (down residuals, mid residual), scaled; diffusers' ControlNetModel(..., return_dict=False)."""
        down, mid = self.residuals(x, timesteps, context, control_image, y, text_embeds, time_ids, timestep_cond)
        return self.scale(down, mid, conditioning_scale, guess_mode)


def sum_residuals(
    outputs: list[tuple[list[torch.Tensor], torch.Tensor]],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Several ControlNets' (down, mid) summed residual by residual, as diffusers' MultiControlNetModel does."""
    down, mid = outputs[0]
    for other_down, other_mid in outputs[1:]:
        down = [a + b for a, b in zip(down, other_down)]
        mid = mid + other_mid
    return down, mid


__all__ = [
    "ControlNetConfig",
    "ControlNetModel",
    "ResidualLayout",
    "check_controlnet_fits",
    "guess_mode_scales",
    "residual_layout",
    "sum_residuals",
]
