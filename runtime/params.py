"""The parameters of one generation request, validated against the artifacts before any work is done."""

from __future__ import annotations

import math
import numbers
import operator
import secrets
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from .contracts import ModelFacts, ShapeProfile
from .schedulers import ETA_OPTIONS, SCHEDULERS


# What one call may produce, whatever an artifacts folder's profile allows, checked before anything is
# allocated: images (a service batches far fewer; the CLI names one file per image) and pixels (images x
# height x width: the decoded batch alone is 12 bytes per pixel, 3.2 GB here, e.g. 64 images of 2048 x 2048).
MAX_IMAGES_PER_CALL = 1024
MAX_PIXELS_PER_CALL = 2**28
# The widest shape profile any model of the SD family can use: export refuses a larger one, and the reference
# (no engine, so no limits of its own) accepts exactly this much. 4096 px per side is twice the largest native
# resolution of the family (SDXL: 1024 px; larger images are made by tiling or upscaling, not by one UNet pass),
# and a single 128-channel fp32 VAE feature map at 4096 x 4096 is already 8 GiB. 64 images per prompt: the UNet
# then runs a batch of 128 under guidance, beyond what any one GPU holds at SD sizes.
MAX_PROFILE_SIDE = 4096
MAX_PROFILE_BATCH = 64


class Limits(Protocol):
    """What a request is checked against: a Manifest, or a Pipeline built from components."""

    @property
    def facts(self) -> ModelFacts: ...

    @property
    def profile(self) -> ShapeProfile: ...


class GenerationError(ValueError):
    """A generation parameter is invalid for these artifacts; the message names it and the allowed values."""


@dataclass(frozen=True)
class GenerationParams:
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]  # one per prompt
    steps: int
    guidance: float
    scheduler: str
    seed: int
    batch: int  # images per prompt
    height: int
    width: int
    strength: float  # img2img / inpainting: the fraction of the schedule that is run
    guidance_rescale: float = 0.0  # runtime/guidance.py: 0 is plain guidance
    # Inpainting: Gaussian radius (pixels) of the seam where the kept pixels are pasted back; None: no paste.
    mask_blur: float | None = 0.0

    @property
    def images(self) -> int:
        return len(self.prompts) * self.batch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_prompts(value: str | list[str] | tuple[str, ...], what: str = "prompt") -> tuple[str, ...]:
    """A prompt or list of prompts as a tuple of strings that are valid Unicode (the tokenizer and the
    image metadata need UTF-8; a command line of non-UTF-8 bytes arrives as lone surrogates)."""
    if isinstance(value, str):
        prompts: tuple = (value,)
    elif isinstance(value, (list, tuple)):
        prompts = tuple(value)
    else:
        raise GenerationError(f"{what} must be a string or a non-empty list of strings, got {type(value).__name__}")
    if not prompts:
        raise GenerationError(f"{what} must be a string or a non-empty list of strings, got an empty list")
    for i, p in enumerate(prompts):
        where = what if len(prompts) == 1 else f"{what} {i}"
        if not isinstance(p, str):
            raise GenerationError(f"{where} must be a string, got {type(p).__name__}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise GenerationError(
                f"{where} is not valid text: character {e.start} ({p[e.start]!r}) is not Unicode "
                "(bytes that are not UTF-8?); pass UTF-8 text"
            ) from None
    return prompts


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise GenerationError(f"{what} must be an integer, got {value!r}")
    return operator.index(value)


def check_image_count(images: int, what: str = "images per call") -> None:
    if images > MAX_IMAGES_PER_CALL:
        raise GenerationError(f"{images} {what} is over the runtime's limit of {MAX_IMAGES_PER_CALL}; generate them in several calls")


# The image-to-image inputs as each caller spells them: the Python API's keywords, the command line's flags.
IMAGE_INPUT_KEYWORDS = {"init_image": "init_image", "strength": "strength", "mask": "mask", "mask_blur": "mask_blur"}
IMAGE_INPUT_FLAGS = {"init_image": "--init-image", "strength": "--strength", "mask": "--mask", "mask_blur": "--mask-blur"}


def check_image_inputs(
    *, init_image: bool, strength: bool, mask: bool, mask_blur: bool, init_latents: bool = False,
    names: dict[str, str] = IMAGE_INPUT_KEYWORDS,
) -> None:  # fmt: skip
    """What each image-to-image input needs beside it (each argument: whether it was given); a GenerationError
    naming them as `names` spells them. `strength` may also run from `init_latents` (the API's refiner hand-off)."""
    if mask and not init_image:
        raise GenerationError(f"{names['mask']} needs {names['init_image']}: inpainting repaints part of an image")
    if strength and not (init_image or init_latents):
        raise GenerationError(f"{names['strength']} needs {names['init_image']}: it is the fraction of the schedule run from that image")
    if mask_blur and not mask:
        raise GenerationError(f"{names['mask_blur']} needs {names['mask']}: it softens the seam of the inpainted region")


