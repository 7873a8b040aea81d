"""Noise-level (sigma) schedules of the sigma-parametrised samplers (Euler, LMS, Heun, DPM-Solver++, UniPC).

sigma is the VE noise level x = x0 + sigma * eps, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Sec. 2).
"""

from __future__ import annotations

import numpy as np

from .config import SchedulerConfig, spaced_timesteps, train_sigmas

KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5 and Table 1


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, Karras et al. eq. 5."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / KARRAS_RHO)
    max_inv_rho = sigma_max ** (1 / KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma (k-diffusion's t(sigma)).

    `log_sigmas` is log of the float32 training sigmas, ascending in t; dtypes follow diffusers'
    `_sigma_to_t` so the resulting timesteps round the same way.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))  # (n,)
    dists = log_sigma[None, :] - log_sigmas[:, None]  # (T, n)
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)  # (n,)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def discrete_sigmas(
    config: SchedulerConfig, alphas_cumprod: np.ndarray, num_inference_steps: int, *, config_range: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of the Euler-type samplers (Euler, LMS, Heun), without the tail: interpolated, or
    Karras sigmas between the interpolated extremes (or config sigma_min / sigma_max, with `config_range`:
    Euler reads them, diffusers' LMS and Heun do not) with their fractional timesteps."""
    timesteps, sigmas = interpolated_sigmas(config, alphas_cumprod, num_inference_steps)
    if config.use_karras_sigmas:
        sigma_min, sigma_max = float(sigmas[-1]), float(sigmas[0])
        if config_range:
            sigma_min = config.sigma_min if config.sigma_min is not None else sigma_min
            sigma_max = config.sigma_max if config.sigma_max is not None else sigma_max
        sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps)
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas(alphas_cumprod))).astype(np.float32)
    return timesteps, sigmas


def interpolated_sigmas(
    config: SchedulerConfig, alphas_cumprod: np.ndarray, num_inference_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) for Euler-type samplers: float32 spaced timesteps (not rounded) and the
    training sigmas linearly interpolated at them (float64, without the tail)."""
    timesteps = spaced_timesteps(config, num_inference_steps, round_linspace=False).astype(np.float32)
    sigmas = train_sigmas(alphas_cumprod)
    return timesteps, np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def multistep_timesteps(c: SchedulerConfig, n: int, last_timestep: int) -> np.ndarray:
    """Descending int64 timesteps of diffusers' multistep solvers (DPM-Solver++, UniPC): n + 1 points on
    [0, last_timestep) with the last dropped ("leading": step ratio last_timestep // (n + 1))."""
    if c.timestep_spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if c.timestep_spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64) + c.steps_offset
    return np.arange(last_timestep, 0, -c.num_train_timesteps / n).round().astype(np.int64) - 1  # trailing


def multistep_sigmas(
    c: SchedulerConfig, sigmas_train: np.ndarray, timesteps: np.ndarray, *, truncate_cosine: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of diffusers' multistep solvers, without the tail: the training sigmas (float32, ascending
    in t) read at `timesteps`, or Karras et al. eq. 5 between config sigma_min / sigma_max (default: the table's
    extremes) with their timesteps rounded to int64; `truncate_cosine`: the int cast truncates them instead for
    the cosine schedule (DPM-Solver++; UniPC rounds always)."""
    n = len(timesteps)
    if not c.use_karras_sigmas:
        return timesteps, np.interp(timesteps, np.arange(c.num_train_timesteps), sigmas_train)
    sigma_min = c.sigma_min if c.sigma_min is not None else float(sigmas_train[0])
    sigma_max = c.sigma_max if c.sigma_max is not None else float(sigmas_train[-1])
    sigmas = karras_sigmas(sigma_min, sigma_max, n)
    t = sigma_to_t(sigmas, np.log(sigmas_train))
    truncate = truncate_cosine and c.beta_schedule == "squaredcos_cap_v2"
    return (t if truncate else t.round()).astype(np.int64), sigmas
