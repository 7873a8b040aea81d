"""SDXL-LCM (issue 16): an SDXL UNet with `time_cond_proj_dim` (guidance as a w-embedding, no unconditional batch)
in a small SDXL folder that ships LCMScheduler, exported (`--onnx-only`) and sampled without --scheduler (the folder's
own: lcm) equals diffusers' StableDiffusionXLPipeline with that folder's LCMScheduler, from the same latents and
with LCM's per-step noise from the same numpy generator on both sides (diffusers' noise source patched here).
The guidance path is checked to matter: guidance 3 instead of 8 moves diffusers' own image far below the bar.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fewstep_support import image_uint8, patch_numpy_noise, unit_latents
from sdxl_small_models import make_small_sdxl
from test_runtime_fixtures import psnr

from ldm_rt.export.build import BuildOptions, build
from ldm_rt.runtime import cli
from ldm_rt.runtime.contracts import ShapeProfile
from ldm_rt.runtime.manifest import Manifest
from ldm_rt.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SIZE, STEPS, SEED, GUIDANCE = 32, 4, 5, 8.0
COND_DIM = 32  # time_cond_proj_dim (SDXL-LCM: 256)
PROMPT = "a red circle on the left"
PARITY_DB, SENSITIVE_DB = 50.0, 40.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_small_sdxl(tmp_path_factory.mktemp("small_sdxl_lcm"), "base", seed=3, time_cond_proj_dim=COND_DIM, scheduler="LCMScheduler")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, folder):
    out = tmp_path_factory.mktemp("small_sdxl_lcm_artifacts") / "artifacts"
    build(BuildOptions(model=folder, out=out, profile=ShapeProfile.static(1, SIZE, SIZE), onnx_only=True, ort_variant=False, progress=False))
    return out


@pytest.fixture(scope="module")
def oracle(folder):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"  # the folder's own, as diffusers loads it
    return pipe


def diffusers_image(pipe, monkeypatch, guidance: float) -> np.ndarray:
    """diffusers' image from unit_latents(SEED), its LCM step noise drawn from default_rng(SEED) as ours is."""
    patch_numpy_noise(monkeypatch, "diffusers.schedulers.scheduling_lcm", np.random.default_rng(SEED))
    with torch.no_grad():
        images = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=guidance, latents=torch.from_numpy(unit_latents(SEED, SIZE)),
                      height=SIZE, width=SIZE, output_type="np").images  # fmt: skip
    return image_uint8(images)




def test_sdxl_lcm_samples_as_diffusers_with_the_folders_own_scheduler(artifacts, oracle, monkeypatch, tmp_path):
    manifest = Manifest.read(artifacts)
    assert manifest.default_scheduler == "lcm" and manifest.facts.time_cond_proj_dim == COND_DIM
    assert {t.name for t in manifest.components["unet"].contract.inputs} >= {"timestep_cond", "text_embeds", "time_ids"}
    theirs = diffusers_image(oracle, monkeypatch, GUIDANCE)
    assert psnr(diffusers_image(oracle, monkeypatch, 3.0), theirs) < SENSITIVE_DB  # the oracle sees the w-embedding
    # Python, no scheduler named: the folder's LCMScheduler.
    pipe = Pipeline.load(artifacts)
    ours = pipe.generate(PROMPT, steps=STEPS, guidance=GUIDANCE, latents=unit_latents(SEED, SIZE), seed=SEED)
    assert ours.params["scheduler"] == "lcm" and len(ours.timings["unet"]) == STEPS
    assert psnr(ours.images, theirs) >= PARITY_DB
    # The CLI, as the README says it: --scheduler lcm.
    np.save(tmp_path / "latents.npy", unit_latents(SEED, SIZE))
    out = tmp_path / "lcm.png"
    code = cli.main(["sample", "--model", str(artifacts), "--prompt", PROMPT, "--scheduler", "lcm", "--steps", str(STEPS),
                     "--guidance", str(GUIDANCE), "--latents", str(tmp_path / "latents.npy"), "--seed", str(SEED), "--out", str(out)])  # fmt: skip
    assert code == 0
    from PIL import Image

    with Image.open(out) as im:
        assert psnr(np.asarray(im.convert("RGB"))[None], theirs) >= PARITY_DB
        assert json.loads(im.text["parameters"])["scheduler"] == "lcm"
