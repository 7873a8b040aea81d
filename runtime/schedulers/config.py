"""Scheduler config (the fields of a diffusers scheduler_config.json that matter), beta schedules and
timestep spacing, shared by every scheduler.

Tables are stored as float32, as the torch tensors diffusers keeps, and derived from those float32
values. torch's float32 linspace rounds some betas one ulp differently from numpy's, which moves
sampling trajectories by ~1e-7 relative; everything else follows diffusers' formulas and dtypes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import FileFormatError, read_json_object

logger = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = (None, "fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# DPM-Solver++'s second-order update (midpoint | heun) and UniPC's B(h) (bh1 | bh2); as diffusers, each class
# reads the other's values (and "logrho") as its own default, so one config swaps between them.
SOLVER_TYPES = ("midpoint", "heun", "logrho", "bh1", "bh2")
ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")  # DPM-Solver++ in data prediction: ODE or SDE

# diffusers options we do not implement, with the value that makes them a no-op. A JSON that sets one
# of them to anything else is refused instead of being silently sampled differently.
UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "timestep_type": "discrete",
    "predict_x0": True,  # UniPC in noise prediction
    "solver_p": None,  # UniPC with another predictor
}


def sd_scheduler_config(**changes: Any) -> dict[str, Any]:
    """Stable Diffusion v1/v2's scheduler_config.json (runwayml/stable-diffusion-v1-5's, with every field the
    runtime reads spelled out) as a new dict, with `changes` applied, e.g. `_class_name="DDIMScheduler"` (what
    SD 2.x ships) or `prediction_type="v_prediction"`. SchedulerConfig's defaults are these values."""
    config: dict[str, Any] = {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
    }
    return {**config, **changes}


