"""Trajectory consistency distillation sampling (Zheng et al. 2024, "Trajectory Consistency Distillation",
Alg. 4, strategic stochastic sampling), diffusers' TCDScheduler.

Like LCM it steps over timesteps picked from the distillation schedule (lcm.consistency_timesteps), but each
step predicts the sample at an intermediate timestep s = floor((1 - gamma) t_next) along the probability-flow
ODE (the DDIM step to s), then adds noise forward from s to t_next. gamma (diffusers' `eta` of `step`) sets
the stochasticity: 0 is deterministic DDIM-like sampling, 1 is LCM-like (s = 0, full re-noising).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Draw, Scheduler, SchedulerRun, x0_and_eps
from .config import SchedulerConfig, SchedulerConfigError
from .lcm import consistency_timesteps

DEFAULT_GAMMA = 0.3  # the paper's and diffusers' default for step(eta=)


class TCDScheduler(Scheduler):
    """Strategic stochastic sampling with gamma in [0, 1]."""

    name = "tcd"
    diffusers_class = "TCDScheduler"

    def __init__(self, config: SchedulerConfig | None = None, gamma: float = DEFAULT_GAMMA) -> None:
        super().__init__(config)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
            raise SchedulerConfigError(f"tcd: gamma must be a number in [0, 1] (0: deterministic), got {gamma!r}")
        self.gamma = float(gamma)
        consistency_timesteps(self, 1)  # refuses original_inference_steps > num_train_timesteps up front

    @property
    def is_stochastic(self) -> bool:
        return self.gamma > 0

    @property
    def fewest_sound_steps(self) -> int:
        # A model not distilled for it on a zero-terminal-SNR schedule (the shipped default model, gamma 0.3),
        # against 100-step DDIM over 24 images: 12 came out broken at 2 steps, 5 at 4, 2 at 8 and 12, 1 (96 levels
        # off on average) at 16; from 20 to 40 none more than 13 levels off (TCD stays ~5 levels from DDIM at any
        # step count). Other gamma: not measured, taken to be no better. TCD-distilled models are made for 2-8.
        return 20 if self.config.rescale_betas_zero_snr else 0

    def _make_run(self, num_inference_steps: int) -> TCDRun:
        return TCDRun(self, consistency_timesteps(self, num_inference_steps), num_inference_steps)

    def __repr__(self) -> str:
        return f"TCDScheduler({self.config!r}, gamma={self.gamma})"


class TCDRun(SchedulerRun):
    scheduler: TCDScheduler

    def _timesteps(self, g: int) -> tuple[int, int, int]:
        """(t, t_next, s): this step's timestep, the next one (0 after the last step) and the intermediate
        s = floor((1 - gamma) t_next), computed in float32 as diffusers does."""
        t = int(self.all_timesteps[g])
        t_next = int(self.all_timesteps[g + 1]) if g + 1 < len(self.all_timesteps) else 0
        s = int(np.floor(np.float32(1 - self.scheduler.gamma) * np.float32(t_next)))
        return t, t_next, s

    def _step(
        self, m: np.ndarray, g: int, k: int, x: np.ndarray, draw: Draw, predicted_variance: np.ndarray | None
    ) -> np.ndarray:
        """x_s = sqrt(a_s) x0_hat + sqrt(1 - a_s) eps_hat; x' = sqrt(a'/a_s) x_s + sqrt(1 - a'/a_s) z (TCD Alg. 4),
        x' = x_s after the last step or with gamma = 0."""
        ac = self.scheduler.alphas_cumprod
        t, t_next, s = self._timesteps(g)
        a_t, a_next, a_s = (np.float64(ac[i]) for i in (t, t_next, s))
        # 1. x0 and eps from the model output, then the DDIM step to the intermediate timestep s
        x0, eps = x0_and_eps(self.config.prediction_type, m, x, a_t)
        x_s = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * eps
        # 2. noise forward from s to t_next (none after the last step)
        if self.scheduler.gamma == 0 or g == len(self.all_timesteps) - 1:
            return x_s
        return np.sqrt(a_next / a_s) * x_s + np.sqrt(1 - a_next / a_s) * draw()

    def _tables(self) -> dict[str, Any]:
        ac = self.scheduler.alphas_cumprod
        steps = [self._timesteps(g) for g in range(len(self.all_timesteps))]
        return {
            "gamma": self.scheduler.gamma,
            "all_alpha_prod_t": [float(ac[t]) for t, _, _ in steps],
            "all_alpha_prod_t_prev": [float(ac[n]) for _, n, _ in steps],
            "all_intermediate_timesteps": [s for _, _, s in steps],
            "all_alpha_prod_s": [float(ac[s]) for _, _, s in steps],
        }
