"""The torch reference (the runtime's one sampling loop over the PyTorch networks, torch_backend.torch_pipeline)
against diffusers' Stable Diffusion pipelines, the independent oracle, on the same tiny random models: same
latents, same scheduler config, guidance 7.5 with a negative prompt. Our 8-bit images must be within TOL of
diffusers' float images (FLOAT_TOL plus half an 8-bit level of rounding). Every parity case is shown to be
sensitive: changing the prompt, guidance, scheduler or step count moves the image by more than MOVED."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_ldm_rt_model, tiny_sd_inpaint, tiny_sd_v1, tiny_sd_v2  # noqa: F401  (session fixtures)

from ldm_rt.reference.configs import AutoencoderConfig, LDMConfig, UNetConfig
from ldm_rt.reference.ldm import LatentDiffusion
from ldm_rt.reference.model_folder import LoadedModel
from ldm_rt.reference.torch_backend import torch_pipeline
from ldm_rt.runtime.params import GenerationError

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.stable_diffusion import (  # noqa: E402
    pipeline_stable_diffusion_img2img as img2img_module,
    pipeline_stable_diffusion_inpaint as inpaint_module,
)

FLOAT_TOL = 1e-3  # max |ours - diffusers| of the float images in [0, 1], before our rounding to 8 bits
TOL = FLOAT_TOL + 0.5 / 255  # ours is 8-bit: rounding adds up to half a level
MOVED = 10 * TOL  # what a wrong prompt, guidance, scheduler, step count or seed must exceed (measured >= 0.1)
STEPS = 6
SIZE = 32  # pixels; latents 16 x 16
PROMPTS = ["a photo of a cat", "a red car on a mountain"]
NEGATIVES = ["blurry", "ugly low quality"]
DIFFUSERS_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpmpp-2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "ddpm": "DDPMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "euler-karras": "EulerDiscreteScheduler",
    "dpmpp-2m-sde": "DPMSolverMultistepScheduler",
}
# What our name sets over the model's scheduler config, given to diffusers' from_config the same way.
DIFFUSERS_OVERRIDES = {"euler-karras": {"use_karras_sigmas": True}, "dpmpp-2m-sde": {"algorithm_type": "sde-dpmsolver++"}}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


class Pair:
    """The same folder loaded by diffusers and by ldm-rt."""

    def __init__(self, folder, pipeline_class="StableDiffusionPipeline"):
        cls = getattr(diffusers, pipeline_class)
        self.pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.ref = torch_pipeline(folder)

    def diffusers(self, scheduler="ddim", pipeline=None, **kwargs) -> np.ndarray:
        pipe = pipeline or self.pipe
        config = {**self.scheduler_config, **DIFFUSERS_OVERRIDES.get(scheduler, {})}
        pipe.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler]).from_config(config)
        return pipe(output_type="np", **kwargs).images  # (B, H, W, 3) float in [0, 1]

    def ours(self, **kwargs) -> np.ndarray:
        """Our 8-bit images as floats in [0, 1], comparable with diffusers' within TOL."""
        return self.ref.generate(**kwargs).images.astype(np.float64) / 255


@pytest.fixture(scope="module")
def v1(tiny_sd_v1):
    return Pair(tiny_sd_v1)


@pytest.fixture(scope="module")
def v2(tiny_sd_v2):
    return Pair(tiny_sd_v2)


def noise(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def txt2img_args(latents, **over):
    ours = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, steps=STEPS, guidance=7.5, latents=latents, height=SIZE, width=SIZE)
    ours.update(over)
    theirs = dict(
        prompt=ours["prompt"], negative_prompt=ours["negative_prompt"], num_inference_steps=ours["steps"],
        guidance_scale=ours["guidance"], latents=torch.from_numpy(latents), height=SIZE, width=SIZE,
    )
    return ours, theirs


# Schedulers whose parity case is also run with their closest relative (same sigmas, same order), which must
# miss diffusers' image by more than NEAREST_MOVED: measured unipc vs dpmpp-2m 0.039 (v1) and 0.024 (v2), under
# MOVED at 6 steps but 8x TOL; heun vs euler 0.29 and 0.18.
NEAREST = {"unipc": "dpmpp-2m", "heun": "euler", "euler-karras": "euler"}
NEAREST_MOVED = 4 * TOL


