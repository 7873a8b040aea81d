"""LCM-distilled UNets end to end (issue 18): a tiny random LatentConsistencyModelPipeline folder, saved by
diffusers, exported to ONNX and sampled with `--scheduler lcm --steps 4 --guidance 8`, equals diffusers'
pipeline from the same latents, with LCM's per-step noise taken from the same numpy generator on both sides
(diffusers' noise source patched in the test, not ours).

The guidance path is checked to matter: an LCM takes guidance only as its w-embedding (timestep_cond), so
the oracle itself must tell guidance 8 from 3 by far more than the parity margin, or the test proves nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fewstep_support import image_uint8, patch_numpy_noise, unit_latents
from test_runtime_fixtures import psnr

from ldm_rt.runtime.pipeline import Pipeline
from ldm_rt.runtime.schedulers.lcm import guidance_embedding

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SIZE, STEPS, SEED, GUIDANCE = 16, 4, 5, 8.0
COND_DIM = 32  # time_cond_proj_dim (real LCMs: 256)
PROMPT = "a photo of a red car"
PARITY_DB, SENSITIVE_DB = 50.0, 40.0


def make_tiny_lcm(path, base) -> object:
    """A tiny SD v1 folder whose UNet has a w-embedding input, written by LatentConsistencyModelPipeline; its VAE, text
    encoder and tokenizer are those of `base` (a tiny SD v1 folder)."""
    from tiny_models import _diffusers_unet_config, _randomise, _strengthen_unet

    sd = diffusers.StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    # 8 groups: with 32 (one channel per group at the first level) GroupNorm erases the time embedding's
    # per-channel shift, and with it the guidance; eps x 4: the UNet output must move the image, since LCM
    # re-noises at every step. Measured: guidance 8 vs 3 is 32 dB on diffusers' side (42 dB without these).
    unet = diffusers.UNet2DConditionModel(**{**_diffusers_unet_config("v1"), "norm_num_groups": 8}, time_cond_proj_dim=COND_DIM)
    _randomise(unet, torch.Generator().manual_seed(7))
    _strengthen_unet(unet)
    with torch.no_grad():
        unet.conv_out.weight.mul_(4.0)
        unet.conv_out.bias.mul_(4.0)
    lcm = diffusers.LatentConsistencyModelPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet,
        scheduler=diffusers.LCMScheduler.from_config(sd.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    lcm.save_pretrained(path / "lcm", safe_serialization=True)
    return path / "lcm"


_LCM: dict[str, tuple[Path, Path]] = {}


def tiny_lcm_export(tmp_path_factory, tiny_sd_v1) -> tuple[Path, Path]:
    """(the tiny LCM folder, its artifacts for one image of SIZE x SIZE), made once per session (test_native_fewstep.py
    samples the same): the cheapest export that samples it (one static shape, no ONNX Runtime attention variant)."""
    from ldm_rt.export.build import BuildOptions, build
    from ldm_rt.runtime.contracts import ShapeProfile

    key = str(tmp_path_factory.getbasetemp())
    if key not in _LCM:
        root = tmp_path_factory.mktemp("tiny_lcm")
        folder = make_tiny_lcm(root, tiny_sd_v1)
        options = BuildOptions(model=folder, out=root / "artifacts", profile=ShapeProfile.static(1, SIZE, SIZE), onnx_only=True, ort_variant=False, progress=False)
        build(options)
        _LCM[key] = (folder, options.out)
    return _LCM[key]


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory, tiny_sd_v1):
    return tiny_lcm_export(tmp_path_factory, tiny_sd_v1)[0]


@pytest.fixture(scope="module")
def lcm_artifacts(tmp_path_factory, tiny_sd_v1):
    return tiny_lcm_export(tmp_path_factory, tiny_sd_v1)[1]


@pytest.fixture(scope="module")
def oracle(lcm_folder):
    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents() -> np.ndarray:
    return unit_latents(SEED, SIZE)


def diffusers_image(pipe, monkeypatch, guidance: float, seed: int, steps: int = STEPS) -> np.ndarray:
    """diffusers' LCM image from latents(), its step noise drawn from default_rng(seed) as ours is."""
    patch_numpy_noise(monkeypatch, "diffusers.schedulers.scheduling_lcm", np.random.default_rng(seed))
    with torch.no_grad():
        images = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents()),
                      height=SIZE, width=SIZE, output_type="np").images
    return image_uint8(images)


def test_guidance_embedding_is_diffusers_get_guidance_scale_embedding(oracle):
    for g, dim in ((8.0, 256), (1.5, 32), (3.0, 33)):
        theirs = oracle.get_guidance_scale_embedding(torch.tensor([g - 1.0, g - 1.0]), embedding_dim=dim).numpy()
        ours = guidance_embedding(g, dim, 2)
        assert ours.shape == (2, dim) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=2e-3)  # sin of ~7000 rad: an ulp of the argument, 5e-4


def test_the_exported_unet_takes_the_w_embedding_and_no_unconditional_batch(lcm_artifacts):
    pipe = Pipeline.load(lcm_artifacts)
    assert pipe.facts.time_cond_proj_dim == COND_DIM
    spec = {t.name: t.shape for t in pipe.components["unet"].contract.inputs}
    assert spec["timestep_cond"] == ("unet_batch", COND_DIM)
    seen = []
    unet = pipe.components["unet"]
    run = unet.run

    class Spy:
        contract = unet.contract

        def run(self, feeds):
            seen.append({k: v.shape for k, v in feeds.items()})
            return run(feeds)

    pipe.components = {**pipe.components, "unet": Spy()}
    pipe.generate(PROMPT, steps=STEPS, guidance=GUIDANCE, scheduler="lcm", seed=SEED, height=SIZE, width=SIZE)
    assert len(seen) == STEPS and all(s["sample"][0] == 1 and s["timestep_cond"] == (1, COND_DIM) for s in seen)


