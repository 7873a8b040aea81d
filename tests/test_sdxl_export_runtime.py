"""SDXL end to end (issue 16): small SDXL base and refiner folders (diffusers layout, tests/sdxl_small_models.py:
the tiny models' encoders and VAE with a two-level UNet, about half the export time of the tiny models' UNets)
-> `build_engines.py --onnx-only` -> `Pipeline.generate` / `ldm-rt sample` equal diffusers from the same folders,
latents and scheduler config, at PSNR >= 50 dB on the 8-bit image: StableDiffusionXLPipeline (euler, dpmpp-2m,
ddim; negative prompts, the empty one zeroed, micro-conditioning, two images per prompt, guidance rescale), the
base -> refiner hand-off (StableDiffusionXLImg2ImgPipeline with denoising_start; Euler ancestral with the step noise
from one numpy generator on both sides), img2img (StableDiffusionXLImg2ImgPipeline, the refiner's aesthetic scores
included) and inpainting (StableDiffusionXLInpaintPipeline); an SDXL-Turbo folder at 1 and 4 steps, guidance 0, with
its own scheduler; the torch reference pipeline on the same folders. The oracle tells wrong time ids, a wrongly encoded empty
negative prompt, another aesthetic score, an unused noise draw and Turbo's spacing from right ones. Without
--scheduler the models sample with their folders' own (euler; Turbo's euler-a); a prompt both tokenizers truncate
is one warning; bad input (requests, and sources at the export CLI) is one line, exit 2, nothing written. The
exports are the session's (small_sdxl_base / small_sdxl_refiner fixtures, shared with the other SDXL test files)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sdxl_small_models import PROFILE_FLAGS, SIZE, make_small_sdxl
from test_runtime_fixtures import one_line_error, psnr, run_cli, to_u8

from ldm_rt.runtime import cli
from ldm_rt.runtime.contracts import ModelFacts, ShapeProfile, build_contracts
from ldm_rt.runtime.manifest import Manifest
from ldm_rt.runtime.params import GenerationError, make_micro_conditioning
from ldm_rt.runtime.pipeline import Pipeline, start_at, steps_before
from ldm_rt.runtime.schedulers import SchedulerConfig, make_scheduler

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on the left"
STEPS = 4
GUIDANCE = 5.0
BAR_DB = 50.0
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "dpmpp-2m": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}






def noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)






@pytest.fixture(scope="module")
def sdxl_base(small_sdxl_base) -> Path:
    return small_sdxl_base[0]


@pytest.fixture(scope="module")
def sdxl_refiner(small_sdxl_refiner) -> Path:
    return small_sdxl_refiner[0]


@pytest.fixture(scope="module")
def artifacts(small_sdxl_base, small_sdxl_refiner) -> dict[str, Path]:
    """The base through the export CLI (ONNX, fp32 parity per component), the refiner through the build API
    without the ONNX Runtime attention variant (time), both at one size; shared by the session's SDXL tests."""
    (_, base, stdout), (_, refiner, _) = small_sdxl_base, small_sdxl_refiner
    assert "text_encoder_2" in stdout  # its parity row
    return {"base": base, "refiner": refiner}


@pytest.fixture(scope="module")
def pipes(artifacts) -> dict[str, Pipeline]:
    return {name: Pipeline.load(path) for name, path in artifacts.items()}


@pytest.fixture(scope="module")
def oracle(sdxl_base, sdxl_refiner):
    """diffusers' own pipelines from the same folders (the independent implementation)."""
    import diffusers

    base = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_base))
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(sdxl_refiner))
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return {"base": base, "refiner": refiner}


def with_scheduler(pipe, name: str):
    import diffusers

    classes = {**SCHEDULERS, "euler-a": "EulerAncestralDiscreteScheduler"}
    pipe.scheduler = getattr(diffusers, classes[name]).from_config(pipe.scheduler.config)
    return pipe


