"""Classifier-free guidance and guidance rescale (runtime/guidance.py) against the formulas, and guidance
rescale against diffusers' rescale_noise_cfg (a test-only oracle) on the same arrays."""

from __future__ import annotations

import numpy as np
import pytest

from ldm_rt.runtime import guidance as cfg


def rows(seed: int = 0) -> np.ndarray:
    """(2B, C, h, w) UNet output [uncond, cond] whose halves differ in scale, so rescale has work to do."""
    rng = np.random.default_rng(seed)
    uncond = rng.standard_normal((3, 4, 8, 8), dtype=np.float32)
    cond = 1.5 * rng.standard_normal((3, 4, 8, 8), dtype=np.float32) + 0.1
    return np.concatenate([uncond, cond])


def test_plain_guidance_is_the_cfg_formula_and_rescale_zero_changes_nothing():
    out = rows()
    expected = out[:3] + np.float32(7.5) * (out[3:] - out[:3])
    np.testing.assert_array_equal(cfg.combine(out, 7.5), expected)
    np.testing.assert_array_equal(cfg.combine(out, 7.5, 0.0), expected)


def test_full_rescale_gives_each_row_the_conditional_spread():
    out = rows(1)
    guided = cfg.combine(out, 7.5, 1.0)
    assert guided.dtype == np.float32 and guided.shape == (3, 4, 8, 8)
    np.testing.assert_allclose(guided.std(axis=(1, 2, 3), ddof=1), out[3:].std(axis=(1, 2, 3), ddof=1), rtol=1e-5)
    # ... and not by accident: plain guidance at 7.5 spreads far wider.
    assert np.all(cfg.combine(out, 7.5).std(axis=(1, 2, 3)) > 2 * out[3:].std(axis=(1, 2, 3)))


def test_a_row_with_no_spread_is_left_alone():
    out = rows(2)
    out[0] = out[3] = 0.25  # uncond == cond == constant: the guided row is that constant, std 0
    guided = cfg.combine(out, 5.0, 0.7)
    assert np.all(np.isfinite(guided)) and np.all(guided[0] == np.float32(0.25))


@pytest.mark.parametrize("rescale", [0.3, 0.7, 1.0])
def test_rescale_matches_diffusers(rescale):
    torch = pytest.importorskip("torch")
    sd = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    out = rows(3)
    plain = cfg.combine(out, 6.0)
    theirs = sd.rescale_noise_cfg(torch.from_numpy(plain), torch.from_numpy(out[3:]), guidance_rescale=rescale).numpy()
    np.testing.assert_allclose(cfg.combine(out, 6.0, rescale), theirs, rtol=1e-5, atol=1e-6)
