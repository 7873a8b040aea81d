"""What the few-step parity tests (tests/test_fewstep_*.py) share: the unit latents both sides start from, diffusers'
noise source patched to draw from a numpy generator (ours draws from one), and diffusers' float images as 8-bit."""

from __future__ import annotations

import numpy as np


def unit_latents(seed: int, size: int, channels: int = 4, factor: int = 2) -> np.ndarray:
    """(1, channels, size // factor, size // factor) float32 standard normal: the `latents=` of both pipelines."""
    return np.random.default_rng(seed).standard_normal((1, channels, size // factor, size // factor), dtype=np.float32)


def patch_numpy_noise(monkeypatch, module: str, rng: np.random.Generator) -> None:
    """Make `module`'s randn_tensor (diffusers' one noise source) draw float32 standard normals from `rng`, in call
    order: the draws our runtime takes from its generator (docs/sampler_spec.md)."""
    import torch

    def numpy_noise(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(dtype or torch.float32)

    monkeypatch.setattr(f"{module}.randn_tensor", numpy_noise)


def image_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers' output_type="np" images (floats in [0, 1]) as the 8-bit images we write."""
    return np.round(images * 255).astype(np.uint8)
