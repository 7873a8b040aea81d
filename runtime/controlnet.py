"""ControlNet at run time (Zhang, Rao & Agrawala 2023), as diffusers' StableDiffusionControlNetPipeline runs it.

An artifacts folder built with `--controlnet` has one `controlnet_<k>` component per ControlNet (export order)
and a UNet that takes their summed residuals (runtime/contracts.add_controlnets). Per request:

- each control image is read as RGB, resized to the output size (Lanczos, as diffusers' VaeImageProcessor),
  scaled to [0, 1] and repeated for every image of the batch, and again for the unconditional half under
  classifier-free guidance (`prepare_control_image`);
- at step i of n, ControlNet k runs at `conditioning_scale[k]` when i/n >= control_guidance_start[k] and
  (i+1)/n <= control_guidance_end[k], else it contributes nothing (diffusers' `controlnet_keep`; it is then not
  run at all, nor at scale 0, which is the same sum);
- guess mode: under guidance the ControlNets see the conditional half only and the unconditional half gets zero
  residuals; residual k of n+1 is further scaled by 10^(k/n - 1) (GUESS_MODE_FIRST_SCALE_LOG10), except for a
  pooling ControlNet; a pooling (shuffle) first ControlNet turns guess mode on, as diffusers does;
- several ControlNets: their residuals are summed (diffusers' MultiControlNetModel).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .contracts import CONTROLNET_DOWN, CONTROLNET_MID, ComponentContract, TensorSpec, residual_input_names
from .images import as_rgb_array, resize
from .params import GenerationError

# Guess mode (diffusers' ControlNetModel, `guess_mode`): residual k of n+1 is scaled by 10^(k/n - 1), from 0.1 at
# the full-resolution skip to 1.0 at the middle block, so the coarse residuals dominate without a prompt. The
# reference (reference/controlnet.py) reads it from here.
GUESS_MODE_FIRST_SCALE_LOG10 = -1.0
# diffusers' defaults.
CONDITIONING_SCALE = 1.0
# Published recipes use 0.2-2; far beyond that the residuals swamp the UNet's own activations (and fp16 overflows).
MAX_SCALE = 100.0
GUIDANCE_START = 0.0
GUIDANCE_END = 1.0

ControlImage = np.ndarray | Image.Image | str | Path


def guess_mode_scales(count: int) -> np.ndarray:
    """(count,) float32 scales 0.1 .. 1.0, evenly spaced in log10 (diffusers: torch.logspace(-1, 0, count))."""
    return (10.0 ** np.linspace(GUESS_MODE_FIRST_SCALE_LOG10, 0.0, count)).astype(np.float32)


def control_image_sha256(image: np.ndarray) -> str:
    """sha256 of the control image's RGB pixels as given ((H, W, 3) uint8, row-major), whatever file held them."""
    return hashlib.sha256(np.ascontiguousarray(image, np.uint8).tobytes()).hexdigest()


def prepare_control_image(image: np.ndarray, height: int, width: int, rows: int) -> np.ndarray:
    """(H0, W0, 3) uint8 -> (rows, 3, height, width) float32 in [0, 1]: resized to the output size (Lanczos when the
    size differs), as diffusers' ControlNet pipelines prepare `image` (do_normalize=False)."""
    pixels = resize(image, height, width).astype(np.float32) / np.float32(255.0)  # (H, W, 3)
    return np.ascontiguousarray(np.repeat(pixels.transpose(2, 0, 1)[None], rows, axis=0))