# ---- contracts and manifest ----------------------------------------------------------------------------------
def test_manifest_states_both_encoders_the_added_inputs_and_the_second_tokenizer(artifacts):
    base, refiner = (Manifest.read(artifacts[n]) for n in ("base", "refiner"))
    assert list(base.components) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    assert list(refiner.components) == ["text_encoder_2", "unet", "vae_decoder", "vae_encoder"]  # a refiner: the second only
    te2 = base.components["text_encoder_2"].contract
    assert [(t.name, t.shape) for t in te2.outputs] == [
        ("last_hidden_state", ("text_batch", 77, 48)), ("text_embeds", ("text_batch", 16))]  # fmt: skip
    assert base.components["text_encoder"].contract.outputs[0].shape == ("text_batch", 77, 32)
    unet = {t.name: t.shape for t in base.components["unet"].contract.inputs}
    assert unet["encoder_hidden_states"] == ("unet_batch", 77, 80) and unet["text_embeds"] == ("unet_batch", 16)
    assert unet["time_ids"] == ("unet_batch", 6)
    assert {t.name: t.shape for t in refiner.components["unet"].contract.inputs}["time_ids"] == ("unet_batch", 5)
    assert base.tokenizer_2.file == "tokenizer_2.json" and refiner.tokenizer is None and refiner.tokenizer_2 is not None
    assert base.facts.force_zeros_for_empty_prompt and not refiner.facts.force_zeros_for_empty_prompt
    assert base.default_scheduler == refiner.default_scheduler == "euler"  # their folders' EulerDiscreteScheduler
    assert cli.describe_default_scheduler(base) == "default scheduler: euler"  # what `ldm-rt info` says
    for m in (base, refiner):  # every component (both outputs of text_encoder_2 included) passed its parity check
        assert all(e.precisions["fp32"].parity["passed"] for e in m.components.values())
    # The second tokenizer pads with its own token ("!", id 0 here), not the first's <|endoftext|>.
    pipe = Pipeline.load(artifacts["base"])
    assert pipe.tokenizer_2.pad_id != pipe.tokenizer.pad_id


def test_triton_repository_and_tensorrt_profiles_follow_the_contracts(artifacts, tmp_path):
    from ldm_rt.export.tensorrt_build import engine_profile
    from ldm_rt.export.triton_repo import write_triton_repo

    names = write_triton_repo(artifacts["base"], tmp_path / "triton")
    assert "text_encoder_2" in names
    config = (tmp_path / "triton" / "text_encoder_2" / "config.pbtxt").read_text()
    assert 'name: "last_hidden_state"' in config and 'name: "text_embeds"' in config
    unet = Manifest.read(artifacts["base"]).components["unet"].contract
    assert 'name: "time_ids"' in (tmp_path / "triton" / "unet" / "config.pbtxt").read_text()
    assert engine_profile(unet)["time_ids"] == [[1, 6], [2, 6], [4, 6]]  # batch 1:1:2, doubled under guidance
    assert engine_profile(unet)["text_embeds"] == [[1, 16], [2, 16], [4, 16]]


def test_sdxl_sized_profiles_follow_from_the_facts():
    facts = ModelFacts(4, 8, 4, 4, 4, 77, 2048, 49408, None, "kl", 0.13025, text_encoder_2_dim=1280, pooled_dim=1280, time_ids=6)
    contracts = build_contracts(facts, ShapeProfile((1, 1, 4), (768, 1024, 1024), (768, 1024, 1024)))
    assert contracts["unet"].shapes_at("opt") == {
        "sample": (2, 4, 128, 128), "timestep": (2,), "encoder_hidden_states": (2, 77, 2048), "text_embeds": (2, 1280),
        "time_ids": (2, 6)}  # fmt: skip
    assert contracts["text_encoder"].shapes_at("max") == {"input_ids": (8, 77)}
    with pytest.raises(ValueError, match="text_encoder_2_dim"):  # widths that do not add up
        ModelFacts(4, 8, 4, 4, 4, 77, 1000, 49408, None, "kl", 0.13, text_encoder_2_dim=1280, pooled_dim=1280, time_ids=6)


# ---- parity with diffusers --------------------------------------------------------------------------------------
# (scheduler, our request, diffusers' request): with and without a negative prompt, the empty one zeroed
# (force_zeros_for_empty_prompt: diffusers' negative_prompt=None), and non-default micro-conditioning.
MICRO = {"original_size": (48, 40), "crops_coords_top_left": (8, 4), "target_size": (24, 32),
         "negative_original_size": (16, 24), "negative_crops_coords_top_left": (0, 8), "negative_target_size": (32, 16)}  # fmt: skip
CASES = {
    "euler": ({"negative_prompt": "blurry green"}, {"negative_prompt": "blurry green"}),
    "dpmpp-2m": ({"negative_prompt": ""}, {"negative_prompt": None}),
    "ddim": ({"negative_prompt": "blurry", **MICRO}, {"negative_prompt": "blurry", **MICRO}),
}


@pytest.mark.parametrize("scheduler", list(CASES))
def test_base_images_equal_diffusers(pipes, oracle, scheduler):
    ours_kw, theirs_kw = CASES[scheduler]
    ours = pipes["base"].generate(PROMPT, steps=STEPS, guidance=GUIDANCE, scheduler=scheduler, latents=noise(), seed=0, **ours_kw)
    theirs = with_scheduler(oracle["base"], scheduler)(
        PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(noise()), height=SIZE,
        width=SIZE, output_type="np", **theirs_kw,
    ).images
    assert psnr(ours.images, to_u8(theirs)) >= BAR_DB
    for key in MICRO:  # the micro-conditioning used is recorded with the image
        assert ours.params[key] == list(ours_kw.get(key, (0, 0) if "crops" in key else (SIZE, SIZE)))


