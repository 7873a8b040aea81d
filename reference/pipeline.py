"""The reference text-to-image sampler in PyTorch: the ground truth the runtime is parity-tested against.

Latent diffusion sampling (Rombach et al. 2022, Sec. 3.3 and 4.3) with classifier-free guidance (Ho &
Salimans 2022, eq. 6), img2img (SDEdit, Meng et al. 2022) and inpainting, following diffusers'
StableDiffusion{,Img2Img,Inpaint}Pipeline step for step. The networks run through the export wrappers
(export_wrappers.py), so this computes exactly the functions the ONNX graphs and the torch backend
compute; the schedulers are the runtime's numpy ones.

Conventions shared with the runtime (so one seed gives one image on every backend):
- randomness: one `np.random.default_rng(seed)`. The initial noise is drawn first,
  `standard_normal((B, C, h, w), dtype=float32)` (skipped when `latents` is given), then every stochastic
  scheduler step draws its own noise from the same generator, in step order;
- `latents` is unit-variance noise, as diffusers' `latents=`: txt2img starts from latents *
  init_noise_sigma, img2img and inpainting add it to the image latents at the first kept timestep;
- guidance: one batched UNet call of 2B rows [uncond, cond], eps = eps_u + w (eps_c - eps_u); w == 1.0
  runs the conditional half only;
- B = len(prompts) * batch, each prompt's `batch` images adjacent (diffusers' num_images_per_prompt);
- image = clip((decoded + 1) / 2, 0, 1), uint8 = round(image * 255).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm_rt.runtime.images import paste_kept
from ldm_rt.runtime.schedulers import Scheduler, SchedulerConfig, make_scheduler
from ldm_rt.runtime.tokenizer import PromptTokenizer

from .export_wrappers import export_wrappers
from .ldm import LatentDiffusion
from .model_folder import LoadedModel

logger = logging.getLogger(__name__)

OUTPUTS = ("uint8", "float")
# diffusers' defaults: img2img keeps 80 % of the steps; inpainting starts from pure noise.
IMG2IMG_STRENGTH = 0.8
INPAINT_STRENGTH = 1.0
# callback(step_index, timestep, latents) after every denoising step.
StepCallback = Callable[[int, float, np.ndarray], None]


class PipelineInputError(ValueError):
    """A sampling argument is invalid; the message names it and the fix."""


@dataclass(frozen=True)
class PipelineOutput:
    images: np.ndarray  # (B, H, W, 3): uint8, or float32 in [0, 1] with output="float"
    latents: np.ndarray  # (B, C, h, w) float32: the final scaled latents the decoder received
    timesteps: np.ndarray  # the timesteps that were run (after strength)
    mode: str  # "txt2img" | "img2img" | "inpaint"
    truncated: list[bool] = field(default_factory=list)  # per prompt: was it cut to the tokenizer's length

    def to_pil(self) -> list[Image.Image]:
        images = self.images if self.images.dtype == np.uint8 else np.round(self.images * 255).astype(np.uint8)
        return [Image.fromarray(im) for im in images]


@dataclass(frozen=True)
class _Start:
    x: np.ndarray  # (B, C, h, w) latents entering the loop
    noise: np.ndarray  # (B, C, h, w) the unit-variance noise they were made from
    image_latents: np.ndarray | None = None  # (B, C, h, w) scaled latents of the init image
    mask: np.ndarray | None = None  # (B, 1, h, w), 1 = repaint
    masked_image_latents: np.ndarray | None = None  # (B, C, h, w), inpainting UNet only
    pixel_mask: np.ndarray | None = None  # (H, W) float32, >= 0.5 = repaint (for the paste-back)


class ReferencePipeline:
    """Sampling with the PyTorch reference networks: `ReferencePipeline(load_model(path))(prompt, ...)`."""

    def __init__(
        self,
        loaded: LoadedModel | None = None,
        *,
        model: LatentDiffusion | None = None,
        tokenizer: PromptTokenizer | None = None,
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        if loaded is not None:
            model, tokenizer, scheduler_config = loaded.model, loaded.tokenizer, loaded.scheduler_config
        if model is None:
            raise PipelineInputError("ReferencePipeline needs a LoadedModel or model= (and tokenizer=, scheduler_config=)")
        if model.text_encoder is not None and tokenizer is None:
            raise PipelineInputError("this model has a text encoder: pass its tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.scheduler_config = SchedulerConfig.from_dict(dict(scheduler_config or {}))
        self.components = export_wrappers(model)
        config = model.config
        self.latent_channels = config.latent_channels
        self.latent_factor = config.latent_factor
        self.pixel_multiple = config.latent_factor * config.unet.downsampling_factor
        self.inpainting_unet = config.unet.in_channels == 2 * config.latent_channels + 1
        if config.unet.in_channels not in (config.latent_channels, 2 * config.latent_channels + 1):
            raise PipelineInputError(
                f"a UNet with {config.unet.in_channels} input channels for {config.latent_channels} latent channels "
                "(concat conditioning other than inpainting) is not supported by the pipeline"
            )

    @classmethod
    def from_path(cls, path: str | Path, **load_kwargs: Any) -> ReferencePipeline:
        """Load with checkpoints.load_model (ldm-rt folder, diffusers folder or SD single file)."""
        from .checkpoints import load_model

        return cls(load_model(path, **load_kwargs))

    def scheduler(self, name: str) -> Scheduler:
        """The scheduler `name` (a CLI name: ddim, euler, dpmpp-2m, ...) with this model's config."""
        return make_scheduler(name, self.scheduler_config)

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str] = "",
        negative_prompt: str | Sequence[str] | None = None,
        steps: int = 25,
        guidance: float = 7.5,
        scheduler: str | Scheduler = "ddim",
        seed: int | None = 0,
        latents: np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        batch: int = 1,
        init_image: np.ndarray | Image.Image | None = None,
        strength: float | None = None,
        mask: np.ndarray | Image.Image | None = None,
        class_labels: int | Sequence[int] | None = None,
        output: str = "uint8",
        callback: StepCallback | None = None,
        guidance_rescale: float = 0.0,
        mask_blur: float | None = 0.0,
    ) -> PipelineOutput:
        """Generate `batch` images per prompt.

        init_image (uint8 (H, W, 3) or PIL) + strength: img2img (strength default 0.8). mask ((H, W) in
        [0, 1] or uint8, or PIL; 1 = repaint) with init_image: inpainting (strength default 1.0): an
        inpainting UNet gets [latent, mask, masked-image latent] channels; a plain UNet keeps the known
        region by blending after every step, x = m * x + (1 - m) * add_noise(z_init, noise, t_next).
        height/width default to the init image's size, else the autoencoder's nominal resolution. For a
        model without a text encoder the prompt must be empty and guidance is not used; class-conditional
        models take `class_labels` (one per image row before `batch`). guidance_rescale r in [0, 1] (Lin et
        al. 2024, Sec. 3.4): the guided prediction g becomes r * g * std(eps_c) / std(g) + (1 - r) * g.
        Inpainting ends as the runtime's does: the kept pixels pasted back from init_image with a seam of
        `mask_blur` pixels (runtime/images.paste_kept; None: no paste-back, diffusers' output).
        """
        prompts, negatives = self._prompts(prompt, negative_prompt, class_labels)
        steps, batch = _positive_int(steps, "steps"), _positive_int(batch, "batch")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.floating)) or not math.isfinite(guidance):
            raise PipelineInputError(f"guidance must be a finite number, got {guidance!r}")
        if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float, np.floating)) or not 0 <= guidance_rescale <= 1:
            raise PipelineInputError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
        if mask_blur is not None and (isinstance(mask_blur, bool) or not isinstance(mask_blur, (int, float, np.floating)) or not 0 <= mask_blur):
            raise PipelineInputError(f"mask_blur must be a number of pixels >= 0 (0: hard edge) or None, got {mask_blur!r}")
        if output not in OUTPUTS:
            raise PipelineInputError(f"output must be one of {OUTPUTS}, got {output!r}")
        if mask is not None and init_image is None:
            raise PipelineInputError("mask needs init_image: inpainting repaints part of an image")
        if self.inpainting_unet and mask is None:
            raise PipelineInputError("this is an inpainting model: pass init_image and mask")
        pixels = None if init_image is None else _rgb_array(init_image)
        if pixels is not None:
            height = pixels.shape[0] if height is None else height
            width = pixels.shape[1] if width is None else width
        height, width = self._size(height, width)
        if pixels is not None and pixels.shape[:2] != (height, width):
            raise PipelineInputError(
                f"init_image is {pixels.shape[1]}x{pixels.shape[0]} but the requested size is {width}x{height}; resize it first"
            )
        if strength is None:
            strength = INPAINT_STRENGTH if mask is not None else IMG2IMG_STRENGTH
        rows = len(prompts) * batch
        f = self.latent_factor
        shape = (rows, self.latent_channels, height // f, width // f)
        noise_in = None if latents is None else _check_latents(latents, shape)

        sched = self.scheduler(scheduler) if isinstance(scheduler, str) else scheduler
        if not isinstance(sched, Scheduler):
            raise PipelineInputError(f"scheduler must be a name or a Scheduler, got {type(scheduler).__name__}")
        run = sched.set_timesteps(steps)
        if init_image is not None:
            run = run.with_strength(strength)

        use_cfg = self.model.text_encoder is not None and float(guidance) != 1.0
        context, truncated = self._encode_prompts(prompts, negatives, batch, use_cfg)
        labels = None
        if class_labels is not None:
            labels = torch.from_numpy(np.repeat(np.asarray(class_labels, dtype=np.int64).reshape(-1), batch))  # (B,)
            if use_cfg:
                labels = torch.cat([labels, labels])  # (2B,): the same labels in both halves

        rng = np.random.default_rng(seed)
        noise = noise_in if noise_in is not None else rng.standard_normal(shape, dtype=np.float32)
        start = self._start(run, noise, pixels, mask, strength, rows)

        unet = self.components["unet"]
        x = start.x
        for i, t in enumerate(run.timesteps):
            x_in = run.scale_model_input(x, i).astype(np.float32)
            if self.inpainting_unet:
                x_in = np.concatenate([x_in, start.mask, start.masked_image_latents], axis=1)  # (B, 2C+1, h, w)
            if use_cfg:
                x_in = np.concatenate([x_in, x_in], axis=0)  # (2B, ...): [uncond, cond]
            args = [torch.from_numpy(x_in), torch.full((x_in.shape[0],), float(t), dtype=torch.float32)]
            if context is not None:
                args.append(context)
            if labels is not None:
                args.append(labels)
            eps = unet(*args).numpy()  # (B or 2B, C, h, w)
            if use_cfg:
                eps_uncond, eps_cond = np.split(eps, 2, axis=0)
                eps = eps_uncond + np.float32(guidance) * (eps_cond - eps_uncond)
                if guidance_rescale:
                    eps = _rescaled(eps, eps_cond, float(guidance_rescale))
            x = run.step(eps, i, x, generator=rng)
            if start.mask is not None and not self.inpainting_unet:
                # Latent blend: the known region follows the forward process to the next step's noise
                # level (clean after the last step), as diffusers' inpainting with a plain UNet.
                known = start.image_latents
                if i + 1 < len(run.timesteps):
                    known = run.add_noise(start.image_latents, start.noise, i + 1)
                x = (start.mask * x + (1.0 - start.mask) * known).astype(np.float32)
            if callback is not None:
                callback(i, float(t), x)

        decoded = self._run("vae_decoder", np.ascontiguousarray(x, dtype=np.float32))
        image = np.clip((decoded + 1.0) / 2.0, 0.0, 1.0).transpose(0, 2, 3, 1)  # (B, H, W, 3)
        if output == "uint8":
            image = np.round(image * 255.0).astype(np.uint8)
        if start.pixel_mask is not None and mask_blur is not None:
            init = pixels if output == "uint8" else pixels.astype(np.float32) / np.float32(255.0)
            image = paste_kept(image, init, start.pixel_mask, mask_blur)
        mode = "inpaint" if mask is not None else "img2img" if init_image is not None else "txt2img"
        return PipelineOutput(image, x.astype(np.float32), np.asarray(run.timesteps).copy(), mode, truncated)

    # ---- stages ----------------------------------------------------------------------------------------
    def _prompts(
        self, prompt: str | Sequence[str] | None, negative: str | Sequence[str] | None, class_labels: Any
    ) -> tuple[list[str], list[str]]:
        prompts = [prompt] if isinstance(prompt, str) or prompt is None else list(prompt)
        if not prompts or not all(p is None or isinstance(p, str) for p in prompts):
            raise PipelineInputError("prompt must be a string or a non-empty list of strings")
        prompts = [p or "" for p in prompts]
        if self.model.text_encoder is None:
            if any(prompts):
                raise PipelineInputError("this model has no text encoder and takes no prompt; pass prompt=''")
            if negative:
                raise PipelineInputError("this model has no text encoder and takes no negative_prompt")
        num_classes = self.model.config.unet.num_classes
        if num_classes is not None:
            if class_labels is None:
                raise PipelineInputError(f"this model is class-conditional: pass class_labels (ints in [0, {num_classes}))")
            labels = np.asarray(class_labels).reshape(-1)
            if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= num_classes:
                raise PipelineInputError(f"class_labels must be ints in [0, {num_classes}), got {class_labels!r}")
            if len(prompts) == 1 and len(labels) > 1:
                prompts = prompts * len(labels)
            if len(labels) != len(prompts):
                raise PipelineInputError(f"{len(labels)} class labels for {len(prompts)} prompts; pass one per prompt")
        elif class_labels is not None:
            raise PipelineInputError("this model is not class-conditional; drop class_labels")
        if negative is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative, str):
            negatives = [negative] * len(prompts)
        else:
            negatives = list(negative)
            if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
                raise PipelineInputError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; pass one string or one per prompt")
        return prompts, negatives

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.model.config.autoencoder.resolution
        out = []
        for name, value in (("height", height), ("width", width)):
            value = default if value is None else value
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1 or value % self.pixel_multiple:
                raise PipelineInputError(
                    f"{name} must be a positive multiple of {self.pixel_multiple} (latent factor {self.latent_factor} x "
                    f"UNet factor {self.pixel_multiple // self.latent_factor}), got {value!r}"
                )
            out.append(int(value))
        return out[0], out[1]

    def _encode_prompts(
        self, prompts: list[str], negatives: list[str], batch: int, use_cfg: bool
    ) -> tuple[torch.Tensor | None, list[bool]]:
        """Context (rows, L, D): [negatives..., prompts...] under guidance, each repeated `batch` times."""
        if self.model.text_encoder is None:
            return None, [False] * len(prompts)
        texts = negatives + prompts if use_cfg else prompts
        tokens = self.tokenizer(texts)  # logs a warning for each prompt it truncates
        truncated = list(tokens.truncated[-len(prompts):])
        ids = np.repeat(np.asarray(tokens.ids, dtype=np.int64), batch, axis=0)  # (rows, L)
        with torch.inference_mode():
            return self.components["text_encoder"](torch.from_numpy(ids)), truncated

    def _run(self, name: str, array: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.components[name](torch.from_numpy(array)).numpy()

    def _encode_image(self, image: np.ndarray) -> np.ndarray:
        """(1, 3, H, W) in [-1, 1] -> scaled latent (1, C, h, w): the KL posterior's mean (or the VQ latent)."""
        params = self._run("vae_encoder", np.ascontiguousarray(image, dtype=np.float32))
        mean = params[:, : self.latent_channels]  # KL: [mean, logvar] along channels
        return mean * np.float32(self.model.scale_factor)

    def _start(self, run, noise: np.ndarray, pixels: np.ndarray | None, mask, strength: float, rows: int) -> _Start:
        if pixels is None:
            return _Start(noise * np.float32(run.init_noise_sigma), noise)
        image = (pixels.astype(np.float32) / 255.0 * 2.0 - 1.0).transpose(2, 0, 1)[None]  # (1, 3, H, W), as diffusers
        image_latents = np.repeat(self._encode_image(np.ascontiguousarray(image)), rows, axis=0)  # (B, C, h, w)
        if mask is None:
            return _Start(run.add_noise(image_latents, noise, 0), noise, image_latents)
        m = _mask_array(mask, image.shape[2:])
        m = (m >= 0.5).astype(np.float32)[None, None]  # (1, 1, H, W), binarised as diffusers
        f = self.latent_factor
        latent_mask = np.repeat(m[:, :, ::f, ::f], rows, axis=0)  # nearest downsampling, (B, 1, h, w)
        masked = None
        if self.inpainting_unet:
            masked = np.repeat(self._encode_image(image * (m < 0.5)), rows, axis=0)  # (B, C, h, w)
        if strength == 1.0:
            x = noise * np.float32(run.init_noise_sigma)  # pure noise, as diffusers at full strength
        else:
            x = run.add_noise(image_latents, noise, 0)
        return _Start(x, noise, image_latents, latent_mask, masked, m[0, 0])


def _rescaled(guided: np.ndarray, cond: np.ndarray, rescale: float) -> np.ndarray:
    """Guidance rescale (Lin et al. 2024, Sec. 3.4): the guided prediction scaled to the conditional one's
    per-row standard deviation, mixed back by `rescale`."""
    g, c = torch.from_numpy(guided).double(), torch.from_numpy(cond).double()
    dims = list(range(1, g.ndim))
    scaled = g * (c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True))
    return (rescale * scaled + (1.0 - rescale) * g).float().numpy()


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PipelineInputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_latents(latents: Any, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(latents)
    if arr.shape != shape:
        raise PipelineInputError(f"latents have shape {arr.shape}, expected {shape} (images, channels, height/f, width/f)")
    if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)):
        raise PipelineInputError("latents must be finite floating-point noise")
    return arr.astype(np.float32)


def _rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise PipelineInputError(f"init_image must be a PIL image or uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def _mask_array(mask: np.ndarray | Image.Image, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 in [0, 1] (1 = repaint) from a PIL image (grey levels / 255) or an array."""
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    else:
        arr = np.asarray(mask)
        if arr.ndim == 3 and arr.shape[2] in (1, 3):
            arr = arr[..., 0]
        arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    if arr.shape != tuple(size):
        raise PipelineInputError(f"mask has shape {arr.shape}, expected {tuple(size)} (the init image's height, width)")
    return arr
