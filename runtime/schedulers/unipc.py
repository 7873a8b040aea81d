"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"), diffusers' UniPCMultistepScheduler in data prediction (predict_x0) with the B(h) variants bh1 / bh2.

Each step first corrects the sample the previous step predicted (UniC, using the model output just
evaluated there; no extra model call), then predicts the next sample (UniP) from the last `order` data
predictions. Symbols as in dpm_solver.py: VP alpha_t, sigma_t, lambda = -log(sigma_VE), h = lambda_t -
lambda_s0, data predictions m0 (newest), m1, m2 at the noise levels s0, s1, s2.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Draw, Scheduler, VPSigmaRun, dynamic_threshold, vp, x0_and_eps
from .config import SchedulerConfig, SchedulerConfigError, train_sigmas
from .sigmas import multistep_sigmas, multistep_timesteps


class UniPCMultistepScheduler(Scheduler):
    """UniPC-p with UniC: order 1, 2 (the default) or 3; Karras sigmas with use_karras_sigmas."""

    name = "unipc"
    karras_variant = True  # unipc-karras: diffusers' class with use_karras_sigmas
    diffusers_class = "UniPCMultistepScheduler"
    terminal_alpha_bar_floor = True
    solver_types = ("bh2", "bh1")

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        if not c.lower_order_final and c.final_sigmas_type == "zero" and c.solver_order > 1:
            # the last predictor extrapolates in lambda to lambda = inf: diffusers divides by zero (NaN images)
            raise SchedulerConfigError(
                "unipc with lower_order_final=false and final_sigmas_type='zero' divides by zero on its last step; "
                "set lower_order_final=true or final_sigmas_type='sigma_min'"
            )

    @property
    def fewest_sound_steps(self) -> int:
        # From the zero-SNR floor (sigma_T = 4096) the extrapolating steps overshoot. Measured on the shipped
        # default model (order 2, bh2) against 100-step DDIM, images more than 10 levels off on average:
        # 19 of 24 at 6 steps, 16 at 8, 1 at 10, none at 12 or 15 (DPM-Solver++ 2M: none from 6). Orders 1
        # and 3 not measured, taken to be no better. Karras sigmas (unipc-karras) put half the steps above sigma
        # 100, as for DPM++ 2M Karras: 13 of 24 off at 15 steps, 4 at 20, 1 at 25 and 30, none at 35 to 50 (24 other
        # prompt/seed pairs, where plain UniPC: 4 at 12, 1 at 15, none from 20; DPM++ 2M Karras: 1 at 30, none at
        # 40). So DPM++ 2M Karras's bound, 40.
        if not self.config.rescale_betas_zero_snr:
            return 0
        return 40 if self.config.use_karras_sigmas else 12

    def _make_run(self, num_inference_steps: int) -> UniPCRun:
        c = self.config
        n = num_inference_steps
        sigmas_train = train_sigmas(self.alphas_cumprod)  # (T,) float32, ascending in t
        timesteps, sigmas = multistep_sigmas(c, sigmas_train, multistep_timesteps(c, n, c.num_train_timesteps), truncate_cosine=False)
        # diffusers' Karras branch ends on its own sigma_min, the other on the table's
        sigma_last = float(sigmas[-1]) if c.use_karras_sigmas else float(sigmas_train[0])
        if c.final_sigmas_type == "zero":
            sigma_last = 0.0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        return UniPCRun(self, timesteps, n, sigmas)