@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp-2m", "pndm", "unipc", "heun", "euler-karras"])
def test_txt2img_matches_diffusers(variant, scheduler, request):
    pair = request.getfixturevalue(variant)  # v2: v-prediction, linear projections, "!" padding
    latents = noise((2, 4, SIZE // 2, SIZE // 2))
    ours, theirs = txt2img_args(latents, scheduler=scheduler)
    expected = pair.diffusers(scheduler, **theirs)
    got = pair.ours(**ours)
    assert got.shape == expected.shape == (2, SIZE, SIZE, 3)
    assert max_diff(got, expected) < TOL
    if scheduler in NEAREST:  # the parity would catch the closest scheduler standing in for this one
        assert max_diff(pair.ours(**{**ours, "scheduler": NEAREST[scheduler]}), expected) > NEAREST_MOVED


def test_batch_per_prompt_and_guidance_one(v1):
    """num_images_per_prompt layout, and guidance 1.0 (diffusers skips the unconditional pass too)."""
    latents = noise((4, 4, 16, 16), seed=1)
    rows = []
    hook = v1.ref.components["unet"].module.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        got = v1.ours(prompt=PROMPTS, steps=3, guidance=1.0, batch=2, latents=latents, scheduler="euler")
    finally:
        hook.remove()
    assert rows == [4, 4, 4]  # no unconditional rows
    expected = v1.diffusers("euler", prompt=PROMPTS, num_inference_steps=3, guidance_scale=1.0, num_images_per_prompt=2,
                            latents=torch.from_numpy(latents), height=SIZE, width=SIZE)
    assert max_diff(got, expected) < TOL


@pytest.mark.parametrize("scheduler", ["euler-a", "ddpm", "dpmpp-2m-sde"])
def test_stochastic_schedulers_draw_the_documented_noise(v1, scheduler, monkeypatch):
    """One numpy Generator: the initial latents first, then each step's noise. diffusers gets the same
    draws through its randn_tensor, so the two trajectories coincide."""
    seed = 7
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((1, 4, 16, 16), dtype=np.float32)
    module = {
        "euler-a": diffusers.schedulers.scheduling_euler_ancestral_discrete,
        "ddpm": diffusers.schedulers.scheduling_ddpm,
        "dpmpp-2m-sde": diffusers.schedulers.scheduling_dpmsolver_multistep,  # draws on the last step too, after ours
    }[scheduler]
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)))
    expected = v1.diffusers(scheduler, prompt=PROMPTS[0], negative_prompt=NEGATIVES[0], num_inference_steps=STEPS,
                            guidance_scale=7.5, latents=torch.from_numpy(latents), height=SIZE, width=SIZE)
    got = v1.ours(prompt=PROMPTS[0], negative_prompt=NEGATIVES[0], steps=STEPS, guidance=7.5, scheduler=scheduler, seed=seed)
    assert max_diff(got, expected) < TOL
    other = v1.ours(prompt=PROMPTS[0], negative_prompt=NEGATIVES[0], steps=STEPS, guidance=7.5, scheduler=scheduler, seed=seed + 1)
    assert max_diff(got, other) > MOVED


def test_sensitivity(v1):
    """The parity tolerance is far below what a wrong prompt, guidance, scheduler or step count gives."""
    latents = noise((1, 4, 16, 16))
    ours, theirs = txt2img_args(latents, scheduler="ddim", prompt=PROMPTS[:1], negative_prompt=NEGATIVES[:1])
    expected = v1.diffusers("ddim", **theirs)
    assert max_diff(v1.ours(**ours), expected) < TOL
    changes = {
        "prompt": dict(prompt=["a photo of a dog"]),
        "negative prompt": dict(negative_prompt=[""]),
        "guidance": dict(guidance=6.0),
        "scheduler": dict(scheduler="dpmpp-2m"),
        "steps": dict(steps=STEPS + 1),
    }
    for what, change in changes.items():
        assert max_diff(v1.ours(**{**ours, **change}), expected) > MOVED, what


def test_same_seed_same_image_and_draw_order(v1):
    args = dict(prompt=PROMPTS[0], steps=3, scheduler="ddim", height=SIZE, width=SIZE)
    a = v1.ref.generate(seed=11, **args)
    b = v1.ref.generate(seed=11, **args)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.images.dtype == np.uint8 and a.images.shape == (1, SIZE, SIZE, 3)
    # Without latents the first draw of default_rng(seed) is the initial noise, float32 standard normal.
    explicit = v1.ref.generate(latents=noise((1, 4, 16, 16), seed=11), seed=999, **args)
    np.testing.assert_array_equal(a.images, explicit.images)
    assert max_diff(a.images, v1.ref.generate(seed=12, **args).images) > 10
    # The runtime's defaults: no seed draws a fresh one and records it, so the image can be made again.
    fresh = v1.ref.generate(**args)
    np.testing.assert_array_equal(v1.ref.generate(seed=fresh.params["seed"], **args).images, fresh.images)


def test_img2img_matches_diffusers(v1, monkeypatch):
    """diffusers samples the VAE posterior and draws its own noise; pin both (posterior mean, our noise)."""
    seed, strength = 5, 0.6
    image = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(img2img_module, "randn_tensor", lambda shape, **kw: torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)))
    monkeypatch.setattr(img2img_module, "retrieve_latents", lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**v1.pipe.components)
    img2img.set_progress_bar_config(disable=True)
    for scheduler in ("ddim", "euler"):
        rng = np.random.default_rng(seed)
        expected = v1.diffusers(scheduler, pipeline=img2img, prompt=PROMPTS[1], negative_prompt=NEGATIVES[1], image=Image.fromarray(image),
                                strength=strength, num_inference_steps=10, guidance_scale=7.5)
        got = v1.ref.generate(prompt=PROMPTS[1], negative_prompt=NEGATIVES[1], init_image=image, strength=strength, steps=10,
                              scheduler=scheduler, seed=seed)
        assert got.params["mode"] == "img2img" and len(got.timings["unet"]) == 6  # int(10 * 0.6) steps kept
        assert max_diff(got.images / 255, expected) < TOL, scheduler
    assert max_diff(v1.ours(prompt=PROMPTS[1], negative_prompt=NEGATIVES[1], init_image=image, strength=0.8, steps=10, scheduler="euler", seed=seed), expected) > MOVED


