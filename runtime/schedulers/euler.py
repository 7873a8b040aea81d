"""Euler sampler of the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn),
diffusers' EulerDiscreteScheduler."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Draw, Scheduler, SchedulerRun, x0_from_sigma
from .config import SchedulerConfig, spaced_timesteps, train_sigmas
from .sigmas import karras_sigmas, sigma_to_t


def interpolated_sigmas(scheduler: Scheduler, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of the spaced float timesteps, sigma read off the training table by linear
    interpolation in t (float64, before the tail is appended)."""
    timesteps = spaced_timesteps(scheduler.config, num_inference_steps, round_linspace=False).astype(np.float32)
    sigmas = train_sigmas(scheduler.alphas_cumprod)
    return timesteps, np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def sigma_run_init_noise(config: SchedulerConfig, sigmas: np.ndarray) -> float:
    """x_T = sigma_max * N(0, I) for linspace/trailing, sqrt(sigma_max^2 + 1) for leading (diffusers' rule:
    leading never reaches t = T - 1, so the first sample is treated as VP-scaled)."""
    sigma_max = float(np.max(sigmas))
    if config.timestep_spacing in ("linspace", "trailing"):
        return sigma_max
    return float(np.sqrt(np.float32(sigma_max) ** 2 + 1))


class EulerScheduler(Scheduler):
    """Deterministic Euler steps in sigma; optional Karras sigmas and a sigma_min tail."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    terminal_alpha_bar_floor = True

    def _make_run(self, num_inference_steps: int) -> EulerRun:
        c = self.config
        timesteps, sigmas = interpolated_sigmas(self, num_inference_steps)
        if c.use_karras_sigmas:
            sigma_min = c.sigma_min if c.sigma_min is not None else float(sigmas[-1])
            sigma_max = c.sigma_max if c.sigma_max is not None else float(sigmas[0])
            sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas(self.alphas_cumprod))).astype(np.float32)
        if c.final_sigmas_type == "sigma_min":
            sigma_last = float(train_sigmas(self.alphas_cumprod)[0])
        else:
            sigma_last = 0.0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        return EulerRun(self, timesteps, num_inference_steps, sigmas)


class SigmaRun(SchedulerRun):
    """A run over a sigma table (n + 1 entries, the last one the tail after the final step)."""

    def __init__(self, scheduler: Scheduler, timesteps: np.ndarray, num_inference_steps: int, sigmas: np.ndarray):
        super().__init__(scheduler, timesteps, num_inference_steps)
        self.sigmas = sigmas.copy()
        self.sigmas.flags.writeable = False

    @property
    def init_noise_sigma(self) -> float:
        return sigma_run_init_noise(self.config, self.sigmas)

    def _scale_model_input(self, sample: np.ndarray, g: int) -> np.ndarray:
        # The model was trained on VP inputs x / sqrt(sigma^2 + 1) (Karras et al. 2022, Table 1, c_in).
        sigma = np.float64(self.sigmas[g])
        return sample / np.sqrt(sigma**2 + 1)

    def _add_noise(self, x0: np.ndarray, noise: np.ndarray, g: int) -> np.ndarray:
        return x0 + noise * np.float64(self.sigmas[g])

    def _tables(self) -> dict[str, Any]:
        return {"sigmas": self.sigmas.tolist()}


class EulerRun(SigmaRun):
    def _step(self, m: np.ndarray, g: int, k: int, x: np.ndarray, draw: Draw, predicted_variance) -> np.ndarray:
        """Karras et al. 2022 Alg. 2 with S_churn = 0: d_i = (x_i - D(x_i; sigma_i)) / sigma_i,
        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i."""
        # 1. sigma_i, sigma_{i+1}
        sigma, sigma_next = np.float64(self.sigmas[g]), np.float64(self.sigmas[g + 1])
        # 2. denoised D(x_i; sigma_i)
        x0 = x0_from_sigma(self.config.prediction_type, m, x, sigma)
        # 3. ODE derivative d_i and the Euler step
        d = (x - x0) / sigma
        return x + d * (sigma_next - sigma)
