"""Latent consistency model sampling (Luo et al. 2023, "Latent Consistency Models", Alg. 3, multistep
consistency sampling of Song et al. 2023, Alg. 1), diffusers' LCMScheduler.

Each step maps x_t to the consistency function's estimate of x0 with the boundary-condition scalings
(Song et al. 2023, eq. 7; LCM eq. 9), then, except after the last step, noises it again to the next
timestep with fresh noise. The timesteps are picked from the distillation schedule, the
`original_inference_steps` training timesteps T // original_inference_steps apart ("skipping-step" k).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Draw, Scheduler, SchedulerRun, clip_or_threshold, x0_and_eps
from .config import SchedulerConfig, SchedulerConfigError

SIGMA_DATA = 0.5  # the data's standard deviation assumed by the boundary scalings (Karras et al. 2022)


def distillation_timesteps(config: SchedulerConfig, strength: float = 1.0) -> np.ndarray:
    """The ascending timesteps the model was distilled on: k - 1, 2k - 1, ..., with k = T // original
    steps; img2img keeps the first int(original_inference_steps * strength) of them, as diffusers does."""
    k = config.num_train_timesteps // config.original_inference_steps
    return np.arange(1, int(config.original_inference_steps * strength) + 1, dtype=np.int64) * k - 1


def consistency_timesteps(scheduler: Scheduler, num_inference_steps: int, strength: float = 1.0) -> np.ndarray:
    """LCM / TCD: num_inference_steps timesteps evenly spread (by index) over the descending distillation
    schedule; SchedulerConfigError when it has fewer entries than that."""
    c, name = scheduler.config, scheduler.name
    if c.original_inference_steps > c.num_train_timesteps:
        raise SchedulerConfigError(
            f"{name}: original_inference_steps={c.original_inference_steps} is more than num_train_timesteps="
            f"{c.num_train_timesteps}; lower it"
        )
    if num_inference_steps > c.original_inference_steps:
        raise SchedulerConfigError(
            f"{name}: {num_inference_steps} steps is more than original_inference_steps={c.original_inference_steps}, "
            f"the distillation schedule the steps are picked from; use at most {c.original_inference_steps} steps"
        )
    origin = distillation_timesteps(c, strength)
    if len(origin) < num_inference_steps:
        raise SchedulerConfigError(
            f"{name}: strength {strength} keeps {len(origin)} of the {c.original_inference_steps} distillation "
            f"timesteps, fewer than the {num_inference_steps} steps asked for; raise strength or lower the steps"
        )
    indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    timesteps = origin[::-1][indices]
    scheduler._check_timesteps(timesteps)
    return timesteps


def boundary_scalings(timesteps: np.ndarray, timestep_scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """(c_skip, c_out) at each timestep: the consistency function f(x, t) = c_skip x + c_out x0_hat with
    c_skip(0) = 1, c_out(0) = 0 (Song et al. 2023, eq. 7; t scaled by timestep_scaling, LCM eq. 9)."""
    s = np.asarray(timesteps, dtype=np.float64) * timestep_scaling
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s / np.sqrt(s**2 + SIGMA_DATA**2)
    return c_skip, c_out


class LCMScheduler(Scheduler):
    """Multistep consistency sampling: denoise to x0 in one step, re-noise to the next timestep."""

    name = "lcm"
    diffusers_class = "LCMScheduler"

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        super().__init__(config)
        consistency_timesteps(self, 1)  # refuses original_inference_steps > num_train_timesteps up front

    @property
    def is_stochastic(self) -> bool:
        return True

    @property
    def fewest_sound_steps(self) -> int:
        # A model not distilled for consistency on a zero-terminal-SNR schedule (the shipped default model):
        # 3 of 4 images had off colours at 4 steps, none at 8. LCM-distilled models are made for 2-8 steps.
        return 8 if self.config.rescale_betas_zero_snr else 0

    def _make_run(self, num_inference_steps: int, strength: float = 1.0) -> LCMRun:
        timesteps = consistency_timesteps(self, num_inference_steps, strength)
        return LCMRun(self, timesteps, num_inference_steps)


class LCMRun(SchedulerRun):
    scheduler: LCMScheduler

    def with_strength(self, strength: float) -> SchedulerRun:
        """img2img as diffusers' LatentConsistencyModelImg2ImgPipeline: the schedule is rebuilt from the first
        int(original_inference_steps * strength) distillation timesteps and all num_inference_steps of it run
        (LCMScheduler.set_timesteps(strength=); that pipeline skips no steps, the strength is in the schedule)."""
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) or not 0 < strength <= 1:
            raise SchedulerConfigError(f"strength must be in (0, 1], got {strength!r}")
        return self.scheduler._make_run(self.num_inference_steps, float(strength))

    def _alphas(self, g: int) -> tuple[float, float]:
        ac = self.scheduler.alphas_cumprod
        t = int(self.all_timesteps[g])
        # After the last step diffusers looks up the same timestep again (unused: that step adds no noise).
        t_prev = int(self.all_timesteps[g + 1]) if g + 1 < len(self.all_timesteps) else t
        return float(ac[t]), float(ac[t_prev])

    def _step(
        self, m: np.ndarray, g: int, k: int, x: np.ndarray, draw: Draw, predicted_variance: np.ndarray | None
    ) -> np.ndarray:
        """x0_hat from the model output; f = c_skip x + c_out x0_hat; x' = sqrt(a') f + sqrt(1 - a') z,
        and x' = f after the last step (LCM Alg. 3)."""
        # 1. alpha_bar at this step's timestep and at the next one
        a_t, a_prev = self._alphas(g)
        # 2. the model's x0 estimate, clipped or thresholded if configured
        x0, _ = x0_and_eps(self.config.prediction_type, m, x, a_t)
        x0 = clip_or_threshold(x0, self.config)
        # 3. the consistency function's output (boundary condition: f(x, 0) = x)
        c_skip, c_out = boundary_scalings(self.all_timesteps[g], self.config.timestep_scaling)
        denoised = c_out * x0 + c_skip * x
        # 4. noise it again to the next timestep, except after the last step
        if g == len(self.all_timesteps) - 1:
            return denoised
        return np.sqrt(a_prev) * denoised + np.sqrt(1 - a_prev) * draw()

    def _tables(self) -> dict[str, Any]:
        pairs = [self._alphas(g) for g in range(len(self.all_timesteps))]
        c_skip, c_out = boundary_scalings(self.all_timesteps, self.config.timestep_scaling)
        return {
            "all_alpha_prod_t": [a for a, _ in pairs],
            "all_alpha_prod_t_prev": [p for _, p in pairs],
            "all_c_skip": c_skip.tolist(),
            "all_c_out": c_out.tolist(),
        }




def guidance_embedding(guidance: float, dim: int, rows: int) -> np.ndarray:
    """(rows, dim) float32 w-embedding an LCM-distilled UNet takes as `timestep_cond` (LCM Sec. 4.2; VDM's
    sinusoidal embedding of w * 1000), with w = guidance - 1: diffusers' LatentConsistencyModelPipeline
    (get_guidance_scale_embedding) writes guidance in the Imagen form, LCM was distilled with w = guidance - 1.
    Computed in float32 like diffusers: sin(w 1000 f) moves by an ulp of its argument (~5e-4 at w = 7)."""
    half = dim // 2
    w = np.float32(np.float32(guidance - 1.0) * np.float32(1000.0))
    step = np.float32(np.log(np.float32(10000.0))) / np.float32(half - 1) if half > 1 else np.float32(0.0)
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step)  # (half,)
    args = w * freqs  # (half,)
    emb = np.concatenate([np.sin(args), np.cos(args)])  # (2 half,)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros(1, np.float32)])  # zero pad, as diffusers
    return np.repeat(emb.astype(np.float32)[None], rows, axis=0)  # (rows, dim)


__all__ = ["LCMScheduler", "boundary_scalings", "consistency_timesteps", "distillation_timesteps", "guidance_embedding"]