class SchedulerConfigError(ValueError):
    """A scheduler config value or name is invalid; the message names it and says what to use."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Diffusers scheduler fields; defaults are Stable Diffusion v1's scheduler_config.json.

    Each scheduler reads only the fields diffusers' same-named class reads and ignores the rest, so one
    config can be swapped between schedulers as `Scheduler.from_config(pipe.scheduler.config)` does.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear (SD) | squaredcos_cap_v2 (Nichol & Dhariwal)
    trained_betas: tuple[float, ...] | None = None  # overrides the three fields above
    prediction_type: str = "epsilon"  # what the model predicts: epsilon | v_prediction (SD 2 768px) | sample
    # Where the inference timesteps sit (Lin et al. 2023, "Common Diffusion Noise Schedules...", Table 2).
    timestep_spacing: str = "leading"
    steps_offset: int = 1  # SD v1/v2 add 1 to "leading" timesteps (981..1 rather than 980..0)
    # DDIM/PNDM: alpha_cumprod "before" t=0; True uses 1, False (SD) uses alphas_cumprod[0].
    set_alpha_to_one: bool = False
    clip_sample: bool = False  # DDIM/DDPM: clamp the predicted x0 to +-clip_sample_range (pixel models)
    clip_sample_range: float = 1.0
    # Dynamic thresholding of x0 (Saharia et al. 2022, Imagen); unsuitable for latent models.
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    # Rescale betas to zero terminal SNR (Lin et al. 2023, Alg. 1); pair with v_prediction + trailing.
    rescale_betas_zero_snr: bool = False
    variance_type: str | None = "fixed_small"  # DDPM posterior variance; None means fixed_small
    skip_prk_steps: bool = True  # PNDM: SD skips the Runge-Kutta warm-up and runs PLMS only
    interpolation_type: str = "linear"  # Euler: how sigmas are read between training timesteps
    use_karras_sigmas: bool = False  # Euler, LMS, DPM: sigmas of Karras et al. 2022 eq. 5 (rho = 7)
    sigma_min: float | None = None  # Euler/DPM Karras range; None: the model's own sigma range
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"  # Euler/DPM: the sigma after the last step, 0 or sigma_min
    solver_order: int = 2  # DPM-Solver++: 1, 2 (2M) or 3 (3M); UniPC: 1, 2 or 3
    # DPM-Solver++: the ODE solver (dpmsolver++) or its SDE variant (sde-dpmsolver++, stochastic: Lu et al.
    # 2022, Sec. 5 / Appendix; diffusers' "DPM++ 2M SDE")
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"  # DPM-Solver++ second-order update: midpoint | heun; UniPC: bh1 | bh2
    lower_order_final: bool = True  # DPM: lower order for the last steps when there are fewer than 15; UniPC: always
    euler_at_final: bool = False  # DPM: first-order last step always
    # UniPC: step indices i whose corrector step i + 1 skips (diffusers: "usually the first few", for large guidance)
    disable_corrector: tuple[int, ...] = ()
    # DPM: drop timesteps whose log-SNR lambda is below this; null in JSON means -inf (no clipping).
    lambda_min_clipped: float = -math.inf
    # LCM / TCD: the distillation schedule (T // original_inference_steps apart) the steps are picked from,
    # and the factor on t in the consistency boundary scalings c_skip, c_out (Luo et al. 2023, eq. 9).
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    def __post_init__(self) -> None:
        if self.lambda_min_clipped is None:
            object.__setattr__(self, "lambda_min_clipped", -math.inf)
        _check_types(self)
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        if not isinstance(self.disable_corrector, tuple):
            object.__setattr__(self, "disable_corrector", tuple(self.disable_corrector))
        if any(i < 0 for i in self.disable_corrector):
            raise SchedulerConfigError(f"disable_corrector must list step indices >= 0, got {list(self.disable_corrector)}")
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        _check_choice("interpolation_type", self.interpolation_type, ("linear",))
        _check_choice("algorithm_type", self.algorithm_type, ALGORITHM_TYPES)
        _check_choice("solver_type", self.solver_type, SOLVER_TYPES)
        _check_choice("solver_order", self.solver_order, (1, 2, 3))
        if self.num_train_timesteps < 2:
            raise SchedulerConfigError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.trained_betas is not None:
            if len(self.trained_betas) != self.num_train_timesteps:
                raise SchedulerConfigError(
                    f"trained_betas has {len(self.trained_betas)} values but num_train_timesteps is "
                    f"{self.num_train_timesteps}; give one beta per training timestep"
                )
            if not all(0.0 < b <= 1.0 for b in self.trained_betas):
                raise SchedulerConfigError("trained_betas must all lie in (0, 1]")
        elif not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise SchedulerConfigError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        if self.original_inference_steps < 1:  # above num_train_timesteps: LCM / TCD refuse it, as diffusers
            raise SchedulerConfigError(f"original_inference_steps must be >= 1, got {self.original_inference_steps}")
        if self.timestep_scaling <= 0:
            raise SchedulerConfigError(f"timestep_scaling must be > 0, got {self.timestep_scaling}")
        if self.steps_offset < 0:
            raise SchedulerConfigError(f"steps_offset must be >= 0, got {self.steps_offset}")
        if self.clip_sample_range <= 0 or self.sample_max_value <= 0:
            raise SchedulerConfigError("clip_sample_range and sample_max_value must be > 0")
        if not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise SchedulerConfigError(
                f"dynamic_thresholding_ratio must be in (0, 1], got {self.dynamic_thresholding_ratio}"
            )
        for name in ("sigma_min", "sigma_max"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise SchedulerConfigError(f"{name} must be > 0 or null, got {value}")

    # ---- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (no Infinity, which strict JSON parsers of native ports reject)."""
        d = dataclasses.asdict(self)
        if d["trained_betas"] is not None:
            d["trained_betas"] = list(d["trained_betas"])
        d["disable_corrector"] = list(d["disable_corrector"])
        if math.isinf(d["lambda_min_clipped"]) and d["lambda_min_clipped"] < 0:
            d["lambda_min_clipped"] = None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulerConfig:
        """Read a diffusers scheduler config dict: "_" keys are ignored, unknown keys logged and ignored."""
        if not isinstance(data, dict):
            raise SchedulerConfigError(f"a scheduler config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key.startswith("_"):
                continue
            if key in UNSUPPORTED_OPTIONS:
                if value is not None and value != UNSUPPORTED_OPTIONS[key]:
                    hint = " (Karras sigmas: use_karras_sigmas=true)" if key.endswith("_sigmas") else ""
                    raise SchedulerConfigError(
                        f"scheduler option {key}={value!r} is not supported; set it to {UNSUPPORTED_OPTIONS[key]!r}{hint}"
                    )
                continue
            if key not in names:
                logger.debug("scheduler config: ignoring unknown key %r", key)
                continue
            kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> SchedulerConfig:
        return cls.from_dict(read_scheduler_json(path))


def read_scheduler_json(path: str | Path) -> dict[str, Any]:
    """The JSON object of a scheduler_config.json (bounded read); anything else is one SchedulerConfigError."""
    try:
        return read_json_object(path, what="scheduler config", fix="pass a diffusers scheduler_config.json")
    except FileFormatError as e:
        raise SchedulerConfigError(f"cannot read scheduler config: {e}") from None


_FLOAT = (int, float)


def _check_types(config: SchedulerConfig) -> None:
    # JSON gives ints for floats ("beta_end": 1) and nothing stops a string; check once, here.
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = f.default
        if value is None and (default is None or f.name in ("trained_betas", "variance_type")):
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float) or (default is None and f.name in ("sigma_min", "sigma_max")):
            ok = isinstance(value, _FLOAT) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        elif f.name == "disable_corrector":
            ok = isinstance(value, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        elif f.name == "trained_betas":
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(b, _FLOAT) and not isinstance(b, bool) for b in value
            )
        else:
            ok = True
        if not ok:
            raise SchedulerConfigError(
                f"scheduler config field {f.name} has the wrong type: {value!r} ({type(value).__name__}); "
                f"expected a value like {default!r}"
            )


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise SchedulerConfigError(f"scheduler config {name}={value!r} is not supported; use one of {list(choices)}")