def test_two_images_per_prompt_and_guidance_rescale_equal_diffusers(pipes, oracle):
    """batch 2: the pooled embeds and time ids repeat per image as the context does (diffusers' num_images_per_prompt);
    guidance_rescale as diffusers' (Lin et al. 2024, Sec. 3.4)."""
    latents = np.concatenate([noise(6), noise(7)])
    kw = dict(negative_prompt="blurry", steps=STEPS, guidance=GUIDANCE, scheduler="euler", batch=2, latents=latents, seed=0,
              original_size=(48, 40))  # fmt: skip
    ours = pipes["base"].generate(PROMPT, guidance_rescale=0.7, **kw)
    theirs = with_scheduler(oracle["base"], "euler")(
        PROMPT, negative_prompt="blurry", num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
        latents=torch.from_numpy(latents), height=SIZE, width=SIZE, output_type="np", original_size=(48, 40), guidance_rescale=0.7,
    ).images  # fmt: skip
    assert ours.images.shape == (2, SIZE, SIZE, 3)
    for k in range(2):
        assert psnr(ours.images[k], to_u8(theirs[k])) >= BAR_DB
    assert psnr(ours.images[0], ours.images[1]) < 40.0  # two noises, two images (measured 9 dB; parity 83 and 80 dB)
    plain = pipes["base"].generate(PROMPT, **kw)  # no rescale: measured 28 dB from diffusers' rescaled image
    assert psnr(plain.images[0], to_u8(theirs[0])) < 40.0


def test_the_oracle_tells_wrong_time_ids_and_an_encoded_empty_negative_apart(pipes, oracle):
    """Measured: one wrong time id (original_size), or the empty negative prompt encoded instead of zeroed,
    moves the image far below the bar against diffusers'; so the parity above proves both are right."""
    kw = dict(steps=STEPS, guidance=GUIDANCE, scheduler="euler", latents=noise(), seed=0)
    right = pipes["base"].generate(PROMPT, **kw)
    wrong_ids = pipes["base"].generate(PROMPT, original_size=(SIZE, 2 * SIZE), **kw)
    theirs = with_scheduler(oracle["base"], "euler")(
        PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, output_type="np",
        latents=torch.from_numpy(noise()), negative_prompt="",  # "" encoded, not zeroed
    ).images
    # Measured on this model: 31 dB (one wrong original_size; a wrong crop 31, target size 28, negative size 32).
    assert psnr(right.images, wrong_ids.images) < 40.0
    assert psnr(right.images, to_u8(theirs)) < 30.0  # measured 15 dB


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_refiner_hand_off_equals_diffusers_base_then_img2img(artifacts, pipes, oracle, scheduler, tmp_path):
    """`ldm-rt sample --model BASE --refiner REF --refiner-start 0.5` vs diffusers' recipe: the base with
    denoising_end and output_type="latent", then the refiner pipeline with denoising_start on those latents.
    euler through the CLI with no --scheduler (both folders' own EulerDiscreteScheduler), the others in Python."""
    if scheduler == "euler":
        np.save(tmp_path / "noise.npy", noise(1))
        out = tmp_path / "refined.png"
        code, stdout, err = run_cli(cli.main, [
            "sample", "--model", str(artifacts["base"]), "--refiner", str(artifacts["refiner"]), "--refiner-start", "0.5",
            "--prompt", PROMPT, "--negative-prompt", "blurry", "--steps", "4", "--guidance", str(GUIDANCE),
            "--latents", str(tmp_path / "noise.npy"), "--aesthetic-score", "7", "--seed", "3", "--out", str(out),
        ])  # fmt: skip
        assert code == 0, err
        with Image.open(out) as im:
            ours = np.asarray(im.convert("RGB"))
            params = json.loads(im.text["parameters"])
    else:
        result = pipes["base"].generate(
            PROMPT, negative_prompt="blurry", steps=4, guidance=GUIDANCE, scheduler=scheduler, latents=noise(1), aesthetic_score=7.0,
            seed=3, refiner=pipes["refiner"], refiner_start=0.5,
        )  # fmt: skip
        ours, params = result.images[0], result.params
    kw = dict(negative_prompt="blurry", num_inference_steps=4, guidance_scale=GUIDANCE)
    latents = with_scheduler(oracle["base"], scheduler)(
        PROMPT, latents=torch.from_numpy(noise(1)), height=SIZE, width=SIZE, denoising_end=0.5, output_type="latent", **kw
    ).images
    theirs = with_scheduler(oracle["refiner"], scheduler)(
        PROMPT, image=latents, denoising_start=0.5, aesthetic_score=7.0, output_type="np", **kw
    ).images
    assert psnr(ours[None], to_u8(theirs)) >= BAR_DB
    assert params["refiner_start"] == 0.5 and params["aesthetic_score"] == 7.0 and params["mode"] == "txt2img+refiner"
    assert params["base_target_size"] == [SIZE, SIZE] and params["scheduler"] == scheduler