def _per_controlnet(value: Any, count: int, what: str, check: Callable[[float], bool], allowed: str) -> tuple[float, ...]:
    """A number for all ControlNets, or a list of one per ControlNet, each finite and passing `check`."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise GenerationError(f"{len(values)} values of {what} for {count} ControlNet(s); give one, or one per ControlNet")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or not check(float(v)):
            raise GenerationError(f"{what} must be {allowed}, got {v!r}")
        out.append(float(v))
    return tuple(out)


@dataclass(frozen=True)
class ControlRequest:
    """What a request asks of the folder's ControlNets, checked (one entry per ControlNet, export order)."""

    images: tuple[np.ndarray, ...]  # (H, W, 3) uint8 each, as given
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool

    def to_dict(self, sources: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """What the image metadata records (`sources`: the manifest's ControlNet records, for their hashes)."""
        nets = []
        for k, image in enumerate(self.images):
            entry = {
                "control_image_sha256": control_image_sha256(image),
                "control_image_size": [int(image.shape[0]), int(image.shape[1])],
                "conditioning_scale": self.scales[k],
                "control_guidance_start": self.starts[k],
                "control_guidance_end": self.ends[k],
            }
            if k < len(sources) and isinstance(sources[k], Mapping) and sources[k].get("sha256"):
                entry["controlnet_sha256"] = sources[k]["sha256"]
            nets.append(entry)
        return {"controlnets": nets, "guess_mode": self.guess_mode}


def make_control_request(
    count: int,
    control_image: ControlImage | Sequence[ControlImage] | None,
    conditioning_scale: float | Sequence[float],
    guidance_start: float | Sequence[float],
    guidance_end: float | Sequence[float],
    guess_mode: bool,
) -> ControlRequest | None:
    """The checked request for a folder with `count` ControlNets (None: it has none and none was asked for).
    `control_image`: one image (a path, PIL image or (H, W, 3) array) per ControlNet, a list when there are several."""
    if not isinstance(guess_mode, bool):
        raise GenerationError(f"guess_mode must be True or False, got {guess_mode!r}")
    if count == 0:
        asked = [n for n, v, d in (("controlnet_conditioning_scale", conditioning_scale, CONDITIONING_SCALE),
                                   ("control_guidance_start", guidance_start, GUIDANCE_START),
                                   ("control_guidance_end", guidance_end, GUIDANCE_END)) if v != d]  # fmt: skip
        if control_image is not None or guess_mode or asked:
            what = "a control image" if control_image is not None else ", ".join(asked) or "guess_mode"
            raise GenerationError(
                f"these artifacts have no ControlNet, so {what} has nothing to steer; drop it, or build the artifacts "
                "with `python export/build_engines.py --controlnet CN_SRC`"
            )
        return None
    if control_image is None:
        raise GenerationError(
            f"these artifacts have {count} ControlNet(s): pass a control image for each (control_image=, "
            "--control-image IMG), in the order they were exported"
        )
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if len(images) != count:
        raise GenerationError(
            f"{len(images)} control image(s) for {count} ControlNet(s); pass one per ControlNet, in the order they were exported"
        )
    rgb = tuple(as_rgb_array(image, "control image" if count == 1 else f"control image {k}") for k, image in enumerate(images))
    scales = _per_controlnet(
        conditioning_scale, count, "controlnet_conditioning_scale", lambda v: abs(v) <= MAX_SCALE, f"a number in [-{MAX_SCALE:g}, {MAX_SCALE:g}]"
    )
    starts = _per_controlnet(guidance_start, count, "control_guidance_start", lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    ends = _per_controlnet(guidance_end, count, "control_guidance_end", lambda v: 0.0 < v <= 1.0, "in (0, 1]")
    for start, end in zip(starts, ends):
        if start >= end:
            raise GenerationError(f"control_guidance_start {start} must be before control_guidance_end {end}")
    return ControlRequest(rgb, scales, starts, ends, guess_mode)


def controlnet_keep(starts: Sequence[float], ends: Sequence[float], steps: int) -> np.ndarray:
    """(steps, count) 1.0 where ControlNet k applies at step i, else 0.0 (diffusers' controlnet_keep)."""
    keep = [[1.0 - float(i / steps < s or (i + 1) / steps > e) for s, e in zip(starts, ends)] for i in range(steps)]
    return np.asarray(keep, np.float32).reshape(steps, len(starts))


@dataclass(frozen=True)
class ControlRun:
    """One request's ControlNets over its denoising loop: `residuals(step, sample, t, call)` gives the UNet's
    residual inputs for that step."""

    contracts: tuple[ComponentContract, ...]  # controlnet_<k>'s, export order
    unet: ComponentContract
    images: tuple[np.ndarray, ...]  # (rows, 3, H, W) float32 in [0, 1]: rows as the ControlNets' batch
    scales: tuple[float, ...]
    keep: np.ndarray  # (steps, count)
    guess_mode: bool  # as run: asked for, or the first ControlNet pools
    use_cfg: bool
    fixed: Mapping[str, np.ndarray]  # encoder_hidden_states (and SDXL's text_embeds, time_ids), the ControlNets' rows

    @classmethod
    def prepare(
        cls, request: ControlRequest, contracts: Sequence[ComponentContract], unet: ComponentContract, height: int, width: int,
        images: int, steps: int, use_cfg: bool, conditioning: Mapping[str, np.ndarray],
    ) -> ControlRun:  # fmt: skip
        """`images`: images per call (B); `steps`: the run's timesteps (controlnet_keep's n); `conditioning`: the
        UNet's per-request inputs (encoder_hidden_states (rows, L, D), SDXL's text_embeds and time_ids), rows
        [uncond, cond] under guidance."""
        guess = request.guess_mode or bool(contracts[0].extra.get("global_average_pooling"))
        cond_only = guess and use_cfg  # the ControlNets see the conditional half only
        rows = images if cond_only or not use_cfg else 2 * images
        names = {t.name for c in contracts for t in c.inputs}
        fixed = {k: (v[len(v) // 2 :] if cond_only else v) for k, v in conditioning.items() if k in names}
        prepared = tuple(prepare_control_image(image, height, width, rows) for image in request.images)
        for contract in contracts:
            channels = next(t.shape[1] for t in contract.inputs if t.name == "controlnet_cond")
            if channels != 3:
                raise GenerationError(f"{contract.name} takes {channels}-channel control images; only RGB ones are supported")
        keep = controlnet_keep(request.starts, request.ends, steps)
        return cls(tuple(contracts), unet, prepared, request.scales, keep, guess, use_cfg, fixed)

    def residuals(
        self, step: int, sample: np.ndarray, timestep: float, call: Callable[[str, dict[str, Any]], dict[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """The UNet's residual inputs at `step`: the scaled ControlNet residuals summed, zeros where none applies.
        `sample`: the UNet's (rows, C', h, w) input (its first latent_channels are the latents: an inpainting UNet
        appends mask and masked-image latents, which a ControlNet does not take); `call(name, feeds)` runs one."""
        rows, _, h, w = sample.shape
        shapes = {"unet_batch": rows, "latent_height": h, "latent_width": w}
        count = self._count()
        names = residual_input_names(count)
        total = {n: np.zeros(t.resolve(shapes), np.float32) for n, t in zip(names, self._residual_specs(names))}
        cond_only = self.guess_mode and self.use_cfg
        x = sample[rows // 2 :] if cond_only else sample
        x = np.ascontiguousarray(x[:, : self.contracts[0].inputs[0].shape[1]], np.float32)  # the latents' channels
        guess = guess_mode_scales(count + 1) if self.guess_mode else None
        for k, contract in enumerate(self.contracts):
            scale = self.scales[k] * float(self.keep[step, k])
            if scale == 0.0:
                continue  # residuals times 0: the same sum, without running it
            feeds = {
                "sample": x,
                "timestep": np.full((len(x),), timestep, np.float32),
                **self.fixed,
                "controlnet_cond": self.images[k],
                "conditioning_scale": np.asarray([scale], np.float32),
            }
            outs = call(contract.name, {t.name: feeds[t.name] for t in contract.inputs})
            pooled = bool(contract.extra.get("global_average_pooling"))
            for j, (name, out) in enumerate(zip(names, self._outputs(outs, count))):
                if guess is not None and not pooled:
                    out = out * guess[j]
                if cond_only:
                    total[name][rows // 2 :] += out  # the unconditional half stays zero
                else:
                    total[name] += out  # a pooling ControlNet's (rows, C, 1, 1) broadcasts over h, w
        return total

    def _count(self) -> int:
        """Down residuals the UNet takes (one per input block; the middle block's comes after them)."""
        return int(self.unet.extra.get("controlnet_residuals", 0))

    def _residual_specs(self, names: Sequence[str]) -> list[TensorSpec]:
        specs = {t.name: t for t in self.unet.inputs}
        missing = [n for n in names if n not in specs]
        if missing:
            raise GenerationError(f"the UNet takes no ControlNet residual {missing[0]}; rebuild the artifacts")
        return [specs[n] for n in names]

    @staticmethod
    def _outputs(outs: Mapping[str, np.ndarray], count: int) -> list[np.ndarray]:
        return [outs[CONTROLNET_DOWN.format(k)] for k in range(count)] + [outs[CONTROLNET_MID]]
