"""The lean sampler: text -> latents -> image with numpy, a scheduler and one backend's components.

Latent diffusion sampling (Rombach et al. 2022, Sec. 3.3) with classifier-free guidance (Ho & Salimans
2022). Load once, generate many:

    pipe = Pipeline.load("engines/build/tiny")                       # manifest hashes checked once
    result = pipe.generate("a red cube", steps=25, guidance=7.5, seed=1)
    result.save("cube.png")                                            # with its parameters in the file

Thread safety: the object holds only read-only things (artifacts, components whose `run` is thread-safe,
immutable schedulers); everything a call changes (scheduler run, random generator, timings) is local to
`generate`, so one Pipeline serves concurrent requests.

The torch reference is not a second sampler: reference/torch_backend.torch_pipeline builds this class over the
PyTorch networks (the `Pipeline(components, tokenizer, scheduler_config, facts, profile, ...)` constructor).

Randomness (the same on every backend, the torch reference included, so a seed means one image): one
`np.random.default_rng(seed)`; the initial noise is drawn first, `standard_normal((B, C, h, w),
dtype=float32)` (skipped when `latents` is given), then each stochastic scheduler step draws its noise.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from . import guidance as cfg
from .artifacts import Artifacts
from .backends.base import Component, HostOptions, SupportsUpload, default_compile_cache, open_components
from .contracts import ModelFacts, ShapeProfile
from .images import (
    TEXT_KEYS,
    as_mask_array,
    as_rgb_array,
    grid,
    image_to_model,
    output_paths,
    paste_kept,
    resize,
    to_uint8,
    write_images,
)
from .params import GenerationError, GenerationParams, as_prompts, make_params
from .schedulers import SchedulerConfig, usable_schedulers
from .schedulers.config import SchedulerConfigError
from .tokenizer import PromptTokenizer

log = logging.getLogger(__name__)

# diffusers' defaults: img2img keeps 80 % of the steps; inpainting starts from pure noise.
IMG2IMG_STRENGTH = 0.8
INPAINT_STRENGTH = 1.0
# callback(step_index, num_steps, timestep, latents) after every denoising step.
StepCallback = Callable[[int, int, float, np.ndarray], None]


class NonFiniteError(GenerationError):
    """A component produced NaN or Inf (usually fp16 overflow); the message names the component and step."""


@dataclass(frozen=True)
class Result:
    images: np.ndarray  # (B, H, W, 3) uint8
    params: dict[str, Any]  # what produced the images (GenerationParams + model hash, backend, precision, reduced_precision)
    timings: dict[str, Any] = field(default_factory=dict)  # seconds per stage; "unet" is a list per step
    latents: np.ndarray | None = None  # (B, C, h, w) final scaled latents, before decoding

    def to_pil(self) -> list[Image.Image]:
        return [Image.fromarray(im) for im in self.images]

    def metadata(self, index: int | None = None) -> dict[str, str]:
        """The text an image file of this result carries: one entry per images.TEXT_KEYS (image `index`'s
        own prompt; index None: all images, as one grid), its batch_index when there are several, all of
        `params` as JSON under "parameters", and "Software"."""
        p = self.params
        if index is None:  # a grid: one prompt if they all agree, else the list
            prompt, negative = (v[0] if len(set(v)) == 1 else json.dumps(list(v)) for v in (p["prompts"], p["negative_prompts"]))
        else:
            prompt, negative = p["prompts"][index // p["batch"]], p["negative_prompts"][index // p["batch"]]
        values = {**p, "prompt": prompt, "negative_prompt": negative}
        text = {key: str(values[key]) for key in TEXT_KEYS}
        if index is not None and len(self.images) > 1:
            text["batch_index"] = str(index)
        text["parameters"] = json.dumps(p, sort_keys=True)
        text["Software"] = "ldm-rt"
        return text

    def save(self, path: str | Path, as_grid: bool = False) -> list[Path]:
        """Write the images with their parameters (`metadata`), in the format the extension names (.png;
        .jpg/.jpeg and .webp carry them in EXIF): one image at `path`, a batch at NAME_0.EXT, NAME_1.EXT, ...
        or, with as_grid, one grid image at `path`. All files are written or none. Returns the paths."""
        if as_grid:
            return write_images([(path, grid(self.images), self.metadata(None))])
        paths = output_paths(path, len(self.images))
        return write_images([(out, image, self.metadata(k)) for k, (out, image) in enumerate(zip(paths, self.images))])


@dataclass(frozen=True)
class Start:
    """The loop's starting point and what inpainting needs at every step."""

    x: np.ndarray  # (B, C, h, w) initial latents
    noise: np.ndarray  # (B, C, h, w) the unit-variance noise they were made from
    image_latents: np.ndarray | None = None  # (B, C, h, w) scaled latents of the init image
    mask: np.ndarray | None = None  # (B, 1, h, w), 1 = repaint
    masked_image_latents: np.ndarray | None = None  # (B, C, h, w), inpainting UNet only
    pixels: np.ndarray | None = None  # (H, W, 3) uint8, the init image at the output size (for the paste-back)
    pixel_mask: np.ndarray | None = None  # (H, W) float32, the mask at the output size, >= 0.5 = repaint