def test_the_reference_pipeline_equals_diffusers_on_sdxl(sdxl_base, sdxl_refiner, oracle):
    """The torch reference (reference/torch_backend.torch_pipeline: our networks loaded from the diffusers folders,
    the runtime's one loop) does SDXL's conditioning as diffusers: the empty negative zeroed (force_zeros), non-default
    micro-conditioning, and the base -> refiner hand-off with the refiner's aesthetic scores."""
    from ldm_rt.reference.torch_backend import torch_pipeline

    base, refiner = torch_pipeline(sdxl_base), torch_pipeline(sdxl_refiner)
    kw = dict(steps=STEPS, guidance=GUIDANCE, scheduler="ddim", latents=noise(4), seed=0, height=SIZE, width=SIZE)
    ours = base.generate(PROMPT, negative_prompt="", **MICRO, **kw)
    theirs = with_scheduler(oracle["base"], "ddim")(
        PROMPT, negative_prompt=None, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(noise(4)),
        height=SIZE, width=SIZE, output_type="np", **MICRO,
    ).images  # fmt: skip
    assert psnr(ours.images, to_u8(theirs)) >= BAR_DB  # measured: identical 8-bit images
    plain = base.generate(PROMPT, negative_prompt="", **kw)  # default time ids: measured 21 dB from diffusers' image
    assert psnr(plain.images, to_u8(theirs)) < 40.0
    handed = base.generate(PROMPT, negative_prompt="blurry", refiner=refiner, refiner_start=0.5, aesthetic_score=7.0,
                           negative_aesthetic_score=2.0, **kw)  # fmt: skip
    their_kw = dict(negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    latents = with_scheduler(oracle["base"], "ddim")(
        PROMPT, latents=torch.from_numpy(noise(4)), height=SIZE, width=SIZE, denoising_end=0.5, output_type="latent", **their_kw
    ).images
    refined = with_scheduler(oracle["refiner"], "ddim")(
        PROMPT, image=latents, denoising_start=0.5, aesthetic_score=7.0, negative_aesthetic_score=2.0, output_type="np", **their_kw
    ).images
    assert psnr(handed.images, to_u8(refined)) >= BAR_DB  # measured: identical


def test_python_hand_off_is_the_two_calls(pipes):
    """refiner= in one call equals generate(denoising_end, decode=False) then the refiner's
    generate(init_latents, denoising_start) (deterministic scheduler: the shared generator draws nothing)."""
    base, refiner = pipes["base"], pipes["refiner"]
    kw = dict(steps=5, guidance=GUIDANCE, scheduler="dpmpp-2m", seed=2)
    one = base.generate(PROMPT, latents=noise(2), refiner=refiner, refiner_start=0.8, **kw)
    first = base.generate(PROMPT, latents=noise(2), denoising_end=0.8, decode=False, **kw)
    assert first.images.shape == (0, SIZE, SIZE, 3) and first.params["denoising_end"] == 0.8
    second = refiner.generate(PROMPT, init_latents=first.latents, denoising_start=0.8, **kw)
    np.testing.assert_array_equal(one.images, second.images)
    with pytest.raises(GenerationError, match="latents only"):
        first.save("unused.png")


def test_a_stochastic_hand_off_draws_its_noise_as_diffusers(pipes, oracle, monkeypatch):
    """Euler ancestral through the hand-off: one generator for both models, the base's step noise then the
    refiner's; continuing from latents draws no initial noise, as StableDiffusionXLImg2ImgPipeline with
    denoising_start draws none (an unused draw there shifted every refiner step's noise)."""
    from fewstep_support import patch_numpy_noise

    kw = dict(negative_prompt="blurry", guidance=GUIDANCE)
    ours = pipes["base"].generate(PROMPT, latents=noise(1), refiner=pipes["refiner"], refiner_start=0.3, steps=6,
                                  scheduler="euler-a", seed=6, **kw)  # fmt: skip
    theirs_kw = dict(negative_prompt="blurry", guidance_scale=GUIDANCE, num_inference_steps=6)
    images = []
    for unused_draw in (False, True):  # True: what the runtime did before, measured to move the image far
        rng = np.random.default_rng(6)
        patch_numpy_noise(monkeypatch, "diffusers.schedulers.scheduling_euler_ancestral_discrete", rng)
        latents = with_scheduler(oracle["base"], "euler-a")(
            PROMPT, latents=torch.from_numpy(noise(1)), height=SIZE, width=SIZE, denoising_end=0.3, output_type="latent", **theirs_kw
        ).images
        if unused_draw:
            rng.standard_normal(noise().shape, dtype=np.float32)
        images.append(with_scheduler(oracle["refiner"], "euler-a")(
            PROMPT, image=latents, denoising_start=0.3, output_type="np", **theirs_kw).images)  # fmt: skip
    assert psnr(ours.images, to_u8(images[0])) >= BAR_DB
    assert psnr(ours.images, to_u8(images[1])) < 40.0  # measured: 83 dB right, 24 dB with the unused draw


def test_a_truncated_prompt_is_one_warning_though_both_tokenizers_truncate_it(pipes, caplog):
    long = " ".join(["red"] * 100)  # 100 tokens: both tokenizers drop 25
    with caplog.at_level(logging.WARNING, logger="ldm_rt"):
        pipes["base"].generate(long, negative_prompt=long, steps=1, guidance=GUIDANCE, seed=0)
        truncated = [r.getMessage().split(" was truncated")[0] for r in caplog.records if "was truncated" in r.getMessage()]
        assert truncated == ["prompt 0", "negative prompt 0"]
        caplog.clear()  # a refiner has the second tokenizer alone: it warns
        pipes["refiner"].generate(long, init_image=np.zeros((SIZE, SIZE, 3), np.uint8), steps=2, seed=0)
        assert sum("prompt 0 was truncated" in r.getMessage() for r in caplog.records) == 1


# ---- guidance <= 1: no unconditional batch (SDXL-Turbo's guidance 0) -------------------------------------------
def test_guidance_at_most_one_runs_the_conditional_rows_only(pipes, oracle):
    base = pipes["base"]
    rows: list[int] = []
    unet = base.components["unet"]

    class Spy:
        contract = unet.contract

        def run(self, feeds):
            rows.append(feeds["sample"].shape[0])
            assert feeds["text_embeds"].shape[0] == feeds["time_ids"].shape[0] == rows[-1]
            return unet.run(feeds)

    spied = Pipeline(
        {**base.components, "unet": Spy()}, base.tokenizer, base.scheduler_config, base.facts, base.profile,
        backend="onnxruntime", tokenizer_2=base.tokenizer_2,
    )  # fmt: skip
    ours = spied.generate(PROMPT, steps=2, guidance=0.0, scheduler="euler", latents=noise(), seed=0)
    assert rows == [1, 1]
    theirs = with_scheduler(oracle["base"], "euler")(
        PROMPT, num_inference_steps=2, guidance_scale=0.0, latents=torch.from_numpy(noise()), height=SIZE, width=SIZE,
        output_type="np",
    ).images
    assert psnr(ours.images, to_u8(theirs)) >= BAR_DB


# ---- SDXL-Turbo: its folder's scheduler, 1-4 steps at guidance 0 ----------------------------------------------------
@pytest.fixture(scope="module")
def turbo(sdxl_base, pipes, tmp_path_factory):
    """(our pipeline, diffusers' StableDiffusionXLPipeline) for an SDXL-Turbo folder: the small base's weights with
    SDXL-Turbo's scheduler (make_small_sdxl "turbo": Euler ancestral, trailing spacing). Ours runs the base's exported
    components under what export takes from that folder (its scheduler_config.json as the config, its class mapped
    to the default scheduler), so no second export: the weights are byte-equal, checked below."""
    import diffusers

    from ldm_rt.runtime.scheduler_choice import default_scheduler

    folder = make_small_sdxl(tmp_path_factory.mktemp("small_sdxl_turbo"), "turbo", seed=0)
    weights = sorted(p.relative_to(folder) for p in folder.rglob("*.safetensors"))
    assert weights and all((folder / w).read_bytes() == (sdxl_base / w).read_bytes() for w in weights)
    json_path = folder / "scheduler" / "scheduler_config.json"
    base = pipes["base"]
    ours = Pipeline(
        base.components, base.tokenizer, SchedulerConfig.from_dict(json.loads(json_path.read_text())), base.facts, base.profile,
        backend="onnxruntime", tokenizer_2=base.tokenizer_2, default_scheduler=default_scheduler(json.loads(json_path.read_text())).name,
    )  # fmt: skip
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo_samples_from_its_folder_at_guidance_0_as_diffusers(turbo, monkeypatch, steps):
    """No scheduler named: the folder's Euler ancestral with trailing spacing, its step noise from one numpy
    generator on both sides; guidance 0 (diffusers runs no unconditional batch either)."""
    from fewstep_support import patch_numpy_noise

    ours, theirs = turbo
    result = ours.generate(PROMPT, steps=steps, guidance=0.0, latents=noise(3), seed=3)
    assert result.params["scheduler"] == "euler-a" and len(result.timings["unet"]) == steps
    patch_numpy_noise(monkeypatch, "diffusers.schedulers.scheduling_euler_ancestral_discrete", np.random.default_rng(3))
    image = theirs(PROMPT, num_inference_steps=steps, guidance_scale=0.0, latents=torch.from_numpy(noise(3)), height=SIZE,
                   width=SIZE, output_type="np").images  # fmt: skip
    assert psnr(result.images, to_u8(image)) >= BAR_DB  # measured: identical 8-bit images at 1 and 4 steps
    # The trailing spacing matters: SDXL base's own (leading) at the same steps is another image (22 and 35 dB).
    leading = Pipeline(ours.components, ours.tokenizer, replace(ours.scheduler_config, timestep_spacing="leading"), ours.facts,
                       ours.profile, backend="onnxruntime", tokenizer_2=ours.tokenizer_2, default_scheduler="euler-a")  # fmt: skip
    assert psnr(leading.generate(PROMPT, steps=steps, guidance=0.0, latents=noise(3), seed=3).images, to_u8(image)) < 40.0


# ---- the schedule split, against diffusers' arithmetic -----------------------------------------------------------
@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp-2m", "heun", "euler-a"])
@pytest.mark.parametrize("steps,fraction", [(5, 0.6), (25, 0.8), (10, 0.75), (7, 0.33)])
def test_denoising_end_and_start_split_the_timesteps_as_diffusers(sdxl_base, name, steps, fraction):
    import diffusers

    config = json.loads((sdxl_base / "scheduler" / "scheduler_config.json").read_text())
    classes = {**SCHEDULERS, "heun": "HeunDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler"}
    theirs = getattr(diffusers, classes[name]).from_config(config)
    theirs.set_timesteps(steps)
    all_t = theirs.timesteps.numpy()
    cutoff = int(round(1000 - fraction * 1000))
    end = len([t for t in all_t if t >= cutoff])  # StableDiffusionXLPipeline, "8.1 Apply denoising_end"
    m = int((all_t < cutoff).sum())  # StableDiffusionXLImg2ImgPipeline.get_timesteps(denoising_start=...)
    m += theirs.order == 2 and m % 2 == 0
    run = make_scheduler(name, SchedulerConfig.from_dict(config)).set_timesteps(steps)
    assert steps_before(run, fraction, name) == end
    started = start_at(run, fraction, name)
    np.testing.assert_array_equal(started.timesteps, all_t[len(all_t) - m :])


# ---- time ids: the spec's golden vectors ------------------------------------------------------------------------
def spec_time_id_vectors() -> list[dict]:
    text = (ROOT / "docs" / "sampler_spec.md").read_text()
    section = text[text.index("## SDXL") :]
    return json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))