def make_params(
    limits: Limits,
    *,
    prompt: str | list[str],
    negative_prompt: str | list[str],
    steps: int,
    guidance: float,
    scheduler: str,
    seed: int | None,
    batch: int,
    height: int | None,
    width: int | None,
    strength: float,
    guidance_rescale: float = 0.0,
    mask_blur: float | None = 0.0,
) -> GenerationParams:
    """Check every value against `limits` (profile, pixel multiple) and fill defaults (size: the
    profile's optimum; seed: a fresh random one, recorded so the image can be reproduced)."""
    prompts = as_prompts(prompt, "prompt")
    negatives = as_prompts(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise GenerationError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one per prompt")
    steps = _int(steps, "steps")
    if steps < 1:
        raise GenerationError(f"steps must be >= 1, got {steps}")
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise GenerationError(f"guidance must be a number, got {guidance!r}") from None
    if not math.isfinite(guidance):
        raise GenerationError(f"guidance must be a finite number, got {guidance}")
    if scheduler not in SCHEDULERS:
        raise GenerationError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    seed = secrets.randbits(63) if seed is None else _int(seed, "seed")
    if seed < 0:
        raise GenerationError(f"seed must be >= 0, got {seed}")
    batch = _int(batch, "batch")
    if batch < 1:
        raise GenerationError(f"batch must be >= 1, got {batch}")
    profile, multiple = limits.profile, limits.facts.pixel_multiple
    images = len(prompts) * batch
    check_image_count(images, f"images per call ({len(prompts)} prompts x batch {batch})")
    if not profile.batch[0] <= images <= profile.batch[2]:
        raise GenerationError(
            f"{images} images per call ({len(prompts)} prompts x batch {batch}) is outside the artifacts' "
            f"batch range [{profile.batch[0]}, {profile.batch[2]}]; rebuild with a wider --batch-range"
        )
    sizes = {}
    for name, value, (lo, opt, hi) in (("height", height, profile.height), ("width", width, profile.width)):
        value = opt if value is None else _int(value, name)
        if value % multiple or not lo <= value <= hi:
            raise GenerationError(
                f"{name} {value} must be a multiple of {multiple} in [{lo}, {hi}] for these artifacts; "
                f"rebuild with a wider --{name}-range for other sizes"
            )
        sizes[name] = value
    if images * sizes["height"] * sizes["width"] > MAX_PIXELS_PER_CALL:
        raise GenerationError(
            f"{images} images of {sizes['width']}x{sizes['height']} in one call is over the runtime's limit of "
            f"{MAX_PIXELS_PER_CALL} pixels per call; generate them in several calls"
        )
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise GenerationError(f"strength must be a number, got {strength!r}") from None
    if not 0.0 < strength <= 1.0:
        raise GenerationError(f"strength must be in (0, 1], got {strength}")
    try:
        guidance_rescale = float(guidance_rescale)
    except (TypeError, ValueError):
        raise GenerationError(f"guidance_rescale must be a number, got {guidance_rescale!r}") from None
    if not 0.0 <= guidance_rescale <= 1.0:  # also refuses NaN
        raise GenerationError(f"guidance_rescale must be in [0, 1] (0: plain guidance; 0.7 as Lin et al.), got {guidance_rescale}")
    if mask_blur is not None:
        if isinstance(mask_blur, bool) or not isinstance(mask_blur, numbers.Real) or not 0 <= mask_blur <= max(sizes.values()):
            raise GenerationError(
                f"mask_blur must be a number of pixels in [0, {max(sizes.values())}] (0: hard edge), got {mask_blur!r}"
            )
        mask_blur = float(mask_blur)
    return GenerationParams(
        prompts, negatives, steps, guidance, scheduler, seed, batch, sizes["height"], sizes["width"], strength,
        guidance_rescale, mask_blur,
    )


# SDXL micro-conditioning (Podell et al. 2023, Sec. 2.2): sizes and crop offsets in pixels, each bounded before
# it is embedded (no model is trained on sizes anywhere near this; a typo such as 10240000 is refused).
MAX_TIME_ID_PIXELS = 16384
# The aesthetic score of SDXL's refiner (a LAION aesthetic predictor's 0..10 scale); diffusers' defaults.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
# SDXL's base + refiner recipe: the refiner takes over for the last 20 % of the schedule (diffusers' docs).
REFINER_START = 0.8
MICRO_CONDITIONING = (
    "original_size", "crops_coords_top_left", "target_size",
    "negative_original_size", "negative_crops_coords_top_left", "negative_target_size",
    "aesthetic_score", "negative_aesthetic_score",
)  # fmt: skip
# What each count of time ids holds (diffusers' _get_add_time_ids): 6 = original (h, w), crop (top, left),
# target (h, w) (SDXL base, Turbo); 5 = original (h, w), crop (top, left), aesthetic score (SDXL refiner).
TIME_ID_LAYOUTS = {
    6: ("original_size", "crops_coords_top_left", "target_size"),
    5: ("original_size", "crops_coords_top_left", "aesthetic_score"),
}


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size, crop and aesthetic conditioning of one request, diffusers' names and defaults: sizes are
    (height, width) and default to the output size, crops (top, left) default to (0, 0), and each negative_*
    value (the unconditional half under guidance) defaults to its positive counterpart (diffusers' txt2img
    does that only when both negative sizes are given; its img2img uses (0, 0) for the negative crop)."""

    original_size: tuple[int, int]
    crops_coords_top_left: tuple[int, int]
    target_size: tuple[int, int]
    negative_original_size: tuple[int, int]
    negative_crops_coords_top_left: tuple[int, int]
    negative_target_size: tuple[int, int]
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE

    def time_ids(self, n: int) -> tuple[list[float], list[float]]:
        """(cond, uncond) rows of the UNet's `time_ids` input for a model taking n ids (TIME_ID_LAYOUTS)."""
        rows = []
        for prefix in ("", "negative_"):
            row: list[float] = []
            for name in TIME_ID_LAYOUTS[n]:
                value = getattr(self, prefix + name)
                row.extend(value if isinstance(value, tuple) else (value,))
            rows.append([float(v) for v in row])
        return rows[0], rows[1]

    def to_dict(self, n: int) -> dict[str, Any]:
        """The values a model of n time ids reads (for the image metadata), as JSON lists and numbers."""
        names = [name for name in MICRO_CONDITIONING if name.removeprefix("negative_") in TIME_ID_LAYOUTS[n]]
        return {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in names}


def _pair(value: Any, what: str, low: int) -> tuple[int, int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise GenerationError(f"{what} must be two integers (height, width) / (top, left), got {value!r}")
    pair = tuple(_int(v, what) for v in value)
    if not all(low <= v <= MAX_TIME_ID_PIXELS for v in pair):
        raise GenerationError(f"{what} must be integers in [{low}, {MAX_TIME_ID_PIXELS}] pixels, got {list(value)!r}")
    return pair[0], pair[1]


def _score(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 10.0:
        raise GenerationError(f"{what} must be a number in [0, 10] (an aesthetic score), got {value!r}")
    return float(value)


def make_micro_conditioning(time_ids: int | None, height: int, width: int, given: dict[str, Any]) -> MicroConditioning | None:
    """The request's micro-conditioning for a UNet taking `time_ids` ids (None: the model takes none, and any
    value given is refused), each value checked; `given` maps MICRO_CONDITIONING names to values or None."""
    given = {k: v for k, v in given.items() if v is not None}
    if time_ids is None:
        if given:
            raise GenerationError(f"this model takes no micro-conditioning (an SDXL UNet's time ids); drop {', '.join(sorted(given))}")
        return None
    if time_ids not in TIME_ID_LAYOUTS:
        raise GenerationError(f"the UNet takes {time_ids} time ids; the runtime knows layouts of {sorted(TIME_ID_LAYOUTS)}")
    used = TIME_ID_LAYOUTS[time_ids]
    unused = sorted(k for k in given if k.removeprefix("negative_") not in used)
    if unused:
        kind = "a refiner's (5 time ids: sizes, crop and aesthetic score)" if time_ids == 5 else "a base model's (6 time ids: sizes and crop)"
        raise GenerationError(f"this UNet is {kind} and does not read {', '.join(unused)}; drop them")
    values: dict[str, Any] = {}
    for name in MICRO_CONDITIONING[:3]:
        low = 0 if name.startswith("crops") else 1
        default = (0, 0) if name.startswith("crops") else (height, width)
        values[name] = _pair(given[name], name, low) if name in given else default
        neg = "negative_" + name
        values[neg] = _pair(given[neg], neg, low) if neg in given else values[name]
    values["aesthetic_score"] = _score(given.get("aesthetic_score", AESTHETIC_SCORE), "aesthetic_score")
    values["negative_aesthetic_score"] = _score(given.get("negative_aesthetic_score", NEGATIVE_AESTHETIC_SCORE), "negative_aesthetic_score")
    return MicroConditioning(**values)


def check_eta(value: Any, scheduler: str) -> float | None:
    """A request's eta: None (the scheduler's default), or a number in [0, 1] for a scheduler that takes one
    (schedulers.ETA_OPTIONS: DDIM's eta, TCD's gamma, DPM++ 2S a's eta)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise GenerationError(f"eta must be a number in [0, 1] (0: no noise from the sampler), got {value!r}")
    if scheduler not in ETA_OPTIONS:
        takes = ", ".join(name if option == "eta" else f"{name} (as its {option})" for name, option in ETA_OPTIONS.items())
        raise GenerationError(f"{scheduler} takes no eta; eta applies to {takes}; drop it or pick one of those")
    return float(value)


def check_denoising_fraction(value: Any, what: str) -> float | None:
    """denoising_start / denoising_end: None, or a fraction strictly inside (0, 1) of the schedule."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise GenerationError(f"{what} must be a fraction of the schedule in (0, 1) (e.g. 0.8), got {value!r}")
    return float(value)
