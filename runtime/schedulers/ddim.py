"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"), diffusers' DDIMScheduler."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Draw, Scheduler, SchedulerRun, clip_or_threshold, x0_and_eps
from .config import SchedulerConfig, SchedulerConfigError, spaced_timesteps


class DDIMScheduler(Scheduler):
    """Deterministic (eta = 0) or stochastic (eta > 0; eta = 1 is DDPM-like) DDIM sampling."""

    name = "ddim"
    diffusers_class = "DDIMScheduler"

    def __init__(self, config: SchedulerConfig | None = None, eta: float = 0.0) -> None:
        super().__init__(config)
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or eta < 0:
            raise SchedulerConfigError(f"ddim: eta must be a number >= 0 (0: deterministic DDIM), got {eta!r}")
        self.eta = float(eta)
        # alpha_bar "before" the first training step, used by the last step.
        self.final_alpha_cumprod = 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])

    @property
    def is_stochastic(self) -> bool:
        return self.eta > 0

    def _make_run(self, num_inference_steps: int) -> DDIMRun:
        timesteps = spaced_timesteps(self.config, num_inference_steps, round_linspace=True).astype(np.int64)
        self._check_timesteps(timesteps)
        return DDIMRun(self, timesteps, num_inference_steps)

    def __repr__(self) -> str:
        return f"DDIMScheduler({self.config!r}, eta={self.eta})"


class DDIMRun(SchedulerRun):
    scheduler: DDIMScheduler

    def _alphas(self, g: int) -> tuple[float, float]:
        s = self.scheduler
        t = int(self.all_timesteps[g])
        # diffusers steps back by T // n whatever the spacing, not to the next listed timestep.
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = float(s.alphas_cumprod[t])
        alpha_prod_t_prev = float(s.alphas_cumprod[prev_t]) if prev_t >= 0 else s.final_alpha_cumprod
        return alpha_prod_t, alpha_prod_t_prev

    def _step(
        self, m: np.ndarray, g: int, k: int, x: np.ndarray, draw: Draw, predicted_variance: np.ndarray | None
    ) -> np.ndarray:
        """Song et al. 2021 eq. 12:
        x_{t-1} = sqrt(a_{t-1}) x0_hat + sqrt(1 - a_{t-1} - sigma_t^2) eps_hat + sigma_t z,
        sigma_t = eta sqrt((1 - a_{t-1}) / (1 - a_t)) sqrt(1 - a_t / a_{t-1})  (eq. 16), a = alpha_bar."""
        # 1. alpha_bar at t and at the previous timestep t - T/n
        a_t, a_prev = self._alphas(g)
        # 2. predicted x0 ("predicted x_0" of eq. 12) and eps, then optional clipping
        x0, eps = x0_and_eps(self.config.prediction_type, m, x, a_t)
        x0 = clip_or_threshold(x0, self.config)
        # 3. sigma_t(eta), eq. 16
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        sigma_t = self.scheduler.eta * np.sqrt(variance)
        # 4. "direction pointing to x_t"
        direction = np.sqrt(1 - a_prev - sigma_t**2) * eps
        # 5. x_{t-1} without and with the random noise
        prev = np.sqrt(a_prev) * x0 + direction
        if self.scheduler.eta > 0:
            prev = prev + sigma_t * draw()
        return prev

    def _tables(self) -> dict[str, Any]:
        pairs = [self._alphas(g) for g in range(len(self.all_timesteps))]
        return {
            "eta": self.scheduler.eta,
            "all_alpha_prod_t": [a for a, _ in pairs],
            "all_alpha_prod_t_prev": [p for _, p in pairs],
        }