def test_time_ids_are_the_golden_vectors_of_the_spec():
    vectors = spec_time_id_vectors()
    assert len(vectors) == 3
    for v in vectors:
        micro = make_micro_conditioning(v["time_ids"], v["height"], v["width"], v["given"])
        assert micro.time_ids(v["time_ids"]) == (v["cond"], v["uncond"])


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--original-size", "-8", "32"], "original_size must be integers in [1, 16384] pixels, got [-8, 32]"),
    (["--crops-coords-top-left", "0", "99999"], "crops_coords_top_left must be integers in [0, 16384]"),
    (["--aesthetic-score", "7"], "does not read aesthetic_score"),
    (["--height", "64"], "height 64 must be a multiple of 4 in [32, 32] for these artifacts"),  # VAE 2 x UNet 2
    (["--refiner-start", "0.5"], "--refiner-start needs --refiner"),
])  # fmt: skip
def test_bad_sdxl_requests_are_one_line(artifacts, tmp_path, extra, message):
    out = tmp_path / "x.png"
    code, _, err = run_cli(cli.main, ["sample", "--model", str(artifacts["base"]), "--prompt", PROMPT, "--steps", "1", "--out", str(out), *extra])
    assert message in one_line_error(code, err, "ldm-rt")
    assert list(tmp_path.iterdir()) == []


