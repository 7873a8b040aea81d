"""Scheduler names (the CLI's `--scheduler`), diffusers class names, and loading a diffusers
scheduler_config.json with the defaults of the class it names."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import Scheduler
from .config import SchedulerConfig, SchedulerConfigError, read_scheduler_json
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_2s_ancestral import DPMPP2SAncestralScheduler
from .dpm_sde import DPMSolverSDEScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerScheduler
from .euler_ancestral import EulerAncestralScheduler
from .heun import HeunScheduler
from .lcm import LCMScheduler
from .lms import LMSScheduler
from .pndm import PNDMScheduler
from .tcd import TCDScheduler
from .unipc import UniPCMultistepScheduler


def _fixed(cls: type[Scheduler], **fields: Any) -> Callable[..., Scheduler]:
    """A factory of `cls` with `fields` set over the model's config (the name fixes them)."""

    def make(config: SchedulerConfig | None = None) -> Scheduler:
        config = SchedulerConfig() if config is None else config
        return cls(dataclasses.replace(config, **fields))

    return make


def karras_pair(name: str, cls: type[Scheduler], **fields: Any) -> dict[str, Callable[..., Scheduler]]:
    """`name` and `name-karras`: `cls` with `fields` and Karras sigmas off, and on (Karras et al. 2022, eq. 5),
    over the model's config. The one rule for every -karras name: the name decides, not the folder's config."""
    return {name: _fixed(cls, use_karras_sigmas=False, **fields), f"{name}-karras": _fixed(cls, use_karras_sigmas=True, **fields)}


def _dpmpp_2m(sde: bool = False) -> dict[str, Callable[..., Scheduler]]:
    name, algorithm = ("dpmpp-2m-sde", "sde-dpmsolver++") if sde else ("dpmpp-2m", "dpmsolver++")
    return karras_pair(name, DPMSolverMultistepScheduler, solver_order=2, algorithm_type=algorithm)


# CLI name -> factory(config, **options); OPTIONS lists the keyword options a name accepts.
OPTIONS: dict[str, tuple[str, ...]] = {"ddim": ("eta",), "tcd": ("gamma",), "dpmpp-2s-a": ("eta",)}
_CLASS_OPTIONS: dict[str, tuple[str, ...]] = {"DDIMScheduler": ("eta",), "TCDScheduler": ("gamma",)}
# The option a request's `eta` (--eta) sets, by scheduler: diffusers passes `eta` to DDIMScheduler.step (DDIM's
# eta) and to TCDScheduler.step (TCD's gamma); k-diffusion's sample_dpmpp_2s_ancestral takes eta.
ETA_OPTIONS: dict[str, str] = {"ddim": "eta", "tcd": "gamma", "dpmpp-2s-a": "eta"}
SCHEDULERS: dict[str, Callable[..., Scheduler]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    **karras_pair("euler", EulerScheduler),
    "euler-a": EulerAncestralScheduler,
    **_dpmpp_2m(),
    **_dpmpp_2m(sde=True),
    "pndm": PNDMScheduler,
    **karras_pair("lms", LMSScheduler),
    **karras_pair("unipc", UniPCMultistepScheduler),
    **karras_pair("heun", HeunScheduler),
    "lcm": LCMScheduler,
    "tcd": TCDScheduler,
    "dpmpp-2s-a": DPMPP2SAncestralScheduler,  # no diffusers class: k-diffusion's sample_dpmpp_2s_ancestral
    **karras_pair("dpmpp-sde", DPMSolverSDEScheduler),
}

DIFFUSERS_SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.diffusers_class: cls
    for cls in (
        DDPMScheduler,
        DDIMScheduler,
        EulerScheduler,
        EulerAncestralScheduler,
        DPMSolverMultistepScheduler,
        PNDMScheduler,
        LMSScheduler,
        UniPCMultistepScheduler,
        HeunScheduler,
        LCMScheduler,
        TCDScheduler,
        DPMSolverSDEScheduler,
    )
}

