"""Pseudo numerical methods (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
Manifolds"): PLMS (linear multistep, eq. 12) after an optional pseudo Runge-Kutta warm-up (PRK, eq. 13),
diffusers' PNDMScheduler. Stable Diffusion runs PLMS only (skip_prk_steps=True).

Every step is the transfer phi(x_t, eps, t, t') of eq. 11, the DDIM step written in closed form; the
methods differ in which combination of earlier eps they feed it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Draw, Scheduler, SchedulerRun, SchedulerStepError, readonly
from .config import SchedulerConfig, SchedulerConfigError, spaced_timesteps

PNDM_ORDER = 4  # the PRK warm-up spans the last 4 timesteps (3 RK steps of 4 evaluations)


class PNDMScheduler(Scheduler):
    name = "pndm"
    diffusers_class = "PNDMScheduler"
    prediction_types = ("epsilon", "v_prediction")
    # With alpha_bar_T floored to 2**-24 as Euler does, measured on the shipped default model against 100-step
    # DDIM: 10 of 24 images at 25 steps and 3 of 24 at 40 came out as noise (DDIM, Euler: none at 10 steps).
    zero_snr_obstacle = (
        "its PLMS steps combine noise predictions of different steps and divide them by sqrt(alpha_bar_T), "
        "which is 0 there"
    )

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        super().__init__(config)
        self.final_alpha_cumprod = 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])

    def _make_run(self, num_inference_steps: int) -> PNDMRun:
        c, n = self.config, num_inference_steps
        if not c.skip_prk_steps and n < PNDM_ORDER:
            raise SchedulerConfigError(
                f"pndm with skip_prk_steps=false needs num_inference_steps >= {PNDM_ORDER}, got {n}; "
                "set skip_prk_steps=true (PLMS only, as Stable Diffusion does)"
            )
        ascending = spaced_timesteps(c, n, round_linspace=True)[::-1].astype(np.int64)
        self._check_timesteps(ascending)
        if c.skip_prk_steps:
            # PLMS repeats the second timestep: its first step is a 2-evaluation (Heun-like) warm-up.
            prk = np.array([], dtype=np.int64)
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        else:
            half = c.num_train_timesteps // n // 2
            prk = np.array(ascending[-PNDM_ORDER:]).repeat(2) + np.tile(np.array([0, half]), PNDM_ORDER)
            prk = prk[:-1].repeat(2)[1:-1][::-1]
            plms = ascending[:-3][::-1]
        return PNDMRun(self, np.concatenate([prk, plms]).astype(np.int64), n, prk.astype(np.int64))


class PNDMRun(SchedulerRun):
    multistep = True
    scheduler: PNDMScheduler

    def __init__(self, scheduler: PNDMScheduler, timesteps: np.ndarray, num_inference_steps: int, prk: np.ndarray):
        super().__init__(scheduler, timesteps, num_inference_steps)
        self.prk_timesteps = readonly(prk)

    def _reset_history(self) -> None:
        self._ets: list[np.ndarray] = []  # eps of earlier PLMS/PRK steps, oldest first
        self._cur_sample: np.ndarray | None = None  # x at the start of a multi-evaluation step
        self._cur_eps: np.ndarray | float = 0.0  # PRK: running weighted sum of the stage evaluations

    def _step(
        self, m: np.ndarray, g: int, k: int, x: np.ndarray, draw: Draw, predicted_variance: np.ndarray | None
    ) -> np.ndarray:
        t = int(self.all_timesteps[g])
        if k < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self._step_prk(m, t, k, x)
        return self._step_plms(m, t, k, x)

    def _step_prk(self, m: np.ndarray, t: int, k: int, x: np.ndarray) -> np.ndarray:
        """Pseudo fourth-order Runge-Kutta (eq. 13): stages at t, t - delta/2, t - delta/2, t - delta with
        weights 1/6, 1/3, 1/3, 1/6; each stage is a transfer from the step's start sample."""
        # 1. target of this stage: half a step for stages 0 and 1 (k even), a full step otherwise
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_t = t - (0 if k % 2 else half)
        t = int(self.prk_timesteps[k // 4 * 4])
        # 2. accumulate eps_RK = (e1 + 2 e2 + 2 e3 + e4) / 6
        stage = k % 4
        if stage == 0:
            self._cur_eps = self._cur_eps + m / 6
            self._ets.append(m)
            self._cur_sample = x
        elif stage in (1, 2):
            self._cur_eps = self._cur_eps + m / 3
        else:
            m = self._cur_eps + m / 6
            self._cur_eps = 0.0
        # 3. transfer from the step's start sample
        start = self._cur_sample if self._cur_sample is not None else x
        return self._transfer(start, t, prev_t, m)

    def _step_plms(self, m: np.ndarray, t: int, k: int, x: np.ndarray) -> np.ndarray:
        """PLMS (eq. 12): eps' = (55 e_t - 59 e_{t-d} + 37 e_{t-2d} - 9 e_{t-3d}) / 24, with lower-order
        Adams-Bashforth combinations while fewer than four eps are known."""
        if not self.config.skip_prk_steps and len(self._ets) < 3:
            raise SchedulerStepError(
                "pndm with skip_prk_steps=false must run its Runge-Kutta warm-up steps first; "
                "start the run at step 0 or set skip_prk_steps=true"
            )
        # 1. transfer target; step 1 re-does step 0's interval with the averaged eps (k == 1)
        delta = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - delta
        if k != 1:
            self._ets = self._ets[-3:] + [m]
        else:
            prev_t, t = t, t + delta
        # 2. combine eps
        ets = self._ets
        if len(ets) == 1 and k == 0:
            self._cur_sample = x
        elif len(ets) == 1 and k == 1:
            m = (m + ets[-1]) / 2
            x, self._cur_sample = self._cur_sample, None
        elif len(ets) == 2:
            m = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            m = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            m = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        # 3. transfer
        return self._transfer(x, t, prev_t, m)

    def _transfer(self, x: np.ndarray, t: int, prev_t: int, m: np.ndarray) -> np.ndarray:
        """phi of Liu et al. eq. 11: x_{t'} = sqrt(a'/a) x_t - (a' - a) eps / (a sqrt(1 - a') + sqrt(a (1 - a) a'))."""
        s = self.scheduler
        a = float(s.alphas_cumprod[t])
        a_prev = float(s.alphas_cumprod[prev_t]) if prev_t >= 0 else s.final_alpha_cumprod
        if self.config.prediction_type == "v_prediction":
            m = np.sqrt(a) * m + np.sqrt(1 - a) * x  # eps from v
        denom = a * np.sqrt(1 - a_prev) + np.sqrt(a * (1 - a) * a_prev)
        return np.sqrt(a_prev / a) * x - (a_prev - a) * m / denom

    def _tables(self) -> dict[str, Any]:
        return {
            "prk_timesteps": self.prk_timesteps.tolist(),
            "final_alpha_cumprod": self.scheduler.final_alpha_cumprod,
            "skip_prk_steps": self.config.skip_prk_steps,
        }
