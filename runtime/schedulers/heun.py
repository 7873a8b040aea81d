"""Heun's second-order sampler of the probability-flow ODE (Karras et al. 2022, Algorithm 1 without
churn), diffusers' HeunDiscreteScheduler: two model evaluations per step, as two entries of the run.

Every sigma after the first appears twice in the run, timesteps [t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}]
(2n - 1 model calls) and sigmas [s_0, s_1, s_1, ..., s_{n-1}, s_{n-1}, 0]: entry 2j is an Euler step from
s_j to s_{j+1}, entry 2j + 1 evaluates the model there and redoes that step with the mean of both slopes.
The last step (to sigma 0) stays an Euler step, as in the paper.
"""

from __future__ import annotations

import numpy as np

from .base import Draw, Scheduler, TwoStageRun, x0_from_sigma
from .sigmas import discrete_sigmas


class HeunScheduler(Scheduler):
    """Heun steps in sigma (2nd order, two model calls per step); optional Karras sigmas."""

    name = "heun"
    karras_variant = True  # heun-karras: diffusers' class with use_karras_sigmas
    diffusers_class = "HeunDiscreteScheduler"
    # diffusers' from_config drops the option and samples a schedule the model was not trained on.
    zero_snr_obstacle = "diffusers' HeunDiscreteScheduler has no rescale_betas_zero_snr option, so there is no such Heun to match"

    def _make_run(self, num_inference_steps: int) -> HeunRun:
        timesteps, sigmas = discrete_sigmas(self.config, self.alphas_cumprod, num_inference_steps, config_range=False)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])  # (2n,)
        timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])  # (2n - 1,)
        return HeunRun(self, timesteps, num_inference_steps, sigmas)


class HeunRun(TwoStageRun):
    def _first(self, m: np.ndarray, g: int, x: np.ndarray, draw: Draw) -> tuple[np.ndarray, tuple]:
        """Euler: x_{j+1}' = x_j + (s_{j+1} - s_j) d_j, keeping (x_j, d_j, s_{j+1} - s_j)."""
        sigma = np.float64(self.sigmas[g])  # s_j
        d = (x - self._x0(m, x, sigma)) / sigma
        dt = np.float64(self.sigmas[g + 1]) - sigma
        return x + d * dt, (x, d, dt)

    def _second(self, m: np.ndarray, g: int, x: np.ndarray, pending: tuple, draw: Draw) -> np.ndarray:
        """Heun: x_{j+1} = x_j + (s_{j+1} - s_j) (d_j + d'_{j+1}) / 2, with d' at the Euler estimate."""
        sigma = np.float64(self.sigmas[g])  # s_{j+1}, where the Euler estimate x is
        d = (x - self._x0(m, x, sigma)) / sigma
        x_j, d_j, dt = pending
        return x_j + (d_j + d) / 2 * dt

    def _x0(self, m: np.ndarray, x: np.ndarray, sigma: float) -> np.ndarray:
        c = self.config
        x0 = x0_from_sigma(c.prediction_type, m, x, sigma)
        return np.clip(x0, -c.clip_sample_range, c.clip_sample_range) if c.clip_sample else x0