def test_lcm_folder_exported_and_sampled_equals_diffusers_lcm_pipeline(lcm_artifacts, oracle, monkeypatch):
    theirs = diffusers_image(oracle, monkeypatch, GUIDANCE, seed=SEED)
    pipe = Pipeline.load(lcm_artifacts)
    kw = dict(steps=STEPS, scheduler="lcm", seed=SEED, height=SIZE, width=SIZE, latents=latents())
    ours = pipe.generate(PROMPT, guidance=GUIDANCE, **kw).images
    assert psnr(ours, theirs) >= PARITY_DB
    # The oracle tells guidance 8 from 3 (the w path is strong enough for this test to mean something) ...
    assert psnr(diffusers_image(oracle, monkeypatch, 3.0, seed=SEED), theirs) < SENSITIVE_DB
    # ... and so do we; the per-step noise and the prompt matter too.
    assert psnr(pipe.generate(PROMPT, guidance=3.0, **kw).images, theirs) < SENSITIVE_DB
    assert psnr(pipe.generate(PROMPT, guidance=GUIDANCE, **{**kw, "seed": SEED + 1}).images, theirs) < SENSITIVE_DB
    assert psnr(pipe.generate("a painting of a blue house", guidance=GUIDANCE, **kw).images, theirs) < SENSITIVE_DB


def test_the_cli_samples_an_lcm_with_four_steps_as_diffusers_does(lcm_artifacts, oracle, monkeypatch, tmp_path):
    from PIL import Image

    from ldm_rt.runtime.cli import main

    theirs = diffusers_image(oracle, monkeypatch, GUIDANCE, seed=SEED)
    np.save(tmp_path / "latents.npy", latents())
    out = tmp_path / "lcm.png"
    argv = ["sample", "--model", str(lcm_artifacts), "--prompt", PROMPT, "--scheduler", "lcm", "--steps", str(STEPS),
            "--guidance", str(GUIDANCE), "--seed", str(SEED), "--latents", str(tmp_path / "latents.npy"),
            "--height", str(SIZE), "--width", str(SIZE), "--out", str(out)]
    assert main(argv) == 0
    assert psnr(np.asarray(Image.open(out).convert("RGB"))[None], theirs) >= PARITY_DB


def test_the_torch_reference_of_the_lcm_folder_matches_the_export(lcm_folder, lcm_artifacts):
    from ldm_rt.reference.torch_backend import torch_pipeline

    kw = dict(steps=STEPS, guidance=GUIDANCE, scheduler="lcm", seed=SEED, height=SIZE, width=SIZE)
    ref = torch_pipeline(lcm_folder).generate(PROMPT, **kw).images
    assert psnr(Pipeline.load(lcm_artifacts).generate(PROMPT, **kw).images, ref) >= PARITY_DB


def test_an_lcm_refuses_more_steps_than_its_distillation_schedule(lcm_artifacts):
    from ldm_rt.runtime.schedulers import SchedulerConfigError

    with pytest.raises(SchedulerConfigError, match="at most 50 steps"):
        Pipeline.load(lcm_artifacts).generate(PROMPT, steps=51, scheduler="lcm", seed=0, height=SIZE, width=SIZE)


def test_a_negative_prompt_is_named_as_unused(lcm_artifacts, caplog):
    pipe = Pipeline.load(lcm_artifacts)
    kw = dict(steps=2, scheduler="lcm", seed=0, height=SIZE, width=SIZE)
    with caplog.at_level("WARNING", logger="ldm_rt"):
        plain = pipe.generate(PROMPT, **kw).images
        negative = pipe.generate(PROMPT, negative_prompt="blurry", **kw).images
    assert "negative prompt is not used" in caplog.text and np.array_equal(plain, negative)


def test_lcm_img2img_equals_diffusers_lcm_img2img_pipeline(lcm_folder, lcm_artifacts, monkeypatch):
    """LatentConsistencyModelImg2ImgPipeline: the schedule rebuilt for the strength, the image's latents noised to its
    first timestep. One numpy generator on each side draws that noise first, then LCM's step noise; diffusers'
    VAE posterior sample is pinned to its mean (ours encodes to the mean)."""
    from PIL import Image

    module = "diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_img2img"
    pipe = diffusers.LatentConsistencyModelImg2ImgPipeline.from_pretrained(lcm_folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(f"{module}.retrieve_latents", lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())
    image = np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)

    def theirs(strength: float) -> np.ndarray:
        rng = np.random.default_rng(SEED)
        patch_numpy_noise(monkeypatch, module, rng)  # the init noise
        patch_numpy_noise(monkeypatch, "diffusers.schedulers.scheduling_lcm", rng)  # then the step noise
        with torch.no_grad():
            out = pipe(PROMPT, image=Image.fromarray(image), num_inference_steps=STEPS, strength=strength, guidance_scale=GUIDANCE,
                       output_type="np").images  # fmt: skip
        return image_uint8(out)

    ours = Pipeline.load(lcm_artifacts)
    kw = dict(init_image=image, steps=STEPS, guidance=GUIDANCE, scheduler="lcm", seed=SEED)
    for strength in (0.5, 0.8):
        result = ours.generate(PROMPT, strength=strength, **kw)
        assert result.params["mode"] == "img2img" and len(result.timings["unet"]) == STEPS  # the strength is in the schedule
        assert psnr(result.images, theirs(strength)) >= PARITY_DB, strength
    # The init image matters (else this is txt2img in disguise).
    other = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    assert psnr(ours.generate(PROMPT, strength=0.5, **{**kw, "init_image": other}).images, theirs(0.5)) < SENSITIVE_DB
