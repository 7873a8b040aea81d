"""The scheduler interface: an immutable `Scheduler` (config + training tables) and a loop-local
`SchedulerRun` (timesteps, sigmas, multistep history) that `Scheduler.set_timesteps` returns.

    sched = DDIMScheduler(config)
    run = sched.set_timesteps(50)                       # fresh state per sampling loop
    x = run.init_noise_sigma * noise
    for i, t in enumerate(run.timesteps):
        eps = model(run.scale_model_input(x, i), t)
        x = run.step(eps, i, x, generator=rng)          # the step index is explicit

Diffusers keeps this state (step index, model-output history) inside the scheduler object; here a
scheduler can be shared by concurrent requests and a step never depends on hidden call order, except
that multistep runs check they are stepped 0, 1, 2, ... in order.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from .config import (
    PREDICTION_TYPES,
    SchedulerConfig,
    SchedulerConfigError,
    alphas_cumprod_for,
    betas_for,
)

Draw = Callable[[], np.ndarray]  # returns standard normal noise shaped like the sample (float64)


class SchedulerStepError(ValueError):
    """A run was stepped wrongly (index out of range, out of order, missing noise); the message says how to fix it."""


def readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


class Scheduler:
    """Config and training tables (betas, alphas_cumprod) of one diffusers-compatible scheduler; immutable."""

    name: ClassVar[str] = ""  # the CLI name, e.g. "ddim"
    diffusers_class: ClassVar[str] = ""  # the diffusers class it reproduces
    prediction_types: ClassVar[tuple[str, ...]] = PREDICTION_TYPES
    # Euler / Euler ancestral / DPM-Solver set alpha_bar_T = 2**-24 after zero-SNR rescaling, so that
    # sigma_T stays finite; DDIM / DDPM keep alpha_bar_T = 0.
    terminal_alpha_bar_floor: ClassVar[bool] = False
    # Why this scheduler cannot sample a zero-terminal-SNR schedule ("" = it can).
    zero_snr_obstacle: ClassVar[str] = ""
    # The solver_type values this class reads, its default first; diffusers' DPM-Solver++ and UniPC read
    # each other's values as their default, so one config swaps between them (from_config).
    solver_types: ClassVar[tuple[str, ...]] = ()
    # The class has a `<name>-karras` CLI name too (registry.karras_pair): an instance with use_karras_sigmas is
    # that one, named so before the checks below, whose messages name it.
    karras_variant: ClassVar[bool] = False

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        config = SchedulerConfig() if config is None else config
        if not isinstance(config, SchedulerConfig):
            raise SchedulerConfigError(
                f"{type(self).__name__}: expected a SchedulerConfig, got {type(config).__name__}"
            )
        if self.karras_variant and config.use_karras_sigmas:
            self.name = f"{type(self).name}-karras"
        if self.solver_types and config.solver_type not in self.solver_types:
            config = dataclasses.replace(config, solver_type=self.solver_types[0])
        self.config = config
        if config.prediction_type not in self.prediction_types:
            raise SchedulerConfigError(
                f"{self.name} does not support prediction_type={config.prediction_type!r}; "
                f"use one of {list(self.prediction_types)}"
            )
        if config.rescale_betas_zero_snr and self.zero_snr_obstacle:
            raise SchedulerConfigError(
                f"{self.name} ({self.diffusers_class}) cannot sample a zero-terminal-SNR schedule "
                f"(rescale_betas_zero_snr): {self.zero_snr_obstacle}"
            )
        self.betas = readonly(betas_for(config))
        alphas_cumprod = alphas_cumprod_for(self.betas)
        if config.rescale_betas_zero_snr and self.terminal_alpha_bar_floor:
            alphas_cumprod[-1] = 2.0**-24
        self.alphas_cumprod = readonly(alphas_cumprod)

    @property
    def fewest_sound_steps(self) -> int:
        """Runs with fewer steps than this are known to give broken images on this config (0: no known
        bound); the pipeline warns about them."""
        return 0

    @property
    def is_stochastic(self) -> bool:
        """Whether `step` needs a generator or a noise array."""
        return False

    def set_timesteps(self, num_inference_steps: int) -> SchedulerRun:
        """A fresh run of `num_inference_steps` denoising steps (diffusers' `set_timesteps`)."""
        T = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise SchedulerConfigError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= T:
            raise SchedulerConfigError(
                f"num_inference_steps must be in [1, {T}] (num_train_timesteps), got {num_inference_steps}"
            )
        return self._make_run(int(num_inference_steps))

    def _make_run(self, num_inference_steps: int) -> SchedulerRun:
        raise NotImplementedError

    def _check_timesteps(self, timesteps: np.ndarray) -> None:
        # For schedulers that index alphas_cumprod by timestep: "leading" + steps_offset can step past
        # the last training timestep (1000 steps, offset 1), where diffusers fails with an IndexError.
        # Sigma schedulers interpolate (and clamp) instead, as diffusers does, so they skip this check.
        if len(timesteps) and (timesteps.max() > self.config.num_train_timesteps - 1 or timesteps.min() < 0):
            raise SchedulerConfigError(
                f"{self.name}: timesteps {timesteps.min()}..{timesteps.max()} fall outside the training range "
                f"0..{self.config.num_train_timesteps - 1}; lower steps_offset or num_inference_steps"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class SchedulerRun:
    """Everything that changes during one sampling loop. Index `i` is the position in `self.timesteps`."""

    multistep: ClassVar[bool] = False  # step i reads the history of steps < i
    order: ClassVar[int] = 1  # model evaluations per step, as diffusers' `scheduler.order`
    accepts_learned_variance: ClassVar[bool] = False

    def __init__(self, scheduler: Scheduler, all_timesteps: np.ndarray, num_inference_steps: int) -> None:
        self.scheduler = scheduler
        self.config = scheduler.config
        self.num_inference_steps = num_inference_steps  # as requested (PNDM runs one step more)
        self.all_timesteps = readonly(all_timesteps)
        self.begin_index = 0  # > 0 after with_strength: tables are indexed by begin_index + i
        self.timesteps = self.all_timesteps
        self._reset()

    # ---- the loop ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial latent: x_T = init_noise_sigma * N(0, I)."""
        return 1.0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """The model input at step i (sigma-parametrised samplers divide by sqrt(sigma^2 + 1))."""
        g = self._global_index(i, "scale_model_input")
        return self._scale_model_input(np.asarray(sample, dtype=np.float64), g).astype(np.float32)

    def step(
        self,
        model_output: np.ndarray,
        i: int,
        sample: np.ndarray,
        *,
        generator: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """x_{t_{i+1}} from x_{t_i} and the model output at step i. Stochastic steps draw their noise from
        `generator` or take it from `noise` (shaped like `sample`)."""
        g = self._global_index(i, "step")
        i = int(i)
        if generator is not None and noise is not None:
            raise SchedulerStepError("pass either generator= or noise= to step, not both")
        if self.multistep:
            if i == 0:
                self._reset()
            elif i != self._next_index:
                raise SchedulerStepError(
                    f"{self.scheduler.name} keeps a history of earlier steps: call step with i = 0, 1, 2, ... "
                    f"in order (expected {self._next_index}, got {i}), or start a new run"
                )
        x = np.asarray(sample, dtype=np.float64)
        m = np.asarray(model_output, dtype=np.float64)
        m, predicted_variance = self._split_model_output(m, x)

        def draw() -> np.ndarray:
            if noise is not None:
                z = np.asarray(noise)
                if z.shape != x.shape:
                    raise SchedulerStepError(f"noise has shape {z.shape} but the sample has {x.shape}")
                return z.astype(np.float64)
            if generator is not None:
                return generator.standard_normal(x.shape, dtype=np.float32).astype(np.float64)
            raise SchedulerStepError(
                f"{self.scheduler.name} step {i} is stochastic: pass generator=np.random.default_rng(seed) or noise="
            )

        out = self._step(m, g, i, x, draw, predicted_variance)
        self._next_index = i + 1
        return out.astype(np.float32)

    def denoised(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """The model's estimate of x0 at step i from its output on `sample` (diffusers' `pred_original_sample`,
        k-diffusion's `denoised`), unclipped; reads no history, so it may be called beside `step` (previews)."""
        g = self._global_index(i, "denoised")
        x = np.asarray(sample, dtype=np.float64)
        m, _ = self._split_model_output(np.asarray(model_output, dtype=np.float64), x)
        return self._denoised(m, g, x).astype(np.float32)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Forward process q(x_t | x_0) to the noise level of `self.timesteps[i]` (img2img, inpainting)."""
        g = self._global_index(i, "add_noise")
        x0 = np.asarray(original_samples, dtype=np.float64)
        z = np.asarray(noise, dtype=np.float64)
        if z.shape != x0.shape:
            raise SchedulerStepError(f"noise has shape {z.shape} but the samples have {x0.shape}")
        return self._add_noise(x0, z, g).astype(np.float32)

    def with_strength(self, strength: float) -> SchedulerRun:
        """A fresh run that skips the first steps, as StableDiffusionImg2ImgPipeline.get_timesteps does:
        it keeps int(num_inference_steps * strength) steps of the full schedule."""
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) or not 0 < strength <= 1:
            raise SchedulerConfigError(f"strength must be in (0, 1], got {strength!r}")
        n = self.num_inference_steps
        init_timestep = min(int(n * strength), n)
        begin = max(n - init_timestep, 0) * self.order
        if begin >= len(self.all_timesteps):
            raise SchedulerConfigError(
                f"strength {strength} with {n} steps leaves no denoising step; raise strength or num_inference_steps"
            )
        run = copy.copy(self)
        run.begin_index = begin
        run.timesteps = self.all_timesteps[begin:]
        run._reset()
        return run

    def tables(self) -> dict[str, Any]:
        """Everything a native port needs to replay this run: config, timesteps and per-step tables.
        Tables named all_* and sigmas are indexed by begin_index + i."""
        return {
            "scheduler": self.scheduler.name,
            "diffusers_class": self.scheduler.diffusers_class,
            "config": self.config.to_dict(),
            "num_inference_steps": self.num_inference_steps,
            "begin_index": self.begin_index,
            "order": self.order,
            "init_noise_sigma": float(self.init_noise_sigma),
            "timesteps": self.timesteps.tolist(),
            "all_timesteps": self.all_timesteps.tolist(),
            "alphas_cumprod": self.scheduler.alphas_cumprod.tolist(),
            **self._tables(),
        }

    # ---- hooks for subclasses --------------------------------------------------------------------
    def _reset(self) -> None:
        self._next_index = 0
        self._reset_history()

    def _reset_history(self) -> None:
        """Clear the multistep history (called at step 0 and by with_strength)."""

    def _scale_model_input(self, sample: np.ndarray, g: int) -> np.ndarray:
        return sample

    def _step(
        self, m: np.ndarray, g: int, k: int, x: np.ndarray, draw: Draw, predicted_variance: np.ndarray | None
    ) -> np.ndarray:
        """One step at global table index g = begin_index + k; k counts steps taken in this run."""
        raise NotImplementedError

    def _alpha_bar(self, g: int) -> np.float64:
        """alpha_bar at the run's g-th timestep (VP schedulers: DDIM, DDPM, PNDM, LCM, TCD)."""
        return np.float64(self.scheduler.alphas_cumprod[int(self.all_timesteps[g])])

    def _denoised(self, m: np.ndarray, g: int, x: np.ndarray) -> np.ndarray:
        return x0_and_eps(self.config.prediction_type, m, x, self._alpha_bar(g))[0]

    def _add_noise(self, x0: np.ndarray, noise: np.ndarray, g: int) -> np.ndarray:
        # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), Ho et al. 2020 eq. 4.
        alpha_prod_t = self._alpha_bar(g)
        return np.sqrt(alpha_prod_t) * x0 + np.sqrt(1.0 - alpha_prod_t) * noise

    def _tables(self) -> dict[str, Any]:
        return {}

    # ---- helpers -------------------------------------------------------------------------------------
    def _global_index(self, i: int, what: str) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise SchedulerStepError(
                f"{what}: the step index must be an int (from enumerate(run.timesteps)), got {i!r}"
            )
        if not 0 <= i < len(self.timesteps):
            raise SchedulerStepError(
                f"{what}: step index {i} is out of range for a run of {len(self.timesteps)} steps; "
                f"pass 0 <= i < {len(self.timesteps)}"
            )
        return self.begin_index + int(i)

    def _split_model_output(self, m: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if m.shape == x.shape:
            return m, None
        c = x.shape[1] if x.ndim > 1 else 0
        if (
            self.accepts_learned_variance
            and self.config.variance_type in ("learned", "learned_range")
            and m.shape[:1] + m.shape[2:] == x.shape[:1] + x.shape[2:]
            and m.shape[1] == 2 * c
        ):
            return m[:, :c], m[:, c:]  # (B, C, ...) prediction, (B, C, ...) variance
        raise SchedulerStepError(f"model_output has shape {m.shape} but the sample has {x.shape}; they must match")


class SigmaRun(SchedulerRun):
    """A run over a VE sigma table (one entry per step plus the tail after the last step): Euler, Euler
    ancestral, LMS and DPM-Solver++ (which overrides the VE conventions below with VP ones)."""

    def __init__(self, scheduler: Scheduler, timesteps: np.ndarray, num_inference_steps: int, sigmas: np.ndarray):
        super().__init__(scheduler, timesteps, num_inference_steps)
        self.sigmas = readonly(sigmas)

    @property
    def init_noise_sigma(self) -> float:
        # x_T = sigma_max N(0, I); diffusers uses sqrt(sigma_max^2 + 1) for "leading" spacing, whose
        # first timestep is below T - 1 (computed in float32 as diffusers does).
        sigma_max = float(np.max(self.sigmas))
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return sigma_max
        return float(np.sqrt(np.float32(sigma_max) ** 2 + 1))

    def _model_sigma(self, g: int) -> np.float64:
        """The VE noise level of the sample the model sees at entry g."""
        return np.float64(self.sigmas[g])

    def _scale_model_input(self, sample: np.ndarray, g: int) -> np.ndarray:
        # The model was trained on VP inputs x / sqrt(sigma^2 + 1) (Karras et al. 2022, Table 1, c_in).
        sigma = self._model_sigma(g)
        return sample / np.sqrt(sigma**2 + 1)

    def _denoised(self, m: np.ndarray, g: int, x: np.ndarray) -> np.ndarray:
        return x0_from_sigma(self.config.prediction_type, m, x, self._model_sigma(g))

    def _add_noise(self, x0: np.ndarray, noise: np.ndarray, g: int) -> np.ndarray:
        return x0 + noise * np.float64(self.sigmas[g])  # VE: x = x0 + sigma eps

    def _tables(self) -> dict[str, Any]:
        return {"sigmas": self.sigmas.tolist()}


class TwoStageRun(SigmaRun):
    """A sigma-table run whose steps take two model calls, as two entries of the run (Heun, DPM++ 2S a,
    DPM++ SDE): the first call's entry begins a step and keeps what the second needs (`_first` returns it, or
    None when the step ends in one call, as a last step to sigma 0 does); the second's entry finishes it."""

    multistep = True  # the second call finishes the step the first began
    order = 2

    def _reset_history(self) -> None:
        self._pending: Any = None

    def _step(
        self, m: np.ndarray, g: int, k: int, x: np.ndarray, draw: Draw, predicted_variance: np.ndarray | None
    ) -> np.ndarray:
        if self._pending is None:  # a run (also with_strength's) starts on a first call
            out, self._pending = self._first(m, g, x, draw)
            return out
        pending, self._pending = self._pending, None
        return self._second(m, g, x, pending, draw)

    def _first(self, m: np.ndarray, g: int, x: np.ndarray, draw: Draw) -> tuple[np.ndarray, Any]:
        """(the sample the second call's model input is made from, state for `_second` or None)."""
        raise NotImplementedError

    def _second(self, m: np.ndarray, g: int, x: np.ndarray, pending: Any, draw: Draw) -> np.ndarray:
        raise NotImplementedError


def vp(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the VP process at VE noise level sigma."""
    alpha = 1.0 / np.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


class VPSigmaRun(SigmaRun):
    """A sigma-table run that integrates in VP samples x = alpha x0 + sigma_vp eps (DPM-Solver++, UniPC):
    x_T is unit noise and the model input is the sample itself."""

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def _scale_model_input(self, sample: np.ndarray, g: int) -> np.ndarray:
        return sample

    def _denoised(self, m: np.ndarray, g: int, x: np.ndarray) -> np.ndarray:
        alpha_t, _ = vp(np.float64(self.sigmas[g]))
        return x0_and_eps(self.config.prediction_type, m, x, alpha_t**2)[0]

    def _add_noise(self, x0: np.ndarray, noise: np.ndarray, g: int) -> np.ndarray:
        alpha_t, sigma_t = vp(np.float64(self.sigmas[g]))
        return alpha_t * x0 + sigma_t * noise


# ---- shared maths ----------------------------------------------------------------------------------------
def x0_and_eps(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_prod_t: float
) -> tuple[np.ndarray, np.ndarray]:
    """(x0_hat, eps_hat) from the model output at alpha_bar_t: x_t = sqrt(a) x0 + sqrt(1-a) eps, with
    v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022, Sec. 4)."""
    a, b = np.sqrt(alpha_prod_t), np.sqrt(1.0 - alpha_prod_t)
    if prediction_type == "epsilon":
        return (sample - b * model_output) / a, model_output
    if prediction_type == "v_prediction":
        return a * sample - b * model_output, a * model_output + b * sample
    return model_output, (sample - a * model_output) / b  # "sample": the model predicts x0


def x0_from_sigma(prediction_type: str, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
    """Denoised x0_hat = D(x; sigma) for the VE sample x = x0 + sigma eps (Karras et al. 2022, Sec. 2)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / np.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
    return model_output


def dynamic_threshold(x0: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Dynamic thresholding (Saharia et al. 2022, Sec. 2.3): s = the `ratio` quantile of |x0| per sample,
    clamped to [1, max_value]; x0 is clipped to [-s, s] and divided by s."""
    b = x0.shape[0]
    flat = x0.reshape(b, -1)  # (B, C*H*W)
    s = np.quantile(np.abs(flat), ratio, axis=1)  # (B,)
    s = np.clip(s, 1.0, max_value)[:, None]  # (B, 1)
    return (np.clip(flat, -s, s) / s).reshape(x0.shape)


def clip_or_threshold(x0: np.ndarray, config: SchedulerConfig) -> np.ndarray:
    """DDIM/DDPM: dynamic thresholding or plain clipping of x0_hat to +-clip_sample_range, as configured."""
    if config.thresholding:
        return dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.clip_sample:
        return np.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0
