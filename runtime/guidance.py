"""Classifier-free guidance (Ho & Salimans 2022, eq. 6) as the manifest's GUIDANCE convention states it:
one batched UNet call of 2B rows ordered [uncond, cond]; guidance <= 1.0 runs the conditional half only (as
diffusers, whose guidance is on only above 1: SDXL-Turbo and SD-Turbo sample at guidance 0).

Guidance rescale (Lin et al., WACV 2024, Sec. 3.4; diffusers' `guidance_rescale`) optionally pulls the guided
prediction back to the spread of the conditional one: at high guidance the guided output's standard deviation
grows past anything the model was trained to produce, which over-exposes images, most of all on models with a
zero-terminal-SNR schedule such as the shipped default model."""

from __future__ import annotations

import numpy as np

from .manifest import GUIDANCE

SKIP_AT_MOST = float(GUIDANCE["skip_uncond_when_guidance_at_most"])


def uses_uncond(guidance: float) -> bool:
    return float(guidance) > SKIP_AT_MOST


def double(x: np.ndarray) -> np.ndarray:
    """(B, ...) -> (2B, ...): the same rows for the unconditional and the conditional half."""
    return np.concatenate([x, x], axis=0)


def combine(out: np.ndarray, guidance: float, rescale: float = 0.0) -> np.ndarray:
    """(2B, ...) UNet output [uncond, cond] -> (B, ...): g = eps_u + w * (eps_c - eps_u); with rescale r > 0,
    r * g * std(eps_c) / std(g) + (1 - r) * g, the standard deviations per row (sample std, as diffusers)."""
    eps_uncond, eps_cond = np.split(out, 2, axis=0)
    guided = eps_uncond + np.float32(guidance) * (eps_cond - eps_uncond)
    if not rescale:
        return guided
    axes = tuple(range(1, out.ndim))
    std_guided = guided.std(axis=axes, ddof=1, keepdims=True)
    std_cond = eps_cond.std(axis=axes, ddof=1, keepdims=True)
    # A row whose guided output is constant has no spread to match; it is left as it is (ratio 1).
    ratio = np.divide(std_cond, std_guided, out=np.ones_like(std_guided), where=std_guided > 0)
    return (guided * (np.float32(rescale) * ratio + np.float32(1.0 - rescale))).astype(np.float32)
