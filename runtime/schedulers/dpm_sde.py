"""DPM-Solver++ SDE ("DPM++ SDE"), singlestep, second order: diffusers' DPMSolverSDEScheduler, k-diffusion's
`sample_dpmpp_sde` with r = 1/2 and eta = 1 (Lu et al. 2022, DPM-Solver++(2S) on the ancestral split of Euler
ancestral, Crowson's SDE variant).

Each step s_j -> s_{j+1} takes two model calls. The first: D(x; s_j), an ancestral Euler step from s_j to the
midpoint m_j = sqrt(s_j s_{j+1}) (exp of the mean of the log sigmas) with fresh noise. The second: D(x_mid; m_j),
then an ancestral Euler step from the step's start x_j, at s_j, to s_{j+1} with that denoised value and fresh
noise again. The last step (to sigma 0) is one Euler call. As in DPM++ 2S a the two calls are two entries of
the run, timesteps [t_0, t(m_0), t_1, ..., t_{n-1}], with Heun's sigma table and the midpoints beside it; s_j are
Heun's (interpolated or Karras); the midpoint timesteps are read back by log-sigma interpolation from the float64
midpoints, as diffusers does, and the model sees the midpoints as float32.

diffusers draws the noise from a torchsde Brownian tree (increments W(t1) - W(t0) scaled to unit variance);
here it is a standard normal draw from the request's generator at each of the two calls, in call order
(docs/sampler_spec.md): the same distribution, not the same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Draw, Scheduler, TwoStageRun, readonly, x0_from_sigma
from .config import train_sigmas
from .dpm_2s_ancestral import ancestral_split
from .sigmas import discrete_sigmas, sigma_to_t


def midpoint_sigmas(sigmas: np.ndarray) -> np.ndarray:
    """(n - 1,) the log-midpoints exp(-(t_j + (t_{j+1} - t_j) / 2)), t = -log sigma, of consecutive sigmas, written
    sqrt(s_j s_{j+1}) in float64: equal to a rounding, and correctly rounded in every language (a native port's
    log and exp need not round as numpy's do). diffusers computes them in float32: 1e-7 relative apart."""
    s = np.asarray(sigmas, dtype=np.float64)
    return np.sqrt(s[:-1] * s[1:])


class DPMSolverSDEScheduler(Scheduler):
    """DPM++ SDE: two model calls per step but the last, ancestral noise after each; Karras sigmas optional."""

    name = "dpmpp-sde"  # the class's name (what a folder's DPMSolverSDEScheduler maps to); -karras per instance
    karras_variant = True
    diffusers_class = "DPMSolverSDEScheduler"
    prediction_types = ("epsilon", "v_prediction")  # diffusers raises for "sample"
    zero_snr_obstacle = "diffusers' DPMSolverSDEScheduler has no rescale_betas_zero_snr option, so there is no such DPM++ SDE to match"

    @property
    def is_stochastic(self) -> bool:
        return True

    def _make_run(self, num_inference_steps: int) -> DPMSolverSDERun:
        n = num_inference_steps
        steps_t, steps_s = discrete_sigmas(self.config, self.alphas_cumprod, n, config_range=False)  # (n,), (n,) float64
        # diffusers reads the midpoint timesteps off the float64 sigmas, before its float32 table. Its log table is
        # numpy's float32 log of the training sigmas, whose ulp errors (not correctly rounded; a native port's logf
        # differs) the interpolation magnifies ~10x at small t: the float64 log here, ~1e-6 from diffusers' t.
        log_table = np.log(train_sigmas(self.alphas_cumprod).astype(np.float64))
        mid_t = sigma_to_t(midpoint_sigmas(steps_s), log_table)
        timesteps = np.empty(2 * n - 1, np.float64)
        timesteps[0::2], timesteps[1::2] = steps_t, mid_t
        steps_s = np.concatenate([steps_s, [0.0]]).astype(np.float32)
        sigmas = np.concatenate([steps_s[:1], np.repeat(steps_s[1:-1], 2), steps_s[-1:]])  # (2n,) as Heun's
        return DPMSolverSDERun(self, timesteps.astype(np.float32), n, sigmas, midpoint_sigmas(steps_s[:-1]).astype(np.float32))


class DPMSolverSDERun(TwoStageRun):
    """Entries 2j (at s_j) and 2j + 1 (at the midpoint m_j); sigmas as Heun's, [s_0, s_1, s_1, ..., s_{n-1},
    s_{n-1}, 0] (diffusers' table, which add_noise reads), and the midpoints beside them.
    Each call: x' = (sigma_down / s) x + (1 - sigma_down / s) D + sigma_up z."""

    def __init__(self, scheduler: Scheduler, timesteps: np.ndarray, n: int, sigmas: np.ndarray, midpoints: np.ndarray) -> None:
        super().__init__(scheduler, timesteps, n, sigmas)
        self.midpoints = readonly(midpoints)  # (n - 1,) float32 m_j

    def _model_sigma(self, g: int) -> np.float64:
        return np.float64(self.sigmas[g] if g % 2 == 0 else self.midpoints[g // 2])

    def _first(self, m: np.ndarray, g: int, x: np.ndarray, draw: Draw) -> tuple[np.ndarray, np.ndarray | None]:
        sigma = np.float64(self.sigmas[g])
        x0 = x0_from_sigma(self.config.prediction_type, m, x, sigma)
        if self.sigmas[g + 1] == 0:  # the last step: Euler to 0 lands on D(x; s_{n-1})
            return x + (x - x0) / sigma * (0.0 - sigma), None
        return self._ancestral(x, x0, sigma, np.float64(self.midpoints[g // 2]), draw), x  # to the midpoint

    def _second(self, m: np.ndarray, g: int, x: np.ndarray, pending: np.ndarray, draw: Draw) -> np.ndarray:
        x0 = x0_from_sigma(self.config.prediction_type, m, x, np.float64(self.midpoints[g // 2]))  # D(x_mid; m_j)
        return self._ancestral(pending, x0, np.float64(self.sigmas[g - 1]), np.float64(self.sigmas[g]), draw)

    @staticmethod
    def _ancestral(x: np.ndarray, x0: np.ndarray, s: float, s_to: float, draw: Draw) -> np.ndarray:
        sigma_down, sigma_up = ancestral_split(s, s_to)
        r = sigma_down / s
        return r * x + (1.0 - r) * x0 + draw() * sigma_up

    def _tables(self) -> dict[str, Any]:
        return {"sigmas": self.sigmas.tolist(), "midpoint_sigmas": self.midpoints.tolist()}
