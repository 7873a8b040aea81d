"""Euler sampler of the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn),
diffusers' EulerDiscreteScheduler."""

from __future__ import annotations

import numpy as np

from .base import Draw, Scheduler, SigmaRun, x0_from_sigma
from .config import train_sigmas
from .sigmas import discrete_sigmas


class EulerScheduler(Scheduler):
    """Deterministic Euler steps in sigma; optional Karras sigmas and a sigma_min tail."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    terminal_alpha_bar_floor = True

    def _make_run(self, num_inference_steps: int) -> EulerRun:
        c = self.config
        timesteps, sigmas = discrete_sigmas(c, self.alphas_cumprod, num_inference_steps, config_range=True)
        if c.final_sigmas_type == "sigma_min":
            sigma_last = float(train_sigmas(self.alphas_cumprod)[0])
        else:
            sigma_last = 0.0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        return EulerRun(self, timesteps, num_inference_steps, sigmas)


class EulerRun(SigmaRun):
    def _step(
        self, m: np.ndarray, g: int, k: int, x: np.ndarray, draw: Draw, predicted_variance: np.ndarray | None
    ) -> np.ndarray:
        """Karras et al. 2022 Alg. 2 with S_churn = 0: d_i = (x_i - D(x_i; sigma_i)) / sigma_i,
        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i."""
        # 1. sigma_i, sigma_{i+1}
        sigma, sigma_next = np.float64(self.sigmas[g]), np.float64(self.sigmas[g + 1])
        # 2. denoised D(x_i; sigma_i)
        x0 = x0_from_sigma(self.config.prediction_type, m, x, sigma)
        # 3. ODE derivative d_i and the Euler step
        d = (x - x0) / sigma
        return x + d * (sigma_next - sigma)
