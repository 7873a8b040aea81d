"""Perceptual distance for the autoencoder loss: LPIPS without its learned channel weights (Zhang et al.,
CVPR 2018, eq. 1 with w_l = 1, the paper's "baseline" VGG distance), on our own VGG16 feature stack.

The stack reproduces torchvision's `vgg16().features` up to relu5_3 with the same indices, so the keys of
a torchvision VGG16 state dict (`features.0.weight`, ..., `features.28.bias`) load as they are; other keys
(`classifier.*`) are ignored. Weights come from a local file only (safetensors, or a .pth read with
`torch.load(weights_only=True)`); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

# torchvision's VGG16 configuration "D": channels of each 3x3 conv, "M" a 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the LPIPS taps.
TAPS = (3, 8, 15, 22, 29)
# LPIPS' ScalingLayer: maps [-1, 1] images to the ImageNet-normalised input VGG was trained on.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class PerceptualWeightsError(ValueError):
    """The VGG16 weights file is missing or does not fit; the message names the file and the key."""


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_channels = int(item)
    return nn.Sequential(*layers)


def read_vgg16_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise PerceptualWeightsError(f"perceptual weights file {path} does not exist; fix perceptual_weights or set it to null")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch.load raise several types for a bad file
        raise PerceptualWeightsError(f"cannot read perceptual weights {path} ({e}); give a VGG16 state dict file") from None


class VGGPerceptualLoss(nn.Module):
    """d(x, y) = sum_l mean_hw || n(f_l(x)) - n(f_l(y)) ||^2, n = unit length over channels; frozen."""

    def __init__(self, weights: dict[str, torch.Tensor], where: str = "weights") -> None:
        super().__init__()
        self.features = vgg16_features()
        own = self.features.state_dict()
        state = {}
        for key, expected in own.items():
            full = f"features.{key}"
            if full not in weights:
                raise PerceptualWeightsError(f"{where}: key {full} is missing; give a torchvision VGG16 state dict")
            if weights[full].shape != expected.shape:
                raise PerceptualWeightsError(f"{where}: {full} has shape {tuple(weights[full].shape)}, expected {tuple(expected.shape)}")
            state[key] = weights[full].float()
        self.features.load_state_dict(state)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> VGGPerceptualLoss:
        return cls(read_vgg16_weights(path), where=str(path))

    def train(self, mode: bool = True) -> VGGPerceptualLoss:
        return super().train(False)  # always frozen: no dropout/batch-norm here, but stay explicit

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features[: TAPS[-1] + 1]):
            h = layer(h)
            if i in TAPS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> distance per image (B,)."""
        total = x.new_zeros(x.shape[0])
        for fx, fy in zip(self.taps(x), self.taps(y)):
            nx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + (nx - ny).pow(2).sum(dim=1).mean(dim=(1, 2))  # (B,)
        return total
