"""Euler ancestral sampling (k-diffusion `sample_euler_ancestral`; Karras et al. 2022 Alg. 2 with the
ancestral split of Song et al. 2021), diffusers' EulerAncestralDiscreteScheduler."""

from __future__ import annotations

import numpy as np

from .base import Draw, Scheduler, SigmaRun, x0_from_sigma
from .sigmas import interpolated_sigmas


class EulerAncestralScheduler(Scheduler):
    """Euler step down to sigma_down, then fresh noise of size sigma_up."""

    name = "euler-a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    prediction_types = ("epsilon", "v_prediction")  # diffusers raises for "sample"
    terminal_alpha_bar_floor = True

    @property
    def is_stochastic(self) -> bool:
        return True

    def _make_run(self, num_inference_steps: int) -> EulerAncestralRun:
        timesteps, sigmas = interpolated_sigmas(self.config, self.alphas_cumprod, num_inference_steps)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return EulerAncestralRun(self, timesteps, num_inference_steps, sigmas)


class EulerAncestralRun(SigmaRun):
    def _step(
        self, m: np.ndarray, g: int, k: int, x: np.ndarray, draw: Draw, predicted_variance: np.ndarray | None
    ) -> np.ndarray:
        """sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2), sigma_down = sqrt(s'^2 - sigma_up^2) for s -> s';
        x' = x + (sigma_down - s) (x - D(x; s)) / s + sigma_up z."""
        # 1. sigma_i -> sigma_{i+1} split into a deterministic part and fresh noise
        s, s_next = np.float64(self.sigmas[g]), np.float64(self.sigmas[g + 1])
        sigma_up = np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        sigma_down = np.sqrt(max(s_next**2 - sigma_up**2, 0.0))  # = s'^2 / s; max() guards rounding
        # 2. denoised D(x; s) and the ODE derivative
        x0 = x0_from_sigma(self.config.prediction_type, m, x, s)
        d = (x - x0) / s
        # 3. Euler step to sigma_down, then noise up to sigma_{i+1}; the last step (sigma_up = 0) draws none
        prev = x + d * (sigma_down - s)
        if sigma_up > 0:
            prev = prev + draw() * sigma_up
        return prev

