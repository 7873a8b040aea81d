"""The parameters of one generation request, validated against the artifacts before any work is done."""

from __future__ import annotations

import math
import numbers
import operator
import secrets
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from .contracts import ModelFacts, ShapeProfile
from .schedulers import SCHEDULERS


# What one call may produce, whatever an artifacts folder's profile allows, checked before anything is
# allocated: images (a service batches far fewer; the CLI names one file per image) and pixels (images x
# height x width: the decoded batch alone is 12 bytes per pixel, 3.2 GB here, e.g. 64 images of 2048 x 2048).
MAX_IMAGES_PER_CALL = 1024
MAX_PIXELS_PER_CALL = 2**28


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
