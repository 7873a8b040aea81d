"""The scheduler a model samples with when the request names none: the model folder's own.

A diffusers folder says which scheduler it was made for in scheduler/scheduler_config.json's `_class_name`
(EulerDiscreteScheduler for SDXL, EulerAncestralDiscreteScheduler with trailing spacing for SDXL-Turbo,
LCMScheduler for LCM-distilled models, PNDM or DDIM for SD 1.x / 2.x), as diffusers' pipelines use it by
default. Export maps it to a `--scheduler` name once and records it in the manifest (`default_scheduler`);
the runtime samples with it unless told otherwise. A class we do not implement, or one that cannot take the
model's schedule (PNDM under zero terminal SNR), falls back to DDIM, and the reason is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .schedulers import SCHEDULERS, SchedulerConfig, make_scheduler
from .schedulers.config import SchedulerConfigError
from .schedulers.registry import DIFFUSERS_SCHEDULERS

FALLBACK = "ddim"  # what every model can use, and what the runtime used before models named their own


@dataclass(frozen=True)
class SchedulerChoice:
    name: str  # a --scheduler name (runtime.schedulers.SCHEDULERS)
    source: str  # the diffusers class it comes from ("" if the config names none)
    note: str = ""  # why the folder's class was not taken as it is (fallback, or an option our name fixes)

    def describe(self) -> str:
        """One line for people: "euler (the model's EulerDiscreteScheduler)"."""
        origin = f" (the model's {self.source})" if self.source else ""
        return f"{self.name}{origin}" + (f"; {self.note}" if self.note else "")


def karras_variant(name: str, karras: bool) -> str:
    """`name`, or its -karras twin where the config asks for Karras sigmas (`karras`) and one exists (euler, dpmpp-2m(-sde),
    dpmpp-sde, heun, lms, unipc): a plain name samples without them. Also applied to the default a manifest recorded,
    since builds made before heun-karras and lms-karras existed recorded "heun"/"lms" for such folders."""
    if karras and not name.endswith("-karras") and f"{name}-karras" in SCHEDULERS:
        return f"{name}-karras"
    return name


def _name_of_class(class_name: str, config: dict[str, Any]) -> tuple[str | None, str]:
    """Our name for a diffusers class (with the config options that pick a variant), and what it changes."""
    note = ""
    if class_name == "EulerDiscreteScheduler":  # its class names itself per instance (euler / euler-karras)
        name: str | None = "euler"
    elif class_name == "DPMSolverMultistepScheduler":  # likewise, and the algorithm picks 2M or 2M SDE
        name = "dpmpp-2m" + ("-sde" if config.get("algorithm_type", "dpmsolver++") == "sde-dpmsolver++" else "")
    else:
        cls = DIFFUSERS_SCHEDULERS.get(class_name)
        name = cls.name if cls is not None and isinstance(cls.name, str) and cls.name else None
    if name is not None:
        name = karras_variant(name, bool(config.get("use_karras_sigmas", False)))
    if class_name == "DPMSolverMultistepScheduler" and config.get("solver_order", 2) != 2:
        note = f"solver_order {config.get('solver_order')} sampled as 2 ({name} is DPM++ 2M)"
    return name, note


def default_scheduler(config: dict[str, Any]) -> SchedulerChoice:
    """The --scheduler name for a diffusers scheduler_config.json dict (its `_class_name` and options)."""
    class_name = config.get("_class_name")
    if not isinstance(class_name, str) or not class_name:
        return SchedulerChoice(FALLBACK, "", "the scheduler config names no class")
    name, note = _name_of_class(class_name, config)
    if name is None:
        return SchedulerChoice(FALLBACK, class_name, f"{class_name} is not implemented here")
    try:
        make_scheduler(name, SchedulerConfig.from_dict(config))
    except SchedulerConfigError as e:  # e.g. pndm or lms under zero terminal SNR
        return SchedulerChoice(FALLBACK, class_name, f"{name} cannot sample this model ({e})")
    return SchedulerChoice(name, class_name, note)


def check_scheduler_name(value: Any, what: str) -> str:
    """A recorded default scheduler name, checked (the manifest is read as untrusted input)."""
    if not isinstance(value, str) or value not in SCHEDULERS:
        raise ValueError(f"{what} must be one of {sorted(SCHEDULERS)}, got {value!r}")
    return value
