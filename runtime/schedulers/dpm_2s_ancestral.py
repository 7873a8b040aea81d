"""DPM-Solver++(2S) with ancestral noise ("DPM++ 2S a"): k-diffusion's `sample_dpmpp_2s_ancestral`
(Crowson; DPM-Solver++ of Lu et al. 2022, Alg. 1 with r = 1/2, on the ancestral split of Euler ancestral).
diffusers has no such scheduler: k-diffusion's function is the reference.

Each step goes from sigma_i down to sigma_down (Euler ancestral's split of sigma_i -> sigma_{i+1}) with a
second-order singlestep DPM-Solver++ update, whose midpoint costs a second model call, then adds fresh noise
of size sigma_up. As in Heun, the two calls are two entries of the run: timesteps [t_0, t(m_0), t_1, t(m_1),
..., t_{n-1}] (2n - 1 calls: the last step, to sigma 0, is one Euler call) and sigmas [s_0, m_0, s_1, m_1, ...,
s_{n-1}, 0], with the midpoint m_i = sqrt(sigma_i sigma_down_i) and its fractional timestep read back by
log-sigma interpolation (k-diffusion's t(sigma)). The sigmas s_i are Euler ancestral's for the same config.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Draw, Scheduler, SigmaRun, x0_from_sigma
from .config import train_sigmas
from .sigmas import interpolated_sigmas, sigma_to_t


def ancestral_split(s: float, s_next: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of k-diffusion's get_ancestral_step with eta = 1: sigma_down^2 + sigma_up^2 = s_next^2."""
    sigma_up = min(s_next, np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    return float(np.sqrt(s_next**2 - sigma_up**2)), float(sigma_up)


class DPMPP2SAncestralScheduler(Scheduler):
    """DPM++ 2S ancestral: two model calls per step but the last, noise after every step but the last."""

    name = "dpmpp-2s-a"
    diffusers_class = ""  # none in diffusers: k-diffusion's sample_dpmpp_2s_ancestral is the reference
    prediction_types = ("epsilon", "v_prediction")  # as euler-a, whose sigmas it steps over
    terminal_alpha_bar_floor = True

    @property
    def is_stochastic(self) -> bool:
        return True

    def _make_run(self, num_inference_steps: int) -> DPMPP2SAncestralRun:
        steps_t, steps_s = interpolated_sigmas(self.config, self.alphas_cumprod, num_inference_steps)
        steps_s = np.concatenate([steps_s, [0.0]]).astype(np.float32)  # (n + 1,) with the tail
        mids = []  # (n - 1,) midpoint sigma of every two-call step
        for i in range(num_inference_steps - 1):
            sigma_down, _ = ancestral_split(float(steps_s[i]), float(steps_s[i + 1]))
            mids.append(np.sqrt(float(steps_s[i]) * sigma_down))
        mids = np.asarray(mids, dtype=np.float32)
        mid_t = sigma_to_t(mids, np.log(train_sigmas(self.alphas_cumprod)).astype(np.float64)).astype(np.float32)
        timesteps = np.empty(2 * num_inference_steps - 1, np.float32)
        timesteps[0::2], timesteps[1::2] = steps_t, mid_t
        sigmas = np.empty(2 * num_inference_steps, np.float32)
        sigmas[0:-1:2], sigmas[1:-1:2], sigmas[-1] = steps_s[:-1], mids, 0.0
        return DPMPP2SAncestralRun(self, timesteps, num_inference_steps, sigmas)


class DPMPP2SAncestralRun(SigmaRun):
    multistep = True  # the midpoint call finishes the step the first began
    order = 2

    def _reset_history(self) -> None:
        self._pending: tuple[np.ndarray, float, float] | None = None  # (x_i, h, sigma_up)

    def _step(
        self, m: np.ndarray, g: int, k: int, x: np.ndarray, draw: Draw, predicted_variance: np.ndarray | None
    ) -> np.ndarray:
        """With lambda = -log sigma, h = lambda(sigma_down) - lambda(s_i):
        x_mid = (m_i / s_i) x - expm1(-h / 2) D(x; s_i);  x' = (sigma_down / s_i) x - expm1(-h) D(x_mid; m_i) + sigma_up z."""
        sigma = np.float64(self.sigmas[g])
        x0 = x0_from_sigma(self.config.prediction_type, m, x, sigma)
        if self._pending is None:  # even entry: a step begins at s_i
            s_next = np.float64(self.sigmas[g + 2]) if g + 2 < len(self.sigmas) else 0.0
            sigma_down, sigma_up = ancestral_split(sigma, s_next)
            if sigma_down == 0:  # the last step: Euler to 0 lands on D(x; s_i)
                return x + (x - x0) / sigma * (0.0 - sigma)
            h = np.log(sigma / sigma_down)
            self._pending = (x, float(h), sigma_up)
            return (np.float64(self.sigmas[g + 1]) / sigma) * x - np.expm1(-h / 2) * x0  # x at the midpoint
        x_i, h, sigma_up = self._pending  # odd entry: D at the midpoint finishes the step
        self._pending = None
        out = np.exp(-h) * x_i - np.expm1(-h) * x0  # sigma_down / s_i = e^{-h}
        return out + draw() * sigma_up  # sigma_{i+1} > 0 here (the last step took the branch above)

    def _tables(self) -> dict[str, Any]:
        splits = [ancestral_split(float(self.sigmas[g]), float(self.sigmas[g + 2]) if g + 2 < len(self.sigmas) else 0.0)
                  for g in range(0, len(self.sigmas) - 1, 2)]  # fmt: skip
        return {"sigmas": self.sigmas.tolist(), "sigma_down": [d for d, _ in splits], "sigma_up": [u for _, u in splits]}