# ---- beta schedules (Ho et al. 2020; Nichol & Dhariwal 2021; Lin et al. 2023) ---------------------------
def _alpha_bar_cosine(t: float) -> float:
    # Nichol & Dhariwal 2021, eq. 17 with s = 0.008.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for(config: SchedulerConfig) -> np.ndarray:
    """beta_1..beta_T as float32 (T,), the schedule diffusers builds for the same config."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, T).astype(np.float32)
    elif config.beta_schedule == "scaled_linear":
        # Linear in sqrt(beta): the LDM / Stable Diffusion schedule.
        betas = (np.linspace(config.beta_start**0.5, config.beta_end**0.5, T) ** 2).astype(np.float32)
    else:  # squaredcos_cap_v2
        betas = np.array(
            [min(1 - _alpha_bar_cosine((i + 1) / T) / _alpha_bar_cosine(i / T), 0.999) for i in range(T)],
            dtype=np.float32,
        )
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so alpha_bar_T = 0 and alpha_bar_1 is kept (Lin et al. 2023, Alg. 1)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def alphas_cumprod_for(betas: np.ndarray) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) as float32 (torch accumulates a float32 cumprod in float64)."""
    return np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the VE noise level of each training timestep (float32)."""
    ac = alphas_cumprod.astype(np.float32)
    return np.sqrt((np.float32(1.0) - ac) / ac)


# ---- timestep spacing ---------------------------------------------------------------------------------
def spaced_timesteps(config: SchedulerConfig, num_inference_steps: int, round_linspace: bool) -> np.ndarray:
    """Descending inference timesteps (float64 holding the values diffusers uses).

    `round_linspace`: DDIM/DDPM/PNDM round "linspace" timesteps to integers; Euler/LMS keep them fractional.
    """
    T, n = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "linspace":
        if round_linspace:
            return np.linspace(0, T - 1, n).round()[::-1].copy()
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    if config.timestep_spacing == "leading":
        step_ratio = T // n
        return (np.arange(0, n) * step_ratio).round()[::-1].astype(np.float64) + config.steps_offset
    step_ratio = T / n  # trailing
    return np.round(np.arange(T, 0, -step_ratio)) - 1