def bh_coefficients(rks: list[float], hh: float, order: int, b_h: float) -> tuple[np.ndarray, np.ndarray]:
    """(R, b) of Zhao et al. 2023, Alg. 1/2 (diffusers' multistep_uni_*_bh_update): R[i, k] = r_k^i and
    b_i = i! h phi_{i+1}(h) / B(h), i = 0 .. order-1, with hh = -h (data prediction). rks ends with r = 1."""
    h_phi_k = np.expm1(hh) / hh - 1.0  # h phi_2(h) / h, then phi_{k+1} by phi_{k+1} = (phi_k - 1/k!) / hh
    r = np.asarray(rks, dtype=np.float64)
    rows, b = [], []
    factorial = 1
    for i in range(1, order + 1):
        rows.append(r ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.stack(rows), np.asarray(b)


class UniPCRun(VPSigmaRun):
    multistep = True

    def _reset_history(self) -> None:
        self._data_predictions: list[np.ndarray] = []  # x0 of the last solver_order steps, oldest first
        self._last_sample: np.ndarray | None = None  # the sample the last predictor started from
        self._last_order = 0

    def order_at(self, g: int, k: int) -> int:
        """UniP's order at table index g after k steps of this run (warm-up; lower_order_final near the end:
        unlike DPM-Solver++ at any step count). The corrector of step g + 1 uses the same order."""
        c = self.config
        cap = min(c.solver_order, len(self.all_timesteps) - g) if c.lower_order_final else c.solver_order
        return min(cap, k + 1)

    def _step(
        self, m: np.ndarray, g: int, k: int, x: np.ndarray, draw: Draw, predicted_variance: np.ndarray | None
    ) -> np.ndarray:
        c = self.config
        # 1. data prediction at the sample as it came in (before the corrector moves it)
        alpha_s, _ = vp(np.float64(self.sigmas[g]))
        x0, _ = x0_and_eps(c.prediction_type, m, x, alpha_s**2)
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        # 2. UniC: redo the last step from the last sample, now knowing x0 at its end
        if self._last_sample is not None and g - 1 not in c.disable_corrector:
            x = self._update(self._last_sample, g, g - 1, self._last_order, x0)
        # 3. UniP from the corrected sample
        self._data_predictions = (self._data_predictions + [x0])[-c.solver_order :]
        order = self.order_at(g, k)
        self._last_sample, self._last_order = x, order
        return self._update(x, g + 1, g, order, None)

    def _update(self, x: np.ndarray, t: int, s0: int, order: int, model_t: np.ndarray | None) -> np.ndarray:
        """x at sigmas[t] from x at sigmas[s0], with the data predictions m0 (at s0), m1 (at s0 - 1), ...
        The predictor (model_t None) extrapolates with order - 1 divided differences; the corrector also
        uses model_t, the data prediction at sigmas[t] of the predicted sample."""
        sig = self.sigmas
        sig_t, sig_s0 = np.float64(sig[t]), np.float64(sig[s0])
        (alpha_t, sigma_t), (_, sigma_s0) = vp(sig_t), vp(sig_s0)
        history = self._data_predictions
        m0 = history[-1]
        with np.errstate(divide="ignore"):  # the zero tail: lambda_t = h = inf, where e^-h = 0 is exact
            lam_t, lam_s0 = -np.log(sig_t), -np.log(sig_s0)
            h = lam_t - lam_s0
            rks = [(-np.log(np.float64(sig[s0 - i])) - lam_s0) / h for i in range(1, order)] + [1.0]
        h_phi_1 = np.expm1(-h)  # h phi_1(h) = e^-h - 1: -1 at the zero tail
        x_t = (sigma_t / sigma_s0) * x - alpha_t * h_phi_1 * m0  # the first-order (DDIM) step
        if model_t is None and order == 1:
            return x_t  # diffusers adds B(h) * 0 here: NaN for bh1 at the zero tail, where B(h) = -inf
        d1s = [(history[-(i + 1)] - m0) / rk for i, rk in zip(range(1, order), rks)]
        b_h = -h if self.config.solver_type == "bh1" else h_phi_1  # B(h)
        R, b = bh_coefficients(rks, -h, order, b_h)
        if model_t is None:  # UniP
            rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            res = sum(rho * d for rho, d in zip(rhos, d1s))
        else:  # UniC
            rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
            res = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) + rhos[-1] * (model_t - m0)
        return x_t - alpha_t * b_h * res

    def _tables(self) -> dict[str, Any]:
        orders = [self.order_at(self.begin_index + k, k) for k in range(len(self.timesteps))]
        return {"sigmas": self.sigmas.tolist(), "step_orders": orders}