def test_a_refiner_as_base_is_refused(artifacts, pipes, tmp_path):
    out = tmp_path / "x.png"
    alone = ["sample", "--model", str(artifacts["refiner"]), "--prompt", PROMPT, "--steps", "2", "--out", str(out)]
    assert "this model is an SDXL refiner: it continues from an image or latents" in one_line_error(*run_cli(cli.main, alone)[::2], "ldm-rt")
    swapped = [*alone, "--refiner", str(artifacts["base"])]
    assert "the base model is an SDXL refiner" in one_line_error(*run_cli(cli.main, swapped)[::2], "ldm-rt")
    assert list(tmp_path.iterdir()) == []
    # As an img2img model of its own it works (diffusers' StableDiffusionXLImg2ImgPipeline).
    image = np.full((SIZE, SIZE, 3), 128, np.uint8)
    r = pipes["refiner"].generate(PROMPT, init_image=image, strength=0.5, steps=2, seed=0)
    assert r.images.shape == (1, SIZE, SIZE, 3) and r.params["aesthetic_score"] == 6.0 and "target_size" not in r.params


def _one_encoder(base: Path, refiner: Path, folder: Path) -> None:
    shutil.rmtree(folder / "text_encoder_2")
    shutil.rmtree(folder / "tokenizer_2")


