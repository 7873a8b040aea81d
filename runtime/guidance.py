"""Classifier-free guidance (Ho & Salimans 2022, eq. 6) as the manifest's GUIDANCE convention states it:
one batched UNet call of 2B rows ordered [uncond, cond]; guidance 1.0 runs the conditional half only."""

from __future__ import annotations

import numpy as np

from .manifest import GUIDANCE

SKIP_AT = float(GUIDANCE["skip_uncond_when_guidance_is"])


def uses_uncond(guidance: float) -> bool:
    return float(guidance) != SKIP_AT


def double(x: np.ndarray) -> np.ndarray:
    """(B, ...) -> (2B, ...): the same rows for the unconditional and the conditional half."""
    return np.concatenate([x, x], axis=0)


def combine(out: np.ndarray, guidance: float) -> np.ndarray:
    """(2B, ...) UNet output [uncond, cond] -> (B, ...): eps_u + w * (eps_c - eps_u)."""
    eps_uncond, eps_cond = np.split(out, 2, axis=0)
    return eps_uncond + np.float32(guidance) * (eps_cond - eps_uncond)
