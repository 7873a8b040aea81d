"""Numpy schedulers with the diffusers scheduler interface, shared by the runtime and the reference.

A `Scheduler` is immutable (config + training tables); `set_timesteps(n)` returns a `SchedulerRun`
holding one sampling loop's state, stepped with an explicit index (see base.py).
"""

from .base import Scheduler, SchedulerRun, SchedulerStepError
from .config import PREDICTION_TYPES, SchedulerConfig, SchedulerConfigError, sd_scheduler_config
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
from .registry import (
    DIFFUSERS_DEFAULTS,
    DIFFUSERS_SCHEDULERS,
    ETA_OPTIONS,
    SCHEDULERS,
    make_scheduler,
    scheduler_from_diffusers_config,
    scheduler_from_diffusers_json,
    usable_schedulers,
    with_eta,
)
from .unipc import UniPCMultistepScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DIFFUSERS_DEFAULTS",
    "DIFFUSERS_SCHEDULERS",
    "DPMPP2SAncestralScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler",
    "ETA_OPTIONS",
    "EulerAncestralScheduler",
    "EulerScheduler",
    "HeunScheduler",
    "LCMScheduler",
    "LMSScheduler",
    "PNDMScheduler",
    "PREDICTION_TYPES",
    "SCHEDULERS",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerConfigError",
    "SchedulerRun",
    "SchedulerStepError",
    "TCDScheduler",
    "UniPCMultistepScheduler",
    "make_scheduler",
    "scheduler_from_diffusers_config",
    "scheduler_from_diffusers_json",
    "sd_scheduler_config",
    "usable_schedulers",
    "with_eta",
]