def _refiner_unet(base: Path, refiner: Path, folder: Path) -> None:
    shutil.rmtree(folder / "unet")
    shutil.copytree(refiner / "unet", folder / "unet")


@pytest.mark.parametrize("damage,message", [
    (_one_encoder, "no text_encoder_2"),  # an SDXL UNet with a one-encoder (SD-style) folder
    (_refiner_unet, "cross-attends to 48 channels but the text encoders give 80"),  # a refiner's UNet among a base's encoders
])  # fmt: skip
def test_a_bad_sdxl_source_is_one_export_line_and_nothing_is_written(sdxl_base, sdxl_refiner, tmp_path, damage, message):
    """The export CLI, not only the loader: exit 2, one line naming the problem, no output folder and no
    temporary one left beside it."""
    from ldm_rt.export import build_engines

    folder = Path(shutil.copytree(sdxl_base, tmp_path / "source"))
    damage(sdxl_base, sdxl_refiner, folder)
    out = tmp_path / "artifacts"
    code, _, err = run_cli(build_engines.main, ["--model", str(folder), "--out", str(out), "--onnx-only", *PROFILE_FLAGS])
    assert message in one_line_error(code, err, build_engines.PROG)
    assert [p.name for p in tmp_path.iterdir()] == ["source"]


def test_img2img_and_inpainting_run_on_sdxl_with_their_conditioning(pipes):
    """The SD paths (img2img from an image, inpainting by latent blend on a normal UNet, paste-back) carry the
    pooled embeds and time ids too; the time ids default to the output size."""
    base = pipes["base"]
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[:, : SIZE // 2] = (200, 30, 30)
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[:, SIZE // 2 :] = 1.0
    img2img = base.generate(PROMPT, init_image=image, strength=0.6, steps=5, scheduler="euler", seed=0)
    inpaint = base.generate(PROMPT, init_image=image, mask=mask, steps=3, scheduler="dpmpp-2m", seed=0, original_size=(64, 64))
    assert img2img.params["mode"] == "img2img" and img2img.params["original_size"] == [SIZE, SIZE]
    assert inpaint.params["mode"] == "inpaint" and inpaint.params["original_size"] == [64, 64]
    np.testing.assert_array_equal(inpaint.images[0][:, : SIZE // 2], image[:, : SIZE // 2])  # kept pixels pasted back
    assert not np.array_equal(inpaint.images[0][:, SIZE // 2 :], image[:, SIZE // 2 :])


# ---- img2img and inpainting against diffusers' SDXL pipelines ---------------------------------------------------
XL_MODULES = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_"


def pin_diffusers_noise(monkeypatch, kind: str, seed: int) -> None:
    """diffusers samples the VAE posterior and draws its noise from torch; pin both to ours (the posterior mean;
    the noise from default_rng(seed), drawn first, as the runtime draws it)."""
    from fewstep_support import patch_numpy_noise

    patch_numpy_noise(monkeypatch, XL_MODULES + kind, np.random.default_rng(seed))
    monkeypatch.setattr(XL_MODULES + kind + ".retrieve_latents", lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())


def init_image_and_mask() -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 4:20] = 255  # white = repaint
    return image, mask


@pytest.fixture(scope="module")
def oracle_i2i(sdxl_base, sdxl_refiner):
    """StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline (plain 4-channel UNet: the latent blend)
    from the base folder (its force_zeros_for_empty_prompt) and from the refiner's (aesthetic scores)."""
    import diffusers

    pipes = {
        ("img2img", "base"): diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(sdxl_base)),
        ("inpaint", "base"): diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(str(sdxl_base)),
        ("img2img", "refiner"): diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(sdxl_refiner)),
        ("inpaint", "refiner"): diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(str(sdxl_refiner)),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


# (model, scheduler, strength, extra request): the base with micro-conditioning, the refiner with its scores.
I2I_CASES = {
    "base-euler": ("base", "euler", 0.6, {"original_size": (48, 40), "negative_prompt": "blurry"}),
    "base-ddim": ("base", "ddim", 0.8, {"negative_prompt": ""}),  # "" zeroed on both sides (force_zeros)
    "refiner-dpmpp-2m": ("refiner", "dpmpp-2m", 0.5, {"aesthetic_score": 7.0, "negative_aesthetic_score": 2.0, "negative_prompt": "blurry"}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(I2I_CASES))
def test_img2img_equals_diffusers_sdxl_img2img(pipes, oracle_i2i, monkeypatch, case):
    model, scheduler, strength, extra = I2I_CASES[case]
    image, _ = init_image_and_mask()
    ours = pipes[model].generate(PROMPT, init_image=image, strength=strength, steps=5, guidance=GUIDANCE, scheduler=scheduler, seed=4, **extra)
    assert ours.params["mode"] == "img2img" and len(ours.timings["unet"]) == int(5 * strength)
    pin_diffusers_noise(monkeypatch, "img2img", 4)
    theirs_kw = {**extra, "negative_prompt": extra["negative_prompt"] or None}
    theirs = with_scheduler(oracle_i2i[("img2img", model)], scheduler)(
        PROMPT, image=Image.fromarray(image), strength=strength, num_inference_steps=5, guidance_scale=GUIDANCE,
        output_type="np", **theirs_kw,
    ).images
    assert psnr(ours.images, to_u8(theirs)) >= BAR_DB
    if model == "refiner":  # the scores reach the UNet: another score moves the image far below the bar (measured 22 dB)
        other = pipes[model].generate(PROMPT, init_image=image, strength=strength, steps=5, guidance=GUIDANCE, scheduler=scheduler,
                                      seed=4, **{**extra, "aesthetic_score": 3.0})  # fmt: skip
        assert psnr(other.images, ours.images) < 40.0


@pytest.mark.parametrize("model", ["base", "refiner"])
def test_inpainting_equals_diffusers_sdxl_inpaint(pipes, oracle_i2i, monkeypatch, model):
    """A plain SDXL UNet inpaints by the latent blend, as StableDiffusionXLInpaintPipeline with a 4-channel UNet;
    mask_blur=None returns the decoder's pixels everywhere, as diffusers does."""
    image, mask = init_image_and_mask()
    extra = {"aesthetic_score": 8.0} if model == "refiner" else {"crops_coords_top_left": (4, 0)}
    ours = pipes[model].generate(PROMPT, negative_prompt="blurry", init_image=image, mask=mask, latents=noise(5), steps=4, guidance=GUIDANCE,
                                 scheduler="euler", mask_blur=None, **extra)  # fmt: skip
    assert ours.params["mode"] == "inpaint"
    pin_diffusers_noise(monkeypatch, "inpaint", 5)  # the image's posterior mean; no draw (the latents are given)
    theirs = with_scheduler(oracle_i2i[("inpaint", model)], "euler")(
        PROMPT, negative_prompt="blurry", image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=1.0,
        latents=torch.from_numpy(noise(5)), num_inference_steps=4, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
        output_type="np", **extra,
    ).images
    assert psnr(ours.images, to_u8(theirs)) >= BAR_DB


def test_an_sdxl_single_file_exports_through_the_cli_to_the_folders_image(sdxl_base, pipes, tmp_path):
    """Stability's single file (sgm keys, no tokenizers) exports with --tokenizer and --tokenizer-2 and samples the
    image of the diffusers folder it was converted from; without --tokenizer-2 the export says so in one line."""
    from tiny_models import make_tiny_sdxl_single_file

    from ldm_rt.export import build_engines

    single = make_tiny_sdxl_single_file(sdxl_base, tmp_path / "sd_xl_small.safetensors")
    missing = tmp_path / "missing"
    code, _, err = run_cli(build_engines.main, ["--model", str(single), "--out", str(missing), "--onnx-only",
                                                "--tokenizer", str(sdxl_base / "tokenizer"), *PROFILE_FLAGS])
    assert "--tokenizer-2" in one_line_error(code, err, build_engines.PROG) and not missing.exists()

    out = tmp_path / "artifacts"
    code, _, err = run_cli(build_engines.main, [
        "--model", str(single), "--out", str(out), "--onnx-only",
        "--tokenizer", str(sdxl_base / "tokenizer"), "--tokenizer-2", str(sdxl_base / "tokenizer_2"), *PROFILE_FLAGS,
    ])  # fmt: skip
    assert code == 0, err
    kw = dict(negative_prompt="blurry", steps=STEPS, guidance=GUIDANCE, scheduler="euler", latents=noise(), seed=0)
    from_file = Pipeline.load(out).generate(PROMPT, **kw).images[0]
    assert psnr(from_file, pipes["base"].generate(PROMPT, **kw).images[0]) >= 60.0