# diffusers' constructor defaults, for the fields each class has: a scheduler_config.json that omits a
# key means that class's default, not SchedulerConfig's (which is Stable Diffusion v1's).
_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
}
_THRESHOLDING = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_CLIPPING = {"clip_sample": True, "clip_sample_range": 1.0}
DIFFUSERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": {
        **_COMMON, **_THRESHOLDING, **_CLIPPING,
        "variance_type": "fixed_small", "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
    },
    "DDIMScheduler": {
        **_COMMON, **_THRESHOLDING, **_CLIPPING,
        "set_alpha_to_one": True, "timestep_spacing": "leading", "rescale_betas_zero_snr": False,
    },
    "PNDMScheduler": {**_COMMON, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"},
    "EulerDiscreteScheduler": {
        **_COMMON,
        "interpolation_type": "linear", "use_karras_sigmas": False, "sigma_min": None, "sigma_max": None,
        "timestep_spacing": "linspace", "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {**_COMMON, "timestep_spacing": "linspace", "rescale_betas_zero_snr": False},
    "DPMSolverMultistepScheduler": {
        **_COMMON, **_THRESHOLDING,
        "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
        "euler_at_final": False, "use_karras_sigmas": False, "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf, "variance_type": None, "timestep_spacing": "linspace",
        "rescale_betas_zero_snr": False,
    },
    "LMSDiscreteScheduler": {**_COMMON, "use_karras_sigmas": False, "timestep_spacing": "linspace"},
    "HeunDiscreteScheduler": {
        **_COMMON, "use_karras_sigmas": False, "clip_sample": False, "clip_sample_range": 1.0,
        "timestep_spacing": "linspace", "beta_start": 0.00085, "beta_end": 0.012,
    },
    "UniPCMultistepScheduler": {
        **_COMMON, **_THRESHOLDING,
        "solver_order": 2, "solver_type": "bh2", "lower_order_final": True, "use_karras_sigmas": False,
        "timestep_spacing": "linspace", "final_sigmas_type": "zero", "rescale_betas_zero_snr": False,
        "sigma_min": None, "sigma_max": None, "disable_corrector": [],
    },
    "LCMScheduler": {
        **_COMMON, **_THRESHOLDING, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True,
        "timestep_spacing": "leading", "timestep_scaling": 10.0, "rescale_betas_zero_snr": False,
    },
}  # fmt: skip
DIFFUSERS_DEFAULTS["DPMSolverSDEScheduler"] = {
    **_COMMON, "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": False, "timestep_spacing": "linspace",
}
# TCD's constructor takes exactly LCM's arguments, with the same defaults.
DIFFUSERS_DEFAULTS["TCDScheduler"] = dict(DIFFUSERS_DEFAULTS["LCMScheduler"])


def make_scheduler(name: str, config: SchedulerConfig | None = None, **options: Any) -> Scheduler:
    """The scheduler registered as `name` (see SCHEDULERS) for `config` (default: SD v1's)."""
    if name not in SCHEDULERS:
        raise SchedulerConfigError(f"unknown scheduler {name!r}; valid names are {sorted(SCHEDULERS)}")
    unknown = sorted(set(options) - set(OPTIONS.get(name, ())))
    if unknown:
        raise SchedulerConfigError(
            f"scheduler {name!r} does not take options {unknown}; it takes {list(OPTIONS.get(name, ()))}"
        )
    return SCHEDULERS[name](config, **options)


def with_eta(name: str, config: SchedulerConfig, eta: float) -> Scheduler:
    """The scheduler `name` for `config` with a request's eta (ETA_OPTIONS: DDIM's eta, TCD's gamma, DPM++ 2S a's
    eta); SchedulerConfigError naming the schedulers that take one when `name` does not."""
    if name not in ETA_OPTIONS:
        raise SchedulerConfigError(
            f"{name} takes no eta; eta applies to {', '.join(f'{n} ({o})' if o != 'eta' else n for n, o in ETA_OPTIONS.items())}; drop it"
        )
    return make_scheduler(name, config, **{ETA_OPTIONS[name]: eta})


def usable_schedulers(config: SchedulerConfig) -> tuple[dict[str, Scheduler], dict[str, str]]:
    """Every registered scheduler built for `config` (name -> scheduler), and the names that cannot take
    it (name -> the reason, e.g. pndm under a zero-terminal-SNR schedule)."""
    usable: dict[str, Scheduler] = {}
    unusable: dict[str, str] = {}
    for name in SCHEDULERS:
        try:
            usable[name] = make_scheduler(name, config)
        except SchedulerConfigError as e:
            unusable[name] = str(e)
    return usable, unusable


def scheduler_from_diffusers_config(data: dict[str, Any], **options: Any) -> Scheduler:
    """The scheduler of a diffusers scheduler config dict, by its "_class_name"."""
    class_name = data.get("_class_name")
    if class_name not in DIFFUSERS_SCHEDULERS:
        raise SchedulerConfigError(
            f"unsupported diffusers scheduler class {class_name!r}; supported: {sorted(DIFFUSERS_SCHEDULERS)} "
            "(or pick one by name with make_scheduler)"
        )
    unknown = sorted(set(options) - set(_CLASS_OPTIONS.get(class_name, ())))
    if unknown:
        raise SchedulerConfigError(f"{class_name} does not take options {unknown}")
    config = SchedulerConfig.from_dict({**DIFFUSERS_DEFAULTS[class_name], **data})
    return DIFFUSERS_SCHEDULERS[class_name](config, **options)


def scheduler_from_diffusers_json(path: str | Path, **options: Any) -> Scheduler:
    """The scheduler a diffusers scheduler_config.json describes (class and config)."""
    return scheduler_from_diffusers_config(read_scheduler_json(path), **options)