class Pipeline:
    """The sampling loop over one backend's components. `Pipeline.load(dir)` opens an artifacts folder; the
    constructor takes the parts directly (reference/torch_backend.torch_pipeline runs the PyTorch reference
    networks through it), so every backend and the reference share this one loop."""

    def __init__(
        self,
        components: Mapping[str, Component],
        tokenizer: PromptTokenizer | None,
        scheduler_config: SchedulerConfig,
        facts: ModelFacts,
        profile: ShapeProfile,
        *,
        backend: str,
        precision: str = "fp32",
        model_hash: str = "",
        artifacts: Artifacts | None = None,
        reduced_precision: bool = False,
    ) -> None:
        """`components`: text_encoder (if the model has one), unet, vae_decoder, vae_encoder (img2img and
        inpainting), each with a `run` keyed by its contract's tensor names; `profile`: the batch and size
        ranges requests are checked against (its optimum is the default size); `model_hash`: what the image
        metadata names as the model; `artifacts`: the folder they came from, if any (Pipeline.load);
        `reduced_precision`: the components were opened with HostOptions.reduced_precision (recorded in params)."""
        self.components = MappingProxyType(dict(components))
        missing = sorted({"unet", "vae_decoder"} - set(self.components))
        if missing:
            raise GenerationError(f"the pipeline needs the components {missing}; pass them with the others")
        if "text_encoder" in self.components and tokenizer is None:
            raise GenerationError("the model has a text encoder: pass its tokenizer")
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.facts = facts
        self.profile = profile
        self.backend = backend
        self.precision = precision
        self.reduced_precision = reduced_precision
        self.model_hash = model_hash
        self.artifacts = artifacts
        # Every scheduler that takes the model's schedule; the rest (pndm, lms under zero terminal SNR) fail
        # when asked for, with the reason and the usable names, instead of refusing the whole model.
        schedulers, self._unusable = usable_schedulers(scheduler_config)
        if not schedulers:
            raise SchedulerConfigError(next(iter(self._unusable.values())))
        self.schedulers = MappingProxyType(schedulers)
        unet_inputs = {t.name for t in self.components["unet"].contract.inputs}
        self.num_classes = self.facts.num_classes if "class_labels" in unet_inputs else None
        lc, cin = self.facts.latent_channels, self.facts.unet_in_channels
        if cin not in (lc, 2 * lc + 1):
            raise GenerationError(
                f"a UNet with {cin} input channels for {lc} latent channels (concat conditioning) is not supported by the runtime pipeline"
            )
        self.inpainting_unet = cin == 2 * lc + 1

    @classmethod
    def from_artifacts(
        cls, artifacts: Artifacts, components: Mapping[str, Component], backend: str, precision: str, reduced_precision: bool = False,
    ) -> Pipeline:
        """The loop over `components` opened from `artifacts` (its tokenizer, scheduler, facts, profile and hash)."""
        return cls(
            components, artifacts.tokenizer, artifacts.scheduler_config, artifacts.manifest.facts, artifacts.manifest.profile,
            backend=backend, precision=precision, model_hash=artifacts.model_hash, artifacts=artifacts, reduced_precision=reduced_precision,
        )

    @classmethod
    def load(
        cls,
        artifacts_dir: str | Path | None = None,
        backend: str = "onnxruntime",
        precision: str = "fp32",
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        spin: bool = False,
        compile_cache: str | Path | bool = True,
        reduced_precision: bool = False,
    ) -> Pipeline:
        """Open an artifacts folder (default: the shipped default model) with one backend; hashes are checked here, once.
        `threads`: CPU threads per operator (default: one per physical core); `spin`: idle threads
        spin-wait between operators (off by default: backends/base.HostOptions says why). `compile_cache`:
        where providers that compile graphs on opening (OpenVINO) keep them for the next process: True (the
        user's cache folder, ~/.cache/ldm-rt), a folder, or False (compile every time). `reduced_precision`:
        let the backend compute in bf16 where the CPU supports it (OpenVINO; backends/base.HostOptions)."""
        if compile_cache is True:
            cache: Path | None = default_compile_cache()
        elif compile_cache is False or compile_cache is None:
            cache = None
        else:
            cache = Path(compile_cache)
        host = HostOptions(threads, spin, cache, reduced_precision)  # validated before anything is opened
        artifacts = Artifacts.open(artifacts_dir)
        components = open_components(backend, artifacts.root, artifacts.manifest, precision, providers, host)
        return cls.from_artifacts(artifacts, components, backend, precision, host.reduced_precision)

    def close(self) -> None:
        """Release what the components hold outside Python's memory (TensorRT: device buffers, streams, graphs)."""
        for component in self.components.values():
            if callable(close := getattr(component, "close", None)):
                close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- one request -------------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] = "",
        steps: int = 25,
        guidance: float = 7.5,
        scheduler: str = "ddim",
        seed: int | None = None,
        batch: int = 1,
        height: int | None = None,
        width: int | None = None,
        latents: np.ndarray | None = None,
        init_image: np.ndarray | Image.Image | str | Path | None = None,
        strength: float | None = None,
        mask: np.ndarray | Image.Image | str | Path | None = None,
        class_labels: int | Sequence[int] | None = None,
        callback: StepCallback | None = None,
        guidance_rescale: float = 0.0,
        mask_blur: float | None = 0.0,
    ) -> Result:
        """Images for `prompt` (`batch` per prompt). `latents`: unit-variance noise (B, C, h, w) used instead
        of drawing it (multiplied by the scheduler's init_noise_sigma, as diffusers' `latents=`);
        `init_image` + `strength` (default 0.8): img2img; `mask` with init_image (1 = repaint; strength
        default 1.0, pure noise): inpainting, after which the kept pixels are pasted back from the init
        image (images.paste_kept) with a seam of `mask_blur` pixels (0: hard edge; None: no paste-back,
        the decoder's pixels everywhere, as diffusers returns them). `class_labels` (one per prompt) for
        class-conditional models. `guidance_rescale` in [0, 1] (Lin et al. suggest 0.7):
        runtime/guidance.py. Defaults: `seed` None draws a fresh seed (recorded in Result.params, so the image
        can be made again); `negative_prompt` "" is the unconditional half of guidance."""
        start_time = time.perf_counter()
        as_prompts(prompt, "prompt")  # a clear error for None, numbers or non-UTF-8 text before anything else
        if mask is not None and init_image is None:
            raise GenerationError("mask needs init_image: inpainting repaints part of an image")
        if strength is not None and init_image is None:
            raise GenerationError("strength needs init_image: it is the fraction of the schedule run from that image")
        if mask_blur and mask is None:
            raise GenerationError("mask_blur needs mask: it softens the seam of the inpainted region")
        if self.inpainting_unet and mask is None:
            raise GenerationError("this is an inpainting model: pass init_image and mask")
        if strength is None:
            strength = INPAINT_STRENGTH if mask is not None else IMG2IMG_STRENGTH
        init = as_rgb_array(init_image) if init_image is not None else None
        if init is not None:  # img2img defaults to the image's own size
            height, width = height or init.shape[0], width or init.shape[1]
        labels = self._class_labels(class_labels)
        if labels is not None and isinstance(prompt, str) and len(labels) > 1:
            prompt = [prompt] * len(labels)  # one (empty) prompt per label
        if "text_encoder" not in self.components and any(prompt if not isinstance(prompt, str) else [prompt]):
            raise GenerationError("this model has no text encoder and takes no prompt; pass prompt=''")
        p = make_params(
            self, prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
            scheduler=scheduler, seed=seed, batch=batch, height=height, width=width, strength=strength,
            guidance_rescale=guidance_rescale, mask_blur=mask_blur,
        )
        if labels is not None and len(labels) != len(p.prompts):
            raise GenerationError(f"{len(labels)} class labels for {len(p.prompts)} prompts; pass one per prompt")
        f = self.facts.latent_factor
        shape = (p.images, self.facts.latent_channels, p.height // f, p.width // f)
        latents = None if latents is None else checked_latents(latents, shape)

        if p.scheduler in self._unusable:
            raise GenerationError(f"{self._unusable[p.scheduler]}; this model can use {', '.join(self.schedulers)}")
        fewest = self.schedulers[p.scheduler].fewest_sound_steps
        if p.steps < fewest:
            log.warning(
                "%s has given broken images on this model's schedule below %d steps; running %d (use more steps or "
                "another scheduler)", p.scheduler, fewest, p.steps,
            )
        run = self.schedulers[p.scheduler].set_timesteps(p.steps)
        if init is not None:
            run = run.with_strength(p.strength)
        timings: dict[str, Any] = {"unet": []}
        use_cfg = "text_encoder" in self.components and cfg.uses_uncond(p.guidance)
        context = self._encode_prompts(p, use_cfg, timings)
        rng = np.random.default_rng(p.seed)
        noise = latents if latents is not None else rng.standard_normal(shape, dtype=np.float32)  # drawn first
        start = self._start(p, run, noise, init, mask, timings)
        if labels is not None:
            labels = np.repeat(labels, p.batch)  # (B,)
        x = self._denoise(p, run, start, context, labels, use_cfg, rng, timings, callback)
        decoded = self._call("vae_decoder", {"latent": x}, timings)["image"]
        images = to_uint8(decoded)
        if start.pixel_mask is not None and p.mask_blur is not None:
            images = paste_kept(images, start.pixels, start.pixel_mask, p.mask_blur)
        timings["total"] = time.perf_counter() - start_time
        params = {
            **p.to_dict(),
            "model_hash": self.model_hash,
            "backend": self.backend,
            "precision": self.precision,
            # Asked for (bf16 where the CPU has it; the backend warns when it computes in f32 instead).
            "reduced_precision": self.reduced_precision,
            "mode": "inpaint" if mask is not None else "img2img" if init is not None else "txt2img",
        }
        if labels is not None:
            params["class_labels"] = labels.tolist()
        return Result(images, params, timings, x)

    def _denoise(self, p: GenerationParams, run, start: Start, context, labels, use_cfg: bool, rng, timings: dict, callback) -> np.ndarray:
        """The sampling loop: guided UNet call per step, scheduler step, inpainting blend. Returns final latents."""
        unet = self.components["unet"]
        fixed: dict[str, Any] = {}
        if context is not None:  # (B or 2B, L, D), read by every step: kept on the device if the backend can
            fixed["encoder_hidden_states"] = unet.upload("encoder_hidden_states", context) if isinstance(unet, SupportsUpload) else context
        if labels is not None:
            fixed["class_labels"] = cfg.double(labels) if use_cfg else labels  # (B or 2B,) int64
        x = start.x
        for i, t in enumerate(run.timesteps):
            x_in = run.scale_model_input(x, i)
            if self.inpainting_unet:
                x_in = np.concatenate([x_in, start.mask, start.masked_image_latents], axis=1)  # (B, 2C+1, h, w)
            if use_cfg:
                x_in = cfg.double(x_in)  # (2B, ...) [uncond, cond]
            feeds = {"sample": x_in.astype(np.float32), "timestep": np.full((x_in.shape[0],), t, dtype=np.float32), **fixed}
            out = self._call("unet", feeds, timings["unet"], step=i)["out_sample"]
            eps = cfg.combine(out, p.guidance, p.guidance_rescale) if use_cfg else out
            x = run.step(eps, i, x, generator=rng)
            if start.mask is not None and not self.inpainting_unet:
                # Latent blend (as diffusers' inpainting with a plain UNet): the known region is put back at
                # the next step's noise level, and clean after the last step.
                last = i + 1 == len(run.timesteps)
                known = start.image_latents if last else run.add_noise(start.image_latents, start.noise, i + 1)
                x = (start.mask * x + (1.0 - start.mask) * known).astype(np.float32)
            if callback is not None:
                callback(i, len(run.timesteps), float(t), x)
        return x.astype(np.float32)

    # ---- stages ----------------------------------------------------------------------------------------------
    def _call(self, name: str, feeds: dict[str, Any], timings: dict | list, step: int | None = None) -> dict[str, np.ndarray]:
        """Run one component, time it, and refuse non-finite outputs (naming the component and step)."""
        t0 = time.perf_counter()
        outs = self.components[name].run(feeds)
        elapsed = time.perf_counter() - t0
        if isinstance(timings, list):
            timings.append(elapsed)
        else:
            timings[name] = timings.get(name, 0.0) + elapsed
        for key, value in outs.items():
            if not np.all(np.isfinite(value)):
                where = f" at step {step}" if step is not None else ""
                hint = " (fp16 overflow? try --precision fp32)" if self.precision == "fp16" else ""
                raise NonFiniteError(f"{name} produced non-finite values in {key}{where}{hint}")
        return outs

    def _class_labels(self, class_labels: int | Sequence[int] | None) -> np.ndarray | None:
        if self.num_classes is None:
            if class_labels is not None:
                raise GenerationError("this model is not class-conditional; drop class_labels")
            return None
        if class_labels is None:
            raise GenerationError(f"this model is class-conditional: pass class_labels (ints in [0, {self.num_classes}))")
        labels = np.asarray(class_labels).reshape(-1)
        if labels.dtype.kind not in "iu" or labels.size == 0 or labels.min() < 0 or labels.max() >= self.num_classes:
            raise GenerationError(f"class_labels must be ints in [0, {self.num_classes}), got {class_labels!r}")
        return labels.astype(np.int64)

    def _encode_prompts(self, p: GenerationParams, use_cfg: bool, timings: dict) -> np.ndarray | None:
        """Context (B or 2B, L, D), rows [uncond..., cond...] under guidance, each prompt repeated `batch` times."""
        if "text_encoder" not in self.components:
            return None
        tokenizer = self.tokenizer
        # The tokenizer warns about each prompt it truncates or has unknown words in (numbered within its list).
        ids = tokenizer(list(p.prompts)).ids
        if use_cfg:
            ids = np.concatenate([tokenizer(list(p.negative_prompts), what="negative prompt").ids, ids])  # (2P, L): [uncond, cond]
        ids = np.repeat(ids, p.batch, axis=0)  # (rows, L), each prompt `batch` times in a row, as diffusers
        return self._call("text_encoder", {"input_ids": ids}, timings)["last_hidden_state"]

    def _encode_image(self, image: np.ndarray, timings: dict) -> np.ndarray:
        """(1, 3, H, W) in [-1, 1] -> scaled latent (1, C, h, w): the posterior mean (KL) or the latent (VQ)."""
        params = self._call("vae_encoder", {"image": image}, timings)["latent_parameters"]
        mean = params[:, : self.facts.latent_channels]  # KL: [mean, logvar] along channels
        return (mean * np.float32(self.facts.scale_factor)).astype(np.float32)

    def _start(self, p: GenerationParams, run, noise: np.ndarray, init: np.ndarray | None, mask, timings: dict) -> Start:
        """Initial latents: scaled noise (txt2img), or the init image's latents noised to the first kept step."""
        if init is None:
            return Start(noise * np.float32(run.init_noise_sigma), noise)
        b = p.images
        pixels = resize(init, p.height, p.width)
        image = image_to_model(pixels)  # (1, 3, H, W)
        image_latents = np.repeat(self._encode_image(image, timings), b, axis=0)  # (B, C, h, w)
        if mask is None:
            return Start(run.add_noise(image_latents, noise, 0), noise, image_latents)
        pixel_mask = resize(as_mask_array(mask), p.height, p.width)  # (H, W)
        m = (pixel_mask >= 0.5).astype(np.float32)[None, None]  # (1, 1, H, W), binarised as diffusers
        f = self.facts.latent_factor
        latent_mask = np.repeat(m[:, :, ::f, ::f], b, axis=0)  # nearest downsampling, (B, 1, h, w)
        masked_latents = None
        if self.inpainting_unet:
            masked_latents = np.repeat(self._encode_image(image * (m < 0.5), timings), b, axis=0)
        if p.strength == 1.0:
            x = noise * np.float32(run.init_noise_sigma)  # pure noise, as diffusers' inpainting at full strength
        else:
            x = run.add_noise(image_latents, noise, 0)
        return Start(x, noise, image_latents, latent_mask, masked_latents, pixels, pixel_mask)


def checked_latents(latents: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    latents = np.asarray(latents)
    if latents.dtype.kind != "f":  # complex, bool, int, datetime, str, structured: not noise
        raise GenerationError(f"latents must be a float16/32/64 array of noise, got dtype {latents.dtype}")
    if latents.shape != shape:
        b, _, h, w = shape
        raise GenerationError(f"latents have shape {latents.shape}, expected {shape} for {b} images with latents of {h}x{w}")
    if not np.all(np.isfinite(latents)):
        raise GenerationError("latents contain NaN or Inf")
    return latents.astype(np.float32)
