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
A base + refiner call (`refiner=`) uses one generator for both: the base's draws, then the refiner's per-step
draws (continuing from latents, `denoising_start`, draws no initial noise, as diffusers' SDXL img2img does not).
"""

from __future__ import annotations

import json
import logging
import numbers
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from . import guidance as cfg
from .artifacts import Artifacts
from .backends.base import Component, HostOptions, SupportsUpload, default_compile_cache, open_components
from . import embeddings as textual_inversion
from .lora import LoraSpec, as_specs, load_loras, records
from .previews import POOR_FIT_DB, PreviewCallback, PreviewFactors, Previewer, check_preview
from .contracts import ModelFacts, ShapeProfile, controlnet_names
from .controlnet import CONDITIONING_SCALE, GUIDANCE_END, GUIDANCE_START, ControlImage, ControlRequest, ControlRun, make_control_request
from .images import (
    SOFTWARE,
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
from .params import (
    MICRO_CONDITIONING,
    REFINER_START,
    TIME_ID_LAYOUTS,
    GenerationError,
    GenerationParams,
    MicroConditioning,
    as_prompts,
    check_denoising_fraction,
    check_eta,
    check_image_inputs,
    make_micro_conditioning,
    make_params,
)
from .prompt_weights import emphasize
from .prompt_weights import tokenize as tokenize_weighted
from .schedulers import SchedulerConfig, usable_schedulers, with_eta
from .schedulers.config import SchedulerConfigError
from .schedulers.lcm import guidance_embedding
from .scheduler_choice import FALLBACK as FALLBACK_SCHEDULER
from .scheduler_choice import karras_variant
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
    # images is empty (0, H, W, 3) when generate(decode=False) asked for latents only (a refiner's input).

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
        text["Software"] = SOFTWARE[0]
        return text

    def save(self, path: str | Path, as_grid: bool = False) -> list[Path]:
        """Write the images with their parameters (`metadata`), in the format the extension names (.png;
        .jpg/.jpeg and .webp carry them in EXIF): one image at `path`, a batch at NAME_0.EXT, NAME_1.EXT, ...
        or, with as_grid, one grid image at `path`. All files are written or none. Returns the paths."""
        if not len(self.images):
            raise GenerationError("this result holds latents only (generate(decode=False)); nothing to save")
        if as_grid:
            return write_images([(path, grid(self.images), self.metadata(None))])
        paths = output_paths(path, len(self.images))
        return write_images([(out, image, self.metadata(k)) for k, (out, image) in enumerate(zip(paths, self.images))])


@dataclass(frozen=True)
class Start:
    """The loop's starting point and what inpainting needs at every step."""

    x: np.ndarray  # (B, C, h, w) initial latents
    noise: np.ndarray | None  # (B, C, h, w) the unit-variance noise they were made from (None: continued latents)
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
        tokenizer_2: PromptTokenizer | None = None,
        default_scheduler: str | None = None,
    ) -> None:
        """`components`: text_encoder (if the model has one), unet, vae_decoder, vae_encoder (img2img and
        inpainting), each with a `run` keyed by its contract's tensor names; `profile`: the batch and size
        ranges requests are checked against (its optimum is the default size); `model_hash`: what the image
        metadata names as the model; `artifacts`: the folder they came from, if any (Pipeline.load);
        `reduced_precision`: the components were opened with HostOptions.reduced_precision (recorded in params);
        `tokenizer_2`: SDXL's second tokenizer, for text_encoder_2 (its own pad token); `default_scheduler`: what
        generate() samples with when asked for none (the model folder's own, runtime/scheduler_choice.py; None: ddim)."""
        self.components = MappingProxyType(dict(components))
        missing = sorted({"unet", "vae_decoder"} - set(self.components))
        if missing:
            raise GenerationError(f"the pipeline needs the components {missing}; pass them with the others")
        if "text_encoder" in self.components and tokenizer is None:
            raise GenerationError("the model has a text encoder: pass its tokenizer")
        if "text_encoder_2" in self.components and tokenizer_2 is None:
            raise GenerationError("the model has a second text encoder (SDXL): pass its tokenizer as tokenizer_2")
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        # Whether prompts mean anything: SD's one encoder, SDXL's two, or an SDXL refiner's second only.
        self.has_text = "text_encoder" in self.components or "text_encoder_2" in self.components
        self.scheduler_config = scheduler_config
        self.facts = facts
        self.profile = profile
        self.backend = backend
        self.precision = precision
        self.reduced_precision = reduced_precision
        self.model_hash = model_hash
        self.artifacts = artifacts
        # LoRAs in these weights (fused at export, or applied as the components opened): file, sha256, scale.
        fused_loras = artifacts.manifest.source.get("loras", []) if artifacts is not None else []
        self.loras: tuple[dict[str, Any], ...] = tuple({**r, "applied": "export"} for r in fused_loras if isinstance(r, dict))
        # Textual-inversion embeddings in the tokenizers and text encoders (baked at export, or added as they opened).
        baked = artifacts.manifest.source.get("embeddings", []) if artifacts is not None else []
        self.embeddings: tuple[dict[str, Any], ...] = tuple(
            {k: v for k, v in {**r, "applied": "export"}.items() if k != "path"} for r in baked if isinstance(r, dict)
        )
        # Every scheduler that takes the model's schedule; the rest (pndm, lms under zero terminal SNR) fail
        # when asked for, with the reason and the usable names, instead of refusing the whole model.
        schedulers, self._unusable = usable_schedulers(scheduler_config)
        if not schedulers:
            raise SchedulerConfigError(next(iter(self._unusable.values())))
        self.schedulers = MappingProxyType(schedulers)
        self.default_scheduler = default_scheduler or FALLBACK_SCHEDULER
        if self.default_scheduler not in self.schedulers:
            raise GenerationError(
                f"default scheduler {self.default_scheduler!r} cannot sample this model; use one of {', '.join(self.schedulers)}"
            )
        unet_inputs = {t.name for t in self.components["unet"].contract.inputs}
        self.num_classes = self.facts.num_classes if "class_labels" in unet_inputs else None
        # SDXL: the UNet's pooled text embeds come from text_encoder_2, the time ids from the request.
        self.time_ids = self.facts.time_ids if "time_ids" in unet_inputs else None
        # An SDXL refiner's UNet reads an aesthetic score instead of a target size; it continues from an image or latents.
        self.is_refiner = "aesthetic_score" in TIME_ID_LAYOUTS.get(self.time_ids, ())
        if self.time_ids is not None and "text_encoder_2" not in self.components:
            raise GenerationError(
                "this UNet takes SDXL's pooled text embeds and time ids, but the model has no text_encoder_2 to make them; "
                "rebuild the artifacts from a complete SDXL model (both text encoders, or a refiner's second)"
            )
        lc, cin = self.facts.latent_channels, self.facts.unet_in_channels
        if cin not in (lc, 2 * lc + 1):
            raise GenerationError(
                f"a UNet with {cin} input channels for {lc} latent channels (concat conditioning) is not supported by the runtime pipeline"
            )
        self.inpainting_unet = cin == 2 * lc + 1
        # ControlNets (export order; runtime/controlnet.py): each request then needs one control image per ControlNet.
        self.controlnets = tuple(controlnet_names(list(self.components)))

    @classmethod
    def from_artifacts(
        cls, artifacts: Artifacts, components: Mapping[str, Component], backend: str, precision: str, reduced_precision: bool = False,
    ) -> Pipeline:
        """The loop over `components` opened from `artifacts` (its tokenizer, scheduler, facts, profile and hash)."""
        return cls(
            components, artifacts.tokenizer, artifacts.scheduler_config, artifacts.manifest.facts, artifacts.manifest.profile,
            backend=backend, precision=precision, model_hash=artifacts.model_hash, artifacts=artifacts, reduced_precision=reduced_precision,
            tokenizer_2=artifacts.tokenizer_2,
            default_scheduler=karras_variant(artifacts.manifest.default_scheduler, artifacts.scheduler_config.use_karras_sigmas) or None,
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
        loras: Sequence[LoraSpec | tuple[str | Path, float] | str] | None = None,
        embeddings: Sequence[textual_inversion.EmbeddingSpec | tuple[str | Path, str | None] | str | Path] | None = None,
    ) -> Pipeline:
        """Open an artifacts folder (default: the shipped default model) with one backend; hashes are checked here, once.
        `threads`: CPU threads per operator (default: one per physical core); `spin`: idle threads
        spin-wait between operators (off by default: backends/base.HostOptions says why). `compile_cache`:
        where providers that compile graphs on opening (OpenVINO; ONNX Runtime for components of 64 MB and more, and
        the record of their verified hashes) keep them for the next process: True (the
        user's cache folder, ~/.cache/ldm-rt), a folder, or False (compile every time). `reduced_precision`:
        let the backend compute in bf16 where the CPU supports it (OpenVINO; backends/base.HostOptions).
        `loras`: LoRA files to apply, each (FILE, SCALE), "FILE[:SCALE]" or a runtime.lora.LoraSpec; their deltas
        are added to the weights as the components open (ONNX Runtime, OpenVINO; TensorRT refits; runtime/lora.py), recorded in every
        result's params (file, sha256, scale). `embeddings`: textual-inversion files, each "FILE[:TOKEN]", (FILE, TOKEN)
        or a runtime.embeddings.EmbeddingSpec: the tokenizers learn their trigger words and the text encoders' token
        tables their vectors as the components open (ONNX Runtime, OpenVINO; runtime/embeddings.py), recorded in every
        result's params (file, sha256, token, vectors)."""
        if compile_cache is True:
            cache: Path | None = default_compile_cache()
        elif compile_cache is False or compile_cache is None:
            cache = None
        else:
            cache = Path(compile_cache)
        host = HostOptions(threads, spin, cache, reduced_precision)  # validated before anything is opened
        artifacts = Artifacts.open(artifacts_dir)
        # LoRAs (file, scale) are added to the weights as the sessions open; the files on disk stay as they are.
        lora_files = load_loras(as_specs(loras))
        embedding_files = textual_inversion.load_embeddings(textual_inversion.as_specs(embeddings))
        artifacts, tables = textual_inversion.with_embeddings(artifacts, embedding_files)  # every file checked before opening
        components = open_components(
            backend, artifacts.root, artifacts.manifest, precision, providers, host, loras=lora_files, embeddings=tables
        )
        pipe = cls.from_artifacts(artifacts, components, backend, precision, host.reduced_precision)
        pipe.loras += tuple({**r, "applied": "run time"} for r in records(lora_files))
        pipe.embeddings += tuple({**r, "applied": "run time"} for r in textual_inversion.records(embedding_files))
        return pipe

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
        scheduler: str | None = None,
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
        *,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        init_latents: np.ndarray | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        decode: bool = True,
        refiner: Pipeline | None = None,
        refiner_start: float | None = None,
        control_image: ControlImage | Sequence[ControlImage] | None = None,
        controlnet_conditioning_scale: float | Sequence[float] = CONDITIONING_SCALE,
        control_guidance_start: float | Sequence[float] = GUIDANCE_START,
        control_guidance_end: float | Sequence[float] = GUIDANCE_END,
        guess_mode: bool = False,
        eta: float | None = None,
        prompt_weighting: bool = False,
        preview: PreviewCallback | None = None,
        preview_every: int = 1,
        preview_kind: str = "fast",
    ) -> Result:
        """Images for `prompt` (`batch` per prompt). `latents`: unit-variance noise (B, C, h, w) used instead
        of drawing it (multiplied by the scheduler's init_noise_sigma, as diffusers' `latents=`);
        `init_image` + `strength` (default 0.8): img2img; `mask` with init_image (1 = repaint; strength
        default 1.0, pure noise): inpainting, after which the kept pixels are pasted back from the init
        image (images.paste_kept) with a seam of `mask_blur` pixels (0: hard edge; None: no paste-back,
        the decoder's pixels everywhere, as diffusers returns them). `class_labels` (one per prompt) for
        class-conditional models. `guidance_rescale` in [0, 1] (Lin et al. suggest 0.7):
        runtime/guidance.py. Defaults: `scheduler` None samples with the model's own (`default_scheduler`: its
        folder's scheduler class, e.g. euler for SDXL, euler-a for SDXL-Turbo, lcm for LCM; ddim for the shipped
        model); `seed` None draws a fresh seed (recorded in Result.params, so the image can be made again);
        `negative_prompt` "" is the unconditional half of guidance (zero embeddings instead when the model says
        force_zeros_for_empty_prompt, as SDXL's folders do). `eta` in [0, 1]: DDIM's
        eta, TCD's gamma (diffusers passes both to step as `eta`) or DPM++ 2S a's eta; None: the scheduler's default
        (0, 0.3, 1); recorded in Result.params when given. `prompt_weighting`: read A1111's emphasis in the prompts and
        negative prompts, `(word:1.3)`, `(word)`, `[word]`, BREAK (runtime/prompt_weights.py; off: brackets are text);
        recorded in Result.params when on.

        SDXL (keyword-only, diffusers' names): the micro-conditioning `original_size`, `crops_coords_top_left`,
        `target_size` (base) or `aesthetic_score` (refiner) and their `negative_*` counterparts
        (params.MicroConditioning: defaults, time-id layout); they are recorded in Result.params. The base +
        refiner hand-off, on latents as diffusers' `denoising_end` / `denoising_start` split the timesteps:
        `denoising_end=0.8, decode=False` stops the base at 80 % of the schedule (Result.latents), and a refiner
        pipeline's `generate(..., init_latents=those, denoising_start=0.8)` continues; `refiner=PIPE,
        refiner_start=0.8` does both in one call. `init_latents` without denoising_start: img2img from
        scaled latents (B, C, h, w) instead of an image.

        ControlNet (artifacts built with --controlnet; diffusers' names and meaning, runtime/controlnet.py):
        `control_image`, one per ControlNet in export order (a list when several; resized to the output size),
        `controlnet_conditioning_scale`, `control_guidance_start` / `control_guidance_end` (the fraction of the
        steps during which each applies; one value or one per ControlNet) and `guess_mode`; recorded in
        Result.params with each control image's sha256.

        Step previews (runtime/previews.py): `preview(step_index, num_steps, images)` receives (B, H, W, 3) uint8
        images of the model's x0 estimate every `preview_every` steps and at the last step (whose preview is the
        final latents, so a "full" one equals the final image). `preview_kind` "fast": the folder's fitted latent ->
        RGB map at latent resolution, repeated to the image size (almost free); "full": a VAE decode per preview.
        Previews do not change the result and are not recorded in Result.params; with refiner=, the base's steps are
        previewed, then the refiner's, each numbered from 0."""
        control = make_control_request(
            len(self.controlnets), control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, guess_mode
        )
        micro_given = {name: value for name, value in locals().items() if name in MICRO_CONDITIONING}
        # None: this model's own scheduler (a refiner hand-off follows the base's, so both split one schedule).
        scheduler = self.default_scheduler if scheduler is None else scheduler
        request = dict(
            prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, scheduler=scheduler,
            batch=batch, height=height, width=width, latents=latents, init_image=init_image, strength=strength, mask=mask,
            class_labels=class_labels, callback=callback, guidance_rescale=guidance_rescale, mask_blur=mask_blur, eta=eta,
            prompt_weighting=prompt_weighting, preview=preview, preview_every=preview_every, preview_kind=preview_kind,
        )
        if refiner is not None:
            if denoising_start is not None or denoising_end is not None or init_latents is not None or not decode:
                raise GenerationError("refiner= splits the schedule itself; drop denoising_start, denoising_end, init_latents and decode=False")
            if control is not None:
                raise GenerationError("refiner= with ControlNets is not supported; sample the ControlNet artifacts without a refiner")
            return self._generate_with_refiner(refiner, refiner_start, seed, request, micro_given)
        if refiner_start is not None:
            raise GenerationError("refiner_start needs refiner: the pipeline that takes over at that fraction of the schedule")
        return self._generate(
            **request, seed=seed, micro_given=micro_given, init_latents=init_latents, denoising_start=denoising_start,
            denoising_end=denoising_end, decode=decode, rng=None, control=control,
        )

    def _generate_with_refiner(
        self, refiner: Pipeline, refiner_start: float | None, seed: int | None, request: dict[str, Any], micro_given: dict[str, Any]
    ) -> Result:
        """This pipeline up to `refiner_start` of the schedule, then `refiner` from there on its latents, with one
        random generator for both (diffusers' recipe passes one generator to both pipelines)."""
        if not isinstance(refiner, Pipeline):
            raise GenerationError(f"refiner must be a Pipeline (Pipeline.load(REFINER_ARTIFACTS)), got {type(refiner).__name__}")
        if request["mask"] is not None:
            raise GenerationError("refiner= does not inpaint; inpaint without a refiner")
        if self.is_refiner:
            raise GenerationError(
                "the base model is an SDXL refiner (its UNet reads an aesthetic score); pass the base model as the "
                "pipeline (--model) and the refiner as refiner= (--refiner)"
            )
        if refiner.time_ids is None:
            raise GenerationError("the refiner is not an SDXL model (its UNet takes no time ids); pass an SDXL refiner's artifacts")
        start = check_denoising_fraction(REFINER_START if refiner_start is None else refiner_start, "refiner_start")
        for fact in ("latent_channels", "latent_factor", "scale_factor"):
            if getattr(self.facts, fact) != getattr(refiner.facts, fact):
                raise GenerationError(
                    f"the refiner's latents differ from this model's ({fact} {getattr(refiner.facts, fact)} != "
                    f"{getattr(self.facts, fact)}); pair a base and a refiner that share their autoencoder"
                )
        if seed is None:
            seed = secrets.randbits(63)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise GenerationError(f"seed must be an integer >= 0, got {seed!r}")
        rng = np.random.default_rng(int(seed))
        given = {k: v for k, v in micro_given.items() if v is not None}
        # Each model reads the micro-conditioning its time ids hold (SDXL's refiner: aesthetic scores, no target size).
        base_micro, refiner_micro = (
            {k: v for k, v in given.items() if time_ids is not None and k.removeprefix("negative_") in TIME_ID_LAYOUTS.get(time_ids, ())}
            for time_ids in (self.time_ids, refiner.time_ids)
        )
        unused = sorted(set(given) - set(base_micro) - set(refiner_micro))
        if unused:
            raise GenerationError(f"neither the base nor the refiner reads {', '.join(unused)}; drop them")
        base = self._generate(
            **request, seed=seed, micro_given=base_micro, init_latents=None, denoising_start=None, denoising_end=start,
            decode=False, rng=rng,
        )
        refined = refiner._generate(
            **{**request, "latents": None, "init_image": None, "strength": None, "height": base.params["height"], "width": base.params["width"]},
            seed=seed, micro_given=refiner_micro, init_latents=base.latents, denoising_start=start, denoising_end=None,
            decode=True, rng=rng,
        )
        params = {
            **refined.params,
            "mode": f"{base.params['mode']}+refiner",
            "refiner_start": start,
            "base_model_hash": self.model_hash,
            **{f"base_{k}": v for k, v in base.params.items() if k in MICRO_CONDITIONING or (k == "strength" and request["init_image"] is not None)},
        }
        timings = {**refined.timings, "base": base.timings, "total": base.timings["total"] + refined.timings["total"]}
        return Result(refined.images, params, timings, refined.latents)

    def _generate(
        self, prompt, negative_prompt, steps, guidance, scheduler, seed, batch, height, width, latents, init_image,
        strength, mask, class_labels, callback, guidance_rescale, mask_blur, micro_given, init_latents,
        denoising_start, denoising_end, decode, *, rng: np.random.Generator | None, control: ControlRequest | None = None,
        eta: float | None = None, prompt_weighting: bool = False,
        preview: PreviewCallback | None = None, preview_every: int = 1, preview_kind: str = "fast",
    ) -> Result:  # fmt: skip
        """generate() of one pipeline; `rng`: continue this generator instead of seeding one (the refiner hand-off)."""
        start_time = time.perf_counter()
        as_prompts(prompt, "prompt")  # a clear error for None, numbers or non-UTF-8 text before anything else
        check_preview(preview, preview_every, preview_kind)
        if not isinstance(prompt_weighting, bool):
            raise GenerationError(f"prompt_weighting must be True or False, got {prompt_weighting!r}")
        check_image_inputs(
            init_image=init_image is not None, strength=strength is not None, mask=mask is not None,
            mask_blur=bool(mask_blur), init_latents=init_latents is not None,  # 0 and None ask for no seam
        )  # fmt: skip
        if self.inpainting_unet and mask is None:
            raise GenerationError("this is an inpainting model: pass init_image and mask")
        denoising_start = check_denoising_fraction(denoising_start, "denoising_start")
        denoising_end = check_denoising_fraction(denoising_end, "denoising_end")
        if self.is_refiner and init_image is None and init_latents is None:
            raise GenerationError(
                "this model is an SDXL refiner: it continues from an image or latents, it does not start from noise; "
                "pass init_image (img2img), or use it as the refiner of a base model (refiner=, --refiner)"
            )
        if init_latents is not None and init_image is not None:
            raise GenerationError("pass init_image or init_latents, not both: both are the starting point")
        if denoising_start is not None:
            if init_latents is None:
                raise GenerationError("denoising_start needs init_latents: the latents an earlier pipeline stopped at (denoising_end)")
            if strength is not None:
                raise GenerationError("denoising_start decides where the schedule starts; drop strength")
            if denoising_end is not None and denoising_end <= denoising_start:
                raise GenerationError(f"denoising_end {denoising_end} must be after denoising_start {denoising_start}")
        if strength is None:
            strength = INPAINT_STRENGTH if mask is not None else IMG2IMG_STRENGTH
        init = as_rgb_array(init_image) if init_image is not None else None
        if init is not None:  # img2img defaults to the image's own size
            height, width = height or init.shape[0], width or init.shape[1]
        if init_latents is not None:
            init_latents = np.asarray(init_latents)
            if init_latents.ndim == 4:  # the latents' own size, as diffusers' refiner reads it
                f = self.facts.latent_factor
                height, width = height or init_latents.shape[2] * f, width or init_latents.shape[3] * f
        labels = self._class_labels(class_labels)
        if labels is not None and isinstance(prompt, str) and len(labels) > 1:
            prompt = [prompt] * len(labels)  # one (empty) prompt per label
        if not self.has_text and any(prompt if not isinstance(prompt, str) else [prompt]):
            raise GenerationError("this model has no text encoder and takes no prompt; pass prompt=''")
        p = make_params(
            self, prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
            scheduler=scheduler, seed=seed, batch=batch, height=height, width=width, strength=strength,
            guidance_rescale=guidance_rescale, mask_blur=mask_blur,
        )
        micro = make_micro_conditioning(self.time_ids, p.height, p.width, micro_given)
        if labels is not None and len(labels) != len(p.prompts):
            raise GenerationError(f"{len(labels)} class labels for {len(p.prompts)} prompts; pass one per prompt")
        f = self.facts.latent_factor
        shape = (p.images, self.facts.latent_channels, p.height // f, p.width // f)
        latents = None if latents is None else checked_latents(latents, shape)
        if init_latents is not None:
            init_latents = checked_latents(init_latents, shape, "init_latents")

        if p.scheduler in self._unusable:
            raise GenerationError(f"{self._unusable[p.scheduler]}; this model can use {', '.join(self.schedulers)}")
        eta = check_eta(eta, p.scheduler)
        chosen = self.schedulers[p.scheduler] if eta is None else with_eta(p.scheduler, self.scheduler_config, eta)
        fewest = chosen.fewest_sound_steps
        if p.steps < fewest:
            log.warning(
                "%s has given broken images on this model's schedule below %d steps; running %d (use more steps or "
                "another scheduler)", p.scheduler, fewest, p.steps,
            )
        run = chosen.set_timesteps(p.steps)
        if denoising_start is not None:
            run = start_at(run, denoising_start, p.scheduler)
        elif init is not None or init_latents is not None:
            run = run.with_strength(p.strength)
        num_steps = len(run.timesteps) if denoising_end is None else steps_before(run, denoising_end, p.scheduler)
        timings: dict[str, Any] = {"unet": []}
        # An LCM-distilled UNet takes guidance as its timestep_cond input: no unconditional batch.
        use_cfg = self.has_text and cfg.uses_uncond(p.guidance) and self.facts.time_cond_proj_dim is None
        if self.facts.time_cond_proj_dim is not None and any(p.negative_prompts):
            log.warning("this LCM-distilled model takes guidance as an embedding, with no unconditional batch: the negative prompt is not used")
        context, pooled = self._encode_prompts(p, use_cfg, timings, prompt_weighting)
        rng = np.random.default_rng(p.seed) if rng is None else rng
        if latents is not None:
            noise = latents
        elif denoising_start is not None:  # continued latents add no noise, so none is drawn (diffusers draws none)
            noise = None
        else:
            noise = rng.standard_normal(shape, dtype=np.float32)  # drawn first
        if denoising_start is not None:
            start = Start(init_latents, noise)  # continue where the other pipeline stopped: no noise added
        elif init_latents is not None:
            start = Start(run.add_noise(init_latents, noise, 0), noise, init_latents)
        else:
            start = self._start(p, run, noise, init, mask, timings)
        if labels is not None:
            labels = np.repeat(labels, p.batch)  # (B,)
        added = self._added_conditioning(p, micro, pooled, use_cfg)
        if self.facts.time_cond_proj_dim is not None:  # (B, time_cond_proj_dim), the same every step
            added["timestep_cond"] = guidance_embedding(p.guidance, self.facts.time_cond_proj_dim, p.images)
        control_run = None
        if control is not None:  # ControlNets see the UNet's per-request inputs (guess mode: the conditional half)
            timings["controlnet"] = []
            control_run = ControlRun.prepare(
                control, [self.components[n].contract for n in self.controlnets], self.components["unet"].contract, p.height,
                p.width, p.images, len(run.timesteps), use_cfg, {"encoder_hidden_states": context, **added},
            )

        def finish(decoded: np.ndarray) -> np.ndarray:  # decoder output -> the images (previews' too)
            images = to_uint8(decoded)
            if start.pixel_mask is not None and p.mask_blur is not None:
                images = paste_kept(images, start.pixels, start.pixel_mask, p.mask_blur)
            return images

        previewer = None
        if preview is not None:
            factors = self.preview_factors if preview_kind == "fast" else None
            # The decoder's run, not self._call: a non-finite preview must not end the run (the Previewer zeroes it).
            previewer = Previewer(
                preview, preview_every, factors, self.facts.latent_factor,
                lambda latents: self.components["vae_decoder"].run({"latent": latents})["image"], finish, timings, defer_final=decode,
            )  # fmt: skip
        x = self._denoise(
            p, run, num_steps, start, context, labels, added, use_cfg, rng, timings, callback, control=control_run, preview=previewer
        )
        if decode:
            images = finish(self._call("vae_decoder", {"latent": x}, timings)["image"])
            if previewer is not None:
                previewer.flush(images)
        else:
            images = np.zeros((0, p.height, p.width, 3), np.uint8)
        timings["total"] = time.perf_counter() - start_time
        params = {
            **p.to_dict(),
            "model_hash": self.model_hash,
            "backend": self.backend,
            "precision": self.precision,
            # Asked for (bf16 where the CPU has it; the backend warns when it computes in f32 instead).
            "reduced_precision": self.reduced_precision,
            **({"loras": list(self.loras)} if self.loras else {}),
            **({"embeddings": list(self.embeddings)} if self.embeddings else {}),
            "mode": "inpaint" if mask is not None else "img2img" if init is not None or init_latents is not None else "txt2img",
        }
        if micro is not None:
            params.update(micro.to_dict(self.time_ids))
        if eta is not None:
            params["eta"] = eta
        if prompt_weighting:
            params["prompt_weighting"] = True
        if control is not None:
            params.update(control.to_dict(self.artifacts.manifest.source.get("controlnets") or [] if self.artifacts is not None else []))
        if denoising_start is not None or denoising_end is not None:
            params.update(denoising_start=denoising_start, denoising_end=denoising_end)
        if labels is not None:
            params["class_labels"] = labels.tolist()
        return Result(images, params, timings, x)

    def _added_conditioning(
        self, p: GenerationParams, micro: MicroConditioning | None, pooled: np.ndarray | None, use_cfg: bool
    ) -> dict[str, np.ndarray]:
        """SDXL's UNet inputs besides the context: text_embeds (rows, P) and time_ids (rows, N), rows as the context's."""
        if self.time_ids is None or micro is None or pooled is None:
            return {}
        cond, uncond = micro.time_ids(self.time_ids)
        ids = np.tile(np.asarray(cond, np.float32), (p.images, 1))  # (B, N)
        if use_cfg:
            ids = np.concatenate([np.tile(np.asarray(uncond, np.float32), (p.images, 1)), ids])  # (2B, N): [uncond, cond]
        return {"text_embeds": pooled.astype(np.float32), "time_ids": ids}

    def _denoise(
        self, p: GenerationParams, run, num_steps: int, start: Start, context, labels, added: dict[str, np.ndarray],
        use_cfg: bool, rng, timings: dict, callback, control: ControlRun | None = None, preview: Previewer | None = None,
    ) -> np.ndarray:  # fmt: skip
        """The sampling loop: guided UNet call per step, scheduler step, inpainting blend; the first `num_steps`
        steps of `run` (fewer than all under denoising_end). Returns final latents."""
        unet = self.components["unet"]
        fixed: dict[str, Any] = {}
        if context is not None:  # (B or 2B, L, D), read by every step: kept on the device if the backend can
            fixed["encoder_hidden_states"] = unet.upload("encoder_hidden_states", context) if isinstance(unet, SupportsUpload) else context
        if labels is not None:
            fixed["class_labels"] = cfg.double(labels) if use_cfg else labels  # (B or 2B,) int64
        for name, value in added.items():  # SDXL: (B or 2B, P) text_embeds, (B or 2B, N) time_ids
            fixed[name] = unet.upload(name, value) if isinstance(unet, SupportsUpload) else value
        x = start.x
        for i, t in enumerate(run.timesteps[:num_steps]):
            x_in = run.scale_model_input(x, i)
            if self.inpainting_unet:
                x_in = np.concatenate([x_in, start.mask, start.masked_image_latents], axis=1)  # (B, 2C+1, h, w)
            if use_cfg:
                x_in = cfg.double(x_in)  # (2B, ...) [uncond, cond]
            feeds = {"sample": x_in.astype(np.float32), "timestep": np.full((x_in.shape[0],), t, dtype=np.float32), **fixed}
            if control is not None:  # the ControlNets' summed residuals for this step (runtime/controlnet.py)
                feeds.update(control.residuals(i, feeds["sample"], float(t), lambda name, f: self._call(name, f, timings["controlnet"], step=i)))
            out = self._call("unet", feeds, timings["unet"], step=i)["out_sample"]
            eps = cfg.combine(out, p.guidance, p.guidance_rescale) if use_cfg else out
            # The x0 estimate (before the step overwrites x) for a preview of this step (runtime/previews.py).
            denoised = run.denoised(eps, i, x) if preview is not None and preview.due(i, num_steps) else None
            x = run.step(eps, i, x, generator=rng)
            if start.mask is not None and not self.inpainting_unet:
                # Latent blend (as diffusers' inpainting with a plain UNet): the known region is put back at
                # the next step's noise level, and clean after the last step.
                last = i + 1 == len(run.timesteps)
                known = start.image_latents if last else run.add_noise(start.image_latents, start.noise, i + 1)
                x = (start.mask * x + (1.0 - start.mask) * known).astype(np.float32)
            if denoised is not None:
                final = i + 1 == len(run.timesteps)  # the run's own result: what the final image is decoded from
                if not final and start.mask is not None:  # the kept region as it will be: the init image's latents
                    denoised = start.mask * denoised + (1.0 - start.mask) * start.image_latents
                preview.show(i, num_steps, x if final else denoised, final)
            if callback is not None:
                callback(i, num_steps, float(t), x)
        return x.astype(np.float32)

    @cached_property
    def preview_factors(self) -> PreviewFactors | None:
        """The folder's fast-preview map (runtime/previews.py), read on first use; None when the folder has none
        (built before previews, or no folder): "fast" previews are then full decodes, said once in the log."""
        factors = PreviewFactors.read(self.artifacts.root, self.artifacts.manifest) if self.artifacts is not None else None
        if factors is None:
            log.warning(
                "no fast preview factors in this model's folder (built before step previews): previews are full VAE decodes; "
                "rebuild the artifacts (or run ldm_rt.export.preview_fit.refresh_preview_factors on the folder) for fast ones"
            )
        elif isinstance(fit := factors.fit.get("psnr_db"), (int, float)) and fit < POOR_FIT_DB:
            log.warning(
                "fast previews fit this model's VAE poorly (%.1f dB on held-out images); full previews are exact "
                "(preview_kind='full', --preview-kind full)", fit,
            )  # fmt: skip
        return factors

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

    @property
    def prompt_chunks(self) -> tuple[int, int]:
        """(fewest, most) chunks of the text encoder's length the UNet's context takes (ShapeProfile.prompt_chunks):
        (1, 1) for builds without --prompt-chunks, whose longer prompts are truncated."""
        unet = self.components["unet"].contract
        spec = next((t for t in unet.inputs if t.name == "encoder_hidden_states"), None)
        if spec is None or isinstance(spec.shape[1], int) or not self.facts.context_length:
            return 1, 1
        dim = next(d for d in unet.dims if d.name == spec.shape[1])
        return dim.min // self.facts.context_length, dim.max // self.facts.context_length

    def _encode_prompts(
        self, p: GenerationParams, use_cfg: bool, timings: dict, weighting: bool = False
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(context (rows, n x L, D): n chunks of each prompt, prompt_chunks; pooled (rows, P) or None); rows are
        [uncond..., cond...] under guidance, each prompt repeated `batch` times. SDXL: the context is [text_encoder's,
        text_encoder_2's] penultimate layers on the channel axis (a refiner: the second's alone), each encoder reading
        its own tokenizer's ids; `pooled` is text_encoder_2's projected pooled output (the first chunk's). With force_zeros_for_empty_prompt an empty negative
        prompt is zeros in both (diffusers' negative_prompt=None), and is not encoded at all. `weighting`: A1111's
        emphasis (runtime/prompt_weights.py) on each encoder's states; the pooled output is not weighted (A1111, ComfyUI)."""
        if not self.has_text:
            return None, None
        zero = [False] * len(p.prompts)
        negatives: list[str] = []
        if use_cfg:
            zero = [self.facts.force_zeros_for_empty_prompt and n == "" for n in p.negative_prompts] + zero
            negatives = [n for n, z in zip(p.negative_prompts, zero) if not z]
        encoders = [(n, t) for n, t in (("text_encoder", self.tokenizer), ("text_encoder_2", self.tokenizer_2)) if n in self.components]
        least, most = self.prompt_chunks
        # The tokenizer warns about each prompt it truncates or has unknown words in (numbered within its list);
        # SDXL's second reads the same words with the same vocabulary, so only the first of two warns.
        tokenized, weights = [], []  # per encoder, each row's chunks and their token weights: [uncond..., cond...]
        for i, (_, tokenizer) in enumerate(encoders):
            tokenize = partial(tokenize_weighted, tokenizer) if weighting else tokenizer
            cond = tokenize(list(p.prompts), warn=i == 0, chunks=most)
            uncond = tokenize(negatives, what="negative prompt", warn=i == 0, chunks=most) if negatives else None
            tokenized.append((uncond.chunks if uncond else ()) + cond.chunks)
            weights.append((uncond.weights if uncond else ()) + cond.weights)
        # Every row takes as many chunks as the longest prompt (or negative prompt) needs: the shorter are padded
        # with the empty prompt's chunk, as A1111 pads them.
        n = max([least, *(len(c) for chunks in tokenized for c in chunks)])
        parts, pooled = [], None
        for (name, tokenizer), chunks, chunk_weights in zip(encoders, tokenized, weights):
            empty = tokenizer("", warn=False).ids
            ids = np.stack([np.concatenate([c, *[empty] * (n - len(c))]) for c in chunks])  # (P or 2P, n, L): [uncond, cond]
            ids = np.repeat(ids, p.batch, axis=0)  # each prompt `batch` times in a row, as diffusers
            outs = self._call(name, {"input_ids": ids.reshape(-1, ids.shape[-1])}, timings)
            states = outs["last_hidden_state"]  # (rows x n, L, D): the chunks' states one after the other per row
            states = states.reshape(len(ids), -1, states.shape[-1])
            parts.append(emphasize(states, chunk_weights, p.batch) if chunk_weights else states)
            if "text_embeds" in outs:  # the first chunk's pooled output (A1111, ComfyUI)
                pooled = outs["text_embeds"].reshape(len(ids), n, -1)[:, 0]
        context = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]  # (rows, L, D1 + D2)
        if any(zero):  # put the zero rows back in their places
            keep = np.repeat(~np.asarray(zero), p.batch)
            full = np.zeros((len(keep), *context.shape[1:]), np.float32)
            full[keep] = context
            context = full
            if pooled is not None:
                full_pooled = np.zeros((len(keep), *pooled.shape[1:]), np.float32)
                full_pooled[keep] = pooled
                pooled = full_pooled
        return context, pooled

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


def checked_latents(latents: np.ndarray, shape: tuple[int, ...], what: str = "latents") -> np.ndarray:
    latents = np.asarray(latents)
    if latents.dtype.kind != "f":  # complex, bool, int, datetime, str, structured: not noise
        kind = "noise" if what == "latents" else "latents"
        raise GenerationError(f"{what} must be a float16/32/64 array of {kind}, got dtype {latents.dtype}")
    if latents.shape != shape:
        b, _, h, w = shape
        raise GenerationError(f"{what} have shape {latents.shape}, expected {shape} for {b} images with latents of {h}x{w}")
    if not np.all(np.isfinite(latents)):
        raise GenerationError(f"{what} contain NaN or Inf")
    return latents.astype(np.float32)


def _cutoff(run, fraction: float) -> int:
    """diffusers' discrete_timestep_cutoff: the timestep at `fraction` of the training schedule, counted from its noisy end."""
    t = run.config.num_train_timesteps
    return int(round(t - fraction * t))


def steps_before(run, denoising_end: float, scheduler: str) -> int:
    """How many steps of `run` come before denoising_end (diffusers: the timesteps >= the cutoff)."""
    n = int(np.sum(np.asarray(run.timesteps) >= _cutoff(run, denoising_end)))
    if n == 0:
        raise GenerationError(f"denoising_end {denoising_end} leaves no {scheduler} step of this schedule; raise it or the steps")
    return n


def start_at(run, denoising_start: float, scheduler: str):
    """The run from denoising_start on, as diffusers' SDXL img2img get_timesteps(denoising_start=...) slices it:
    the timesteps below the cutoff (one more for a second-order scheduler whose count is even, so a step is
    never cut between its two evaluations), with a fresh multistep history (diffusers' set_begin_index)."""
    num = int(np.sum(np.asarray(run.all_timesteps) < _cutoff(run, denoising_start)))
    if run.order == 2 and num % 2 == 0:
        num += 1
    if num == 0:
        raise GenerationError(f"denoising_start {denoising_start} leaves no {scheduler} step of this schedule; lower it or raise the steps")
    begin = len(run.all_timesteps) - num
    # with_strength is the one way a run starts late; it keeps int(n * strength) steps of n, so ask for n - k.
    n, k = run.num_inference_steps, begin // run.order
    started = run.with_strength(min(1.0, (n - k + 0.5) / n)) if begin else run
    if started.begin_index != begin:
        raise GenerationError(f"{scheduler} cannot start at denoising_start {denoising_start} (its steps do not split there); use euler, ddim or dpmpp-2m")
    return started
