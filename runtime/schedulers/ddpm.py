"""DDPM ancestral sampling (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"),
diffusers' DDPMScheduler with the inference-step subsampling it applies."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Draw, Scheduler, SchedulerRun, SchedulerStepError, clip_or_threshold, x0_and_eps
from .config import spaced_timesteps


class DDPMScheduler(Scheduler):
    """Samples the posterior q(x_{t'} | x_t, x0_hat) between consecutive inference timesteps."""

    name = "ddpm"
    diffusers_class = "DDPMScheduler"

    @property
    def is_stochastic(self) -> bool:
        return True

    def _make_run(self, num_inference_steps: int) -> DDPMRun:
        timesteps = spaced_timesteps(self.config, num_inference_steps, round_linspace=True).astype(np.int64)
        self._check_timesteps(timesteps)
        return DDPMRun(self, timesteps, num_inference_steps)


class DDPMRun(SchedulerRun):
    accepts_learned_variance = True

    def _alphas(self, g: int) -> tuple[int, float, float]:
        t = int(self.all_timesteps[g])
        # The previous timestep is the next one in the schedule; after the last, alpha_bar = 1.
        prev_t = int(self.all_timesteps[g + 1]) if g + 1 < len(self.all_timesteps) else -1
        ac = self.scheduler.alphas_cumprod
        return t, float(ac[t]), float(ac[prev_t]) if prev_t >= 0 else 1.0

    def _step(
        self, m: np.ndarray, g: int, k: int, x: np.ndarray, draw: Draw, predicted_variance: np.ndarray | None
    ) -> np.ndarray:
        """Ho et al. 2020 eq. 6-7 with alpha_t := alpha_bar_t / alpha_bar_{t'} for the strided step t -> t':
        mu = sqrt(a_{t'}) beta_t / (1 - a_t) x0_hat + sqrt(alpha_t) (1 - a_{t'}) / (1 - a_t) x_t,
        x_{t'} = mu + sigma_t z, beta_tilde = (1 - a_{t'}) / (1 - a_t) beta_t  (a = alpha_bar)."""
        # 1. alpha_bar at t and t', and the step's own alpha_t / beta_t
        t, a_t, a_prev = self._alphas(g)
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t
        # 2. predicted x0, then optional clipping (eq. 15)
        x0, _ = x0_and_eps(self.config.prediction_type, m, x, a_t)
        x0 = clip_or_threshold(x0, self.config)
        # 3. posterior mean mu_tilde(x_t, x0), eq. 7
        x0_coeff = np.sqrt(a_prev) * beta_t / (1 - a_t)
        xt_coeff = np.sqrt(alpha_t) * (1 - a_prev) / (1 - a_t)
        mean = x0_coeff * x0 + xt_coeff * x
        # 4. add sigma_t z except at t = 0
        if t == 0:
            return mean
        return mean + self._std(a_t, a_prev, beta_t, predicted_variance) * draw()

    def _std(self, a_t: float, a_prev: float, beta_t: float, predicted_variance: np.ndarray | None):
        beta_tilde = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)  # posterior variance, eq. 7
        kind = self.config.variance_type or "fixed_small"
        if kind == "fixed_small":
            return np.sqrt(beta_tilde)
        if kind == "fixed_small_log":
            return np.exp(0.5 * np.log(beta_tilde))
        if kind == "fixed_large":
            return np.sqrt(beta_t)
        if predicted_variance is None:
            raise SchedulerStepError(
                f"ddpm: variance_type={kind!r} needs a model output with twice the sample's channels"
            )
        if kind == "learned":
            return np.sqrt(predicted_variance)
        # learned_range: interpolate log variance between beta_tilde and beta (Nichol & Dhariwal 2021, eq. 15)
        frac = (predicted_variance + 1) / 2
        log_var = frac * np.log(beta_t) + (1 - frac) * np.log(beta_tilde)
        return np.exp(0.5 * log_var)

    def _tables(self) -> dict[str, Any]:
        triples = [self._alphas(g) for g in range(len(self.all_timesteps))]
        return {
            "all_alpha_prod_t": [a for _, a, _ in triples],
            "all_alpha_prod_t_prev": [p for _, _, p in triples],
        }
