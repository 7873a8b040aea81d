"""SDXL ControlNet end to end (issue 19): a tiny SDXL base (tests/tiny_models.py) and a tiny ControlNet made from its
UNet (diffusers' ControlNetModel.from_unet, every weight redrawn, E(c) strengthened) -> one export -> Pipeline.generate
equals diffusers' StableDiffusionXLControlNetPipeline from the same folders and latents at PSNR >= 50 dB, at scales
1.0 and 0.0 and in guess mode; the ControlNet takes the pooled text embeds and time ids as the SDXL UNet does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_runtime_fixtures import psnr

from ldm_rt.export.build import BuildOptions, build
from ldm_rt.runtime.contracts import ShapeProfile
from ldm_rt.runtime.manifest import Manifest
from ldm_rt.runtime.pipeline import Pipeline
from tiny_models import HINT_GAIN, TINY_HINT_BLOCK_CHANNELS, _randomise, _strengthen_unet

diffusers = pytest.importorskip("diffusers")

SIZE = 32
PROMPT = "a red circle on the left"
STEPS = 4
GUIDANCE = 5.0
BAR_DB = 50.0
SENSITIVE_DB = 30.0  # scale 1.0 vs 0.0 measured 14 dB




pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def controlnet_xl(tiny_sdxl_base, tmp_path_factory) -> Path:
    unet = diffusers.UNet2DConditionModel.from_pretrained(Path(tiny_sdxl_base) / "unet")
    controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_HINT_BLOCK_CHANNELS)
    _randomise(controlnet, torch.Generator().manual_seed(1000))
    _strengthen_unet(controlnet)
    with torch.no_grad():
        controlnet.controlnet_cond_embedding.conv_out.weight.mul_(HINT_GAIN)
    folder = tmp_path_factory.mktemp("controlnet_xl") / "controlnet"
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def artifacts(tiny_sdxl_base, controlnet_xl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("controlnet_xl_artifacts") / "artifacts"
    build(BuildOptions(
        model=tiny_sdxl_base, out=out, profile=ShapeProfile.static(1, SIZE, SIZE), onnx_only=True, ort_variant=False,
        progress=False, controlnets=(controlnet_xl,),
    ))  # fmt: skip
    return out


def test_sdxl_controlnet_matches_diffusers(tiny_sdxl_base, controlnet_xl, artifacts):
    inputs = [t.name for t in Manifest.read(artifacts).components["controlnet_0"].contract.inputs]
    assert inputs[-2:] == ["text_embeds", "time_ids"]
    pipe = Pipeline.load(artifacts)
    oracle = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_sdxl_base, controlnet=diffusers.ControlNetModel.from_pretrained(controlnet_xl)
    )
    oracle.scheduler = diffusers.DDIMScheduler.from_config(oracle.scheduler.config)
    oracle.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    noise = np.random.default_rng(1).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)
    got = {}
    for name, kwargs in {"1.0": {}, "0.0": {"controlnet_conditioning_scale": 0.0}, "guess": {"guess_mode": True}}.items():
        got[name] = pipe.generate(
            PROMPT, steps=STEPS, guidance=GUIDANCE, scheduler="ddim", seed=0, latents=noise, control_image=image, **kwargs
        ).images[0]
        theirs = oracle(
            PROMPT, image=Image.fromarray(image), num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
            latents=torch.from_numpy(noise), output_type="np", **kwargs,
        ).images[0]  # fmt: skip
        assert psnr(got[name], (theirs * 255).round().astype(np.uint8)) >= BAR_DB, name
    assert psnr(got["1.0"], got["0.0"]) < SENSITIVE_DB and psnr(got["1.0"], got["guess"]) < SENSITIVE_DB
