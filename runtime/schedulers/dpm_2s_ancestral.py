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

from .base import Draw, Scheduler, TwoStageRun, x0_from_sigma
from .config import SchedulerConfig, SchedulerConfigError, train_sigmas
from .sigmas import interpolated_sigmas, sigma_to_t


def ancestral_split(s: float, s_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of k-diffusion's get_ancestral_step: sigma_down^2 + sigma_up^2 = s_next^2, with
    sigma_up = eta sqrt(s_next^2 (s^2 - s_next^2) / s^2) (at most s_next); eta = 0 adds no noise."""
    sigma_up = min(s_next, eta * np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    return float(np.sqrt(s_next**2 - sigma_up**2)), float(sigma_up)


def check_eta(name: str, eta: float) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating)) or not 0 <= eta <= 1:
        raise SchedulerConfigError(f"{name}: eta must be a number in [0, 1] (0: no ancestral noise), got {eta!r}")
    return float(eta)


class DPMPP2SAncestralScheduler(Scheduler):
    """DPM++ 2S ancestral: two model calls per step but the last, noise of size eta sigma_up after every step
    but the last. k-diffusion's eta (default 1); Karras sigmas are not offered, as diffusers' Euler ancestral
    (whose sigmas these are) has no use_karras_sigmas."""

    name = "dpmpp-2s-a"
    diffusers_class = ""  # none in diffusers: k-diffusion's sample_dpmpp_2s_ancestral is the reference
    prediction_types = ("epsilon", "v_prediction")  # as euler-a, whose sigmas it steps over
    terminal_alpha_bar_floor = True

    def __init__(self, config: SchedulerConfig | None = None, eta: float = 1.0) -> None:
        super().__init__(config)
        self.eta = check_eta(self.name, eta)

    @property
    def is_stochastic(self) -> bool:
        return self.eta > 0

    @property
    def fewest_sound_steps(self) -> int:
        # Measured on the shipped default model (zero terminal SNR, eta 1) against 100-step DDIM, images more than
        # 10 levels off on average: 10 of 24 at 4 steps, 5 at 6, 2 at 8 and 10, none at 15 or 20. Other eta: not
        # measured, taken to be no better.
        return 15 if self.config.rescale_betas_zero_snr else 0

    def _make_run(self, num_inference_steps: int) -> DPMPP2SAncestralRun:
        steps_t, steps_s = interpolated_sigmas(self.config, self.alphas_cumprod, num_inference_steps)
        steps_s = np.concatenate([steps_s, [0.0]]).astype(np.float32)  # (n + 1,) with the tail
        mids = []  # (n - 1,) midpoint sigma of every two-call step
        for i in range(num_inference_steps - 1):
            sigma_down, _ = ancestral_split(float(steps_s[i]), float(steps_s[i + 1]), self.eta)
            mids.append(np.sqrt(float(steps_s[i]) * sigma_down))
        mids = np.asarray(mids, dtype=np.float32)
        mid_t = sigma_to_t(mids, np.log(train_sigmas(self.alphas_cumprod)).astype(np.float64)).astype(np.float32)
        timesteps = np.empty(2 * num_inference_steps - 1, np.float32)
        timesteps[0::2], timesteps[1::2] = steps_t, mid_t
        sigmas = np.empty(2 * num_inference_steps, np.float32)
        sigmas[0:-1:2], sigmas[1:-1:2], sigmas[-1] = steps_s[:-1], mids, 0.0
        return DPMPP2SAncestralRun(self, timesteps, num_inference_steps, sigmas)

    def __repr__(self) -> str:
        return f"DPMPP2SAncestralScheduler({self.config!r}, eta={self.eta})"


class DPMPP2SAncestralRun(TwoStageRun):
    """With lambda = -log sigma, h = lambda(sigma_down) - lambda(s_i):
    x_mid = (m_i / s_i) x - expm1(-h / 2) D(x; s_i);  x' = (sigma_down / s_i) x - expm1(-h) D(x_mid; m_i) + sigma_up z."""

    scheduler: DPMPP2SAncestralScheduler

    def _split(self, g: int) -> tuple[float, float]:
        """(sigma_down, sigma_up) of the step that begins at entry g (even)."""
        s_next = float(self.sigmas[g + 2]) if g + 2 < len(self.sigmas) else 0.0
        return ancestral_split(float(self.sigmas[g]), s_next, self.scheduler.eta)

    def _first(self, m: np.ndarray, g: int, x: np.ndarray, draw: Draw) -> tuple[np.ndarray, tuple | None]:
        sigma = np.float64(self.sigmas[g])
        x0 = x0_from_sigma(self.config.prediction_type, m, x, sigma)
        sigma_down, sigma_up = self._split(g)
        if sigma_down == 0:  # the last step: Euler to 0 lands on D(x; s_i)
            return x + (x - x0) / sigma * (0.0 - sigma), None
        h = np.log(sigma / sigma_down)
        return (np.float64(self.sigmas[g + 1]) / sigma) * x - np.expm1(-h / 2) * x0, (x, float(h), sigma_up)  # x at the midpoint

    def _second(self, m: np.ndarray, g: int, x: np.ndarray, pending: tuple, draw: Draw) -> np.ndarray:
        x_i, h, sigma_up = pending  # D at the midpoint finishes the step
        x0 = x0_from_sigma(self.config.prediction_type, m, x, np.float64(self.sigmas[g]))
        out = np.exp(-h) * x_i - np.expm1(-h) * x0  # sigma_down / s_i = e^{-h}
        return out + draw() * sigma_up if sigma_up > 0 else out  # eta = 0 draws nothing

    def _tables(self) -> dict[str, Any]:
        splits = [self._split(g) for g in range(0, len(self.sigmas) - 1, 2)]
        return {"sigmas": self.sigmas.tolist(), "eta": self.scheduler.eta,
                "sigma_down": [d for d, _ in splits], "sigma_up": [u for _, u in splits]}  # fmt: skip
