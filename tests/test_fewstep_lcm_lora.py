"""LCM-LoRA on an ordinary SD model (issue 18): `ldm-rt sample --lora lcm.safetensors --scheduler lcm --guidance 1.5`
equals diffusers' StableDiffusionPipeline + load_lora_weights + LCMScheduler from the same latents, LCM's per-step
noise taken from the same numpy generator on both sides (diffusers' noise source patched in the test, not ours).

The LoRA is made as LCM-LoRA is shipped: UNet only, kohya layout (diffusers' own converter from a peft adapter),
on every module kind LCM-LoRA SD 1.5 adapts (attention, feed-forward, projections, resnet convs, time embedding,
down/upsamplers). The UNet keeps no w-embedding (time_cond_proj_dim): guidance 1.5 is classifier-free guidance
with the unconditional batch, as diffusers runs it. The oracle must tell the LoRA, its scale and the guidance
apart by far more than the parity margin, or the test proves nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from fewstep_support import image_uint8, patch_numpy_noise, unit_latents
from test_runtime_fixtures import exported, psnr

from ldm_rt.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

SIZE, STEPS, SEED, GUIDANCE = 16, 4, 9, 1.5
PROMPT, NEGATIVE = "a photo of a red car", "blurry"
PARITY_DB, SENSITIVE_DB = 50.0, 40.0
# The module kinds of latent-consistency/lcm-lora-sdv1-5 (diffusers' names; conv1/conv2/conv_shortcut: LoCon).
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]  # fmt: skip


def make_lcm_lora(sd_folder, out_dir, rank: int = 4, alpha: float = 4.0):
    """A UNet-only kohya-layout LoRA file (lcm.safetensors) over LCM-LoRA's module kinds."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file
    from test_lora_fixtures import _unet_lora

    unet, _ = _unet_lora(sd_folder, LCM_LORA_TARGETS, rank, alpha, seed=11, gain=0.7)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in unet.items()})
    kohya = {k: (torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "lcm.safetensors"
    save_file(kohya, str(path))
    return path


@pytest.fixture(scope="module")
def lora_file(tiny_sd_v1, tmp_path_factory):
    return make_lcm_lora(tiny_sd_v1, tmp_path_factory.mktemp("lcm_lora"))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_sd_v1):
    return exported(tmp_path_factory, tiny_sd_v1, fp16=False)  # shared with the other tiny SD v1 runtime tests


@pytest.fixture(scope="module")
def oracle(tiny_sd_v1, lora_file):
    """(lora scale or None, guidance) -> diffusers' image, cached."""
    cache: dict = {}
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_v1, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_file), adapter_name="lcm")

    def run(scale: float | None, guidance: float, monkeypatch) -> np.ndarray:
        key = (scale, guidance)
        if key not in cache:
            if scale is None:
                pipe.disable_lora()
            else:
                pipe.enable_lora()
                pipe.set_adapters(["lcm"], adapter_weights=[scale])
            patch_numpy_noise(monkeypatch, "diffusers.schedulers.scheduling_lcm", np.random.default_rng(SEED))
            with torch.no_grad():
                images = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance,
                              latents=torch.from_numpy(unit_latents(SEED, SIZE)), height=SIZE, width=SIZE, output_type="np").images
            cache[key] = image_uint8(images)
        return cache[key]

    return run


def ours_kw(**over):
    return {**dict(negative_prompt=NEGATIVE, steps=STEPS, guidance=GUIDANCE, scheduler="lcm", seed=SEED, height=SIZE, width=SIZE,
                   latents=unit_latents(SEED, SIZE)), **over}


def test_the_oracle_tells_the_lora_its_scale_and_the_guidance_apart(oracle, monkeypatch):
    theirs = oracle(1.0, GUIDANCE, monkeypatch)
    assert psnr(oracle(None, GUIDANCE, monkeypatch), theirs) < SENSITIVE_DB
    assert psnr(oracle(0.5, GUIDANCE, monkeypatch), theirs) < SENSITIVE_DB
    assert psnr(oracle(1.0, 1.0, monkeypatch), theirs) < SENSITIVE_DB  # guidance 1.5 runs the unconditional batch


def test_lcm_lora_at_run_time_matches_diffusers(artifacts, lora_file, oracle, monkeypatch):
    pipe = Pipeline.load(artifacts, loras=[(lora_file, 1.0)])
    assert pipe.facts.time_cond_proj_dim is None  # an ordinary UNet: guidance is classifier-free
    result = pipe.generate(PROMPT, **ours_kw())
    assert psnr(result.images, oracle(1.0, GUIDANCE, monkeypatch)) >= PARITY_DB
    assert len(result.timings["unet"]) == STEPS and result.params["scheduler"] == "lcm"
    assert [(r["file"], r["scale"]) for r in result.params["loras"]] == [("lcm.safetensors", 1.0)]
    half = Pipeline.load(artifacts, loras=[(lora_file, 0.5)]).generate(PROMPT, **ours_kw()).images
    assert psnr(half, oracle(0.5, GUIDANCE, monkeypatch)) >= PARITY_DB
    # The step noise is the seed's: another seed moves the image.
    assert psnr(pipe.generate(PROMPT, **ours_kw(seed=SEED + 1)).images, result.images) < SENSITIVE_DB


def test_the_cli_samples_with_an_lcm_lora_as_diffusers_does(artifacts, lora_file, oracle, monkeypatch, tmp_path):
    from PIL import Image

    from ldm_rt.runtime.cli import main

    np.save(tmp_path / "latents.npy", unit_latents(SEED, SIZE))
    out = tmp_path / "lcm_lora.png"
    argv = ["sample", "--model", str(artifacts), "--lora", str(lora_file), "--scheduler", "lcm", "--guidance", str(GUIDANCE),
            "--steps", str(STEPS), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--seed", str(SEED),
            "--latents", str(tmp_path / "latents.npy"), "--height", str(SIZE), "--width", str(SIZE), "--out", str(out)]
    assert main(argv) == 0
    assert psnr(np.asarray(Image.open(out).convert("RGB"))[None], oracle(1.0, GUIDANCE, monkeypatch)) >= PARITY_DB
