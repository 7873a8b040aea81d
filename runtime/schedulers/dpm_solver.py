"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Alg. 2 = 2M; Alg. 3 in the appendix for 3M), diffusers' DPMSolverMultistepScheduler
with algorithm_type="dpmsolver++", and its SDE variant algorithm_type="sde-dpmsolver++" ("DPM++ 2M SDE":
the same multistep data predictions integrated along the reverse SDE, which adds fresh noise each step).

Symbols: alpha_t, sigma_t of the VP process (x_t = alpha_t x0 + sigma_t eps), log-SNR lambda_t =
log(alpha_t / sigma_t) = -log(sigma_VE), step size h = lambda_t - lambda_s, and the data predictions
D = x0_theta(x_s, s) of the last steps (m0 newest, m1, m2 older).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Draw, Scheduler, VPSigmaRun, dynamic_threshold, vp, x0_and_eps
from .config import train_sigmas
from .sigmas import multistep_sigmas, multistep_timesteps


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ of order 1, 2 (2M, the default) or 3 (3M), ODE or SDE (algorithm_type); Karras sigmas with
    use_karras_sigmas."""

    diffusers_class = "DPMSolverMultistepScheduler"
    terminal_alpha_bar_floor = True
    solver_types = ("midpoint", "heun")

    @property
    def name(self) -> str:  # type: ignore[override]
        c = self.config
        return f"dpmpp-{c.solver_order}m" + ("-sde" if self.is_stochastic else "") + ("-karras" if c.use_karras_sigmas else "")

    @property
    def is_stochastic(self) -> bool:
        return self.config.algorithm_type == "sde-dpmsolver++"

    @property
    def fewest_sound_steps(self) -> int:
        # Karras sigmas from the zero-SNR floor (sigma_T = 4096) put half the steps above sigma 100. Measured
        # on the shipped default model against 100-step DDIM: 6 of 24 images at 25 steps and 4 of 24 at 30
        # came out as noise, none of 24 at 40 (Euler on the same sigmas: none at 15; 2M without Karras: none;
        # 3M: not measured, taken to be no better). The SDE with Karras sigmas: 8 of 24 at 25, 1 at 30, none
        # at 40 or 50 (images more than 10 levels off on average). The SDE without Karras: 5 of 24 at 6 and 8
        # steps, 2 at 10, none at 15 to 50 (its own noise keeps it ~3 levels from DDIM at any step count).
        c = self.config
        if not c.rescale_betas_zero_snr:
            return 0
        if c.use_karras_sigmas and c.solver_order > 1:
            return 40
        return 15 if self.is_stochastic else 0

    def _make_run(self, num_inference_steps: int) -> DPMSolverRun:
        c = self.config
        T, n = c.num_train_timesteps, num_inference_steps
        sigmas_train = train_sigmas(self.alphas_cumprod)  # (T,) float32, ascending in t
        # 1. timesteps on [0, last_timestep), dropping those whose lambda is below lambda_min_clipped
        ac = self.alphas_cumprod
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1) - ac))  # (T,) float32, descending in t
        timesteps = multistep_timesteps(c, n, T - int(np.searchsorted(lambdas[::-1], c.lambda_min_clipped)))
        # 2. sigmas: read off the training table, or Karras et al. eq. 5 between the table's extremes
        timesteps, sigmas = multistep_sigmas(c, sigmas_train, timesteps, truncate_cosine=True)
        sigma_last = float(sigmas_train[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        return DPMSolverRun(self, timesteps, n, sigmas)


class DPMSolverRun(VPSigmaRun):
    multistep = True
    accepts_learned_variance = True  # variance channels are dropped, as diffusers does for learned variance

    def _reset_history(self) -> None:
        self._data_predictions: list[np.ndarray] = []  # D of the last solver_order steps, oldest first

    def solver_order_at(self, g: int, k: int) -> int:
        """The order diffusers uses at table index g after k steps of this run (warm-up and final steps)."""
        c = self.config
        n_all = len(self.all_timesteps)
        lower_order_final = g == n_all - 1 and (
            c.euler_at_final or (c.lower_order_final and n_all < 15) or c.final_sigmas_type == "zero"
        )
        lower_order_second = g == n_all - 2 and c.lower_order_final and n_all < 15
        taken = min(k, c.solver_order)  # diffusers' lower_order_nums
        if c.solver_order == 1 or taken < 1 or lower_order_final:
            return 1
        if c.solver_order == 2 or taken < 2 or lower_order_second:
            return 2
        return 3

    def _step(
        self, m: np.ndarray, g: int, k: int, x: np.ndarray, draw: Draw, predicted_variance: np.ndarray | None
    ) -> np.ndarray:
        """Lu et al. 2022 Alg. 2 (and its order-1 / order-3 siblings) in data-prediction form."""
        c = self.config
        # 1. data prediction D = x0_theta(x_s, s) (the "++": solve the ODE in x0 rather than eps)
        s_ve = np.float64(self.sigmas[g])
        alpha_s, _ = vp(s_ve)
        x0, _ = x0_and_eps(c.prediction_type, m, x, alpha_s**2)
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        self._data_predictions = (self._data_predictions + [x0])[-c.solver_order :]
        # 2. order of this step, then the update from sigma_s to sigma_t
        order = self.solver_order_at(g, k)
        sigma_ve = [np.float64(self.sigmas[g + 1 - j]) for j in range(order + 1)]  # t, s0, s1, s2
        if self.scheduler.is_stochastic:
            return self._sde_step(x, sigma_ve, order, draw)
        if order == 1:
            return self._first_order(x, sigma_ve)
        if order == 2:
            return self._second_order(x, sigma_ve)
        return self._third_order(x, sigma_ve)

    def _first_order(self, x: np.ndarray, sig: list[float]) -> np.ndarray:
        """DPM-Solver++(1) (= DDIM): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D0."""
        (alpha_t, sigma_t), (_, sigma_s) = vp(sig[0]), vp(sig[1])
        d0 = self._data_predictions[-1]
        # e^{-h} = sigma_VE_t / sigma_VE_s; finite also for the zero tail (x_t = D0 there).
        exp_neg_h = sig[0] / sig[1]
        return (sigma_t / sigma_s) * x - alpha_t * (exp_neg_h - 1.0) * d0

    def _second_order(self, x: np.ndarray, sig: list[float]) -> np.ndarray:
        """DPM-Solver++(2M), Lu et al. 2022 Alg. 2: D1 = (m0 - m1) / r0 with r0 = h_0 / h."""
        (alpha_t, sigma_t), (_, sigma_s0) = vp(sig[0]), vp(sig[1])
        lam_t, lam_s0, lam_s1 = -np.log(sig[0]), -np.log(sig[1]), -np.log(sig[2])
        m0, m1 = self._data_predictions[-1], self._data_predictions[-2]
        h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        em1 = np.expm1(-h)  # e^{-h} - 1
        if self.config.solver_type == "midpoint":
            return (sigma_t / sigma_s0) * x - alpha_t * em1 * d0 - 0.5 * alpha_t * em1 * d1
        return (sigma_t / sigma_s0) * x - alpha_t * em1 * d0 + alpha_t * (em1 / h + 1.0) * d1  # heun

    def _third_order(self, x: np.ndarray, sig: list[float]) -> np.ndarray:
        """DPM-Solver++(3M): second divided difference D2 of the last three data predictions."""
        (alpha_t, sigma_t), (_, sigma_s0) = vp(sig[0]), vp(sig[1])
        lam_t, lam_s0, lam_s1, lam_s2 = (-np.log(s) for s in sig)
        m0, m1, m2 = self._data_predictions[-1], self._data_predictions[-2], self._data_predictions[-3]
        h, h_0, h_1 = lam_t - lam_s0, lam_s0 - lam_s1, lam_s1 - lam_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        em1 = np.expm1(-h)
        return (
            (sigma_t / sigma_s0) * x
            - alpha_t * em1 * m0
            + alpha_t * (em1 / h + 1.0) * d1
            - alpha_t * ((em1 + h) / h**2 - 0.5) * d2
        )

    def _sde_step(self, x: np.ndarray, sig: list[float], order: int, draw: Draw) -> np.ndarray:
        """SDE-DPM-Solver++ (Lu et al. 2022, Sec. 5; diffusers' sde-dpmsolver++), orders 1-3: with e = e^{-h},
        x_t = (sigma_t / sigma_s0) e x + alpha_t (1 - e^2) D0 + [order >= 2 terms] + sigma_t sqrt(1 - e^2) z.
        The step to the zero tail (sigma_t = 0) returns D0 and draws no noise."""
        (alpha_t, sigma_t), (_, sigma_s0) = vp(sig[0]), vp(sig[1])
        e = sig[0] / sig[1]  # e^{-h} = sigma_VE_t / sigma_VE_s0; 0 at the zero tail, where h is infinite
        one_minus_e2 = 1.0 - e * e  # 1 - e^{-2h}
        m0 = self._data_predictions[-1]
        x_t = (sigma_t / sigma_s0 * e) * x + alpha_t * one_minus_e2 * m0
        if order >= 2:
            lams = [-np.log(s) for s in sig]  # lambda_t, lambda_s0, lambda_s1(, lambda_s2)
            h, h_0 = lams[0] - lams[1], lams[1] - lams[2]
            r0 = h_0 / h
            d1_0 = (1.0 / r0) * (m0 - self._data_predictions[-2])
            if order == 2 and self.config.solver_type == "midpoint":
                x_t = x_t + 0.5 * alpha_t * one_minus_e2 * d1_0
            elif order == 2:  # heun
                x_t = x_t + alpha_t * (one_minus_e2 / (-2.0 * h) + 1.0) * d1_0
            else:
                r1 = (lams[2] - lams[3]) / h
                d1_1 = (1.0 / r1) * (self._data_predictions[-2] - self._data_predictions[-3])
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
                x_t = (
                    x_t
                    + alpha_t * (one_minus_e2 / (-2.0 * h) + 1.0) * d1
                    + alpha_t * ((one_minus_e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * d2
                )
        if sigma_t > 0:
            x_t = x_t + sigma_t * np.sqrt(one_minus_e2) * draw()
        return x_t

    def _tables(self) -> dict[str, Any]:
        orders = [self.solver_order_at(self.begin_index + k, k) for k in range(len(self.timesteps))]
        return {"sigmas": self.sigmas.tolist(), "step_orders": orders}