def inpaint_inputs():
    image = np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 4:20] = 255  # 1 = repaint
    return image, mask


@pytest.mark.parametrize("unet", ["inpainting", "plain"])
def test_inpainting_matches_diffusers(unet, request, monkeypatch):
    """An inpainting UNet (4 + 1 + 4 input channels) and the latent-blend method with a plain UNet."""
    monkeypatch.setattr(inpaint_module, "retrieve_latents", lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
    if unet == "inpainting":
        pair = Pair(request.getfixturevalue("tiny_sd_inpaint"), "StableDiffusionInpaintPipeline")
        pipe = pair.pipe
    else:
        pair = request.getfixturevalue("v1")
        pipe = diffusers.StableDiffusionInpaintPipeline(**pair.pipe.components)
        pipe.set_progress_bar_config(disable=True)
    image, mask = inpaint_inputs()
    latents = noise((1, 4, 16, 16), seed=8)
    expected = pair.diffusers("ddim", pipeline=pipe, prompt=PROMPTS[0], negative_prompt=NEGATIVES[0], image=Image.fromarray(image),
                              mask_image=Image.fromarray(mask), latents=torch.from_numpy(latents), num_inference_steps=STEPS,
                              guidance_scale=7.5, strength=1.0, height=SIZE, width=SIZE)
    got = pair.ref.generate(prompt=PROMPTS[0], negative_prompt=NEGATIVES[0], init_image=image, mask=mask, latents=latents,
                            steps=STEPS, scheduler="ddim", mask_blur=None)  # None: no paste-back, as diffusers
    assert got.params["mode"] == "inpaint"
    assert max_diff(got.images / 255, expected) < TOL
    other = pair.ours(prompt=PROMPTS[1], negative_prompt=NEGATIVES[0], init_image=image, mask=mask, latents=latents, steps=STEPS)
    assert max_diff(other, expected) > MOVED
    if unet == "plain":
        # Outside the mask the latents are the clean image latents after the last step.
        known = pair.ref._encode_image((image.astype(np.float32) / 255 * 2 - 1).transpose(2, 0, 1)[None], {})
        keep = mask[::2, ::2] < 128
        np.testing.assert_allclose(got.latents[0][:, keep], known[0][:, keep], atol=1e-6)


def test_ldm_rt_model_and_long_prompt(tiny_ldm_rt_model, caplog):
    ref = torch_pipeline(tiny_ldm_rt_model)
    with caplog.at_level(logging.WARNING):
        out = ref.generate(" ".join(["red"] * 40), steps=2, scheduler="euler-a")
    assert out.images.shape == (1, 32, 32, 3)  # default size: the autoencoder's nominal resolution
    assert any("truncated" in r.getMessage() for r in caplog.records)


def test_unconditional_and_class_conditional_models():
    unet = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), context_dim=None)
    ae = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
    plain = torch_pipeline(LoadedModel(LatentDiffusion(LDMConfig(UNetConfig(**unet), ae, None, conditioning="none")), None, {}))
    assert plain.generate(steps=2).images.shape == (1, 16, 16, 3)
    with pytest.raises(GenerationError, match="no text encoder and takes no prompt"):
        plain.generate("a cat", steps=2)
    labelled = torch_pipeline(LoadedModel(LatentDiffusion(LDMConfig(UNetConfig(**unet, num_classes=3), ae, None, conditioning="class")), None, {}))
    out = labelled.generate(class_labels=[0, 2], batch=2, steps=2)
    assert out.images.shape == (4, 16, 16, 3)
    with pytest.raises(GenerationError, match=r"class_labels must be ints in \[0, 3\)"):
        labelled.generate(class_labels=[3], steps=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [  # the runtime's checks (tests/test_runtime_pipeline.py has them all) against the reference's wide profile
        (dict(height=30), r"height 30 must be a multiple of 4 in \[4, 4096\]"),
        (dict(batch=65), r"65 images per call .* outside the artifacts' batch range \[1, 64\]"),
        (dict(latents=np.zeros((1, 4, 8, 8), np.float32)), r"latents have shape \(1, 4, 8, 8\), expected \(1, 4, 16, 16\)"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(v1, kwargs, message):
    args = dict(prompt="a cat", steps=2, height=SIZE, width=SIZE)
    args.update(kwargs)
    with pytest.raises(GenerationError, match=message) as e:
        v1.ref.generate(**args)
    assert "\n" not in str(e.value)
