"""LoRA parity on a tiny random SD v1 (tests/tiny_models.py) against diffusers, the independent oracle.

LoRAs (tests/test_lora_fixtures.py): A, made by peft in diffusers/PEFT layout (rank 4, alpha 8, UNet attention,
proj_in and LoCon 3x3 convs, text encoder); B, another peft LoRA converted to kohya layout by diffusers' converter
(rank 2, alpha 1, to_k, ff, proj_out, LoCon conv2, time_emb_proj, text encoder). The oracle is diffusers'
StableDiffusionPipeline with `load_lora_weights` + `set_adapters(adapter_weights=scales)` for the UNet and, since
transformers 5 refuses peft's text-encoder adapters, the text-encoder weights fused by the test itself
(`fuse_text_encoder_oracle`). Same latents, DDIM, 5 steps, 16x16.

Bar: 50 dB (8-bit PSNR) for fp32, as for the pipeline without LoRA (tests/test_runtime_parity.py); fp16 at run
time 40 dB from the fp32 fused export. Measured here: reference fused 77 dB to identical, export-fused and run
time identical to each other and to the oracle, fp16 52 dB. The oracle is sensitive: scale 1 vs
0.5 is ~12 dB apart, the LoRAs move the image to ~11-13 dB from the base model, the text-encoder part alone
moves it well below the bar.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_lora_fixtures import MadeLora, fuse_text_encoder_oracle, make_kohya_lora, make_peft_lora
from test_runtime_fixtures import EXPORT_PROFILE, exported, psnr

from ldm_rt.runtime.lora import LoraSpec
from ldm_rt.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

SIZE, STEPS, SEED = 16, 5, 3
BASE = dict(prompt="a photo of a red car", negative_prompt="blurry", steps=STEPS, guidance=7.5, seed=12345, height=SIZE, width=SIZE)
FP32_DB, FP16_DB = 50.0, 40.0
LATENTS = np.random.default_rng(SEED).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)


@pytest.fixture(scope="module")
def made(tiny_sd_v1, tmp_path_factory) -> dict[str, MadeLora]:
    folder = tmp_path_factory.mktemp("loras")
    return {"peft": make_peft_lora(tiny_sd_v1, folder), "kohya": make_kohya_lora(tiny_sd_v1, folder)}


@pytest.fixture(scope="module")
def oracle(tiny_sd_v1, made):
    """(names and scales, text encoder fused too) -> diffusers' image, cached."""
    cache: dict = {}

    def run(case: tuple[tuple[str, float], ...], text_encoder: bool = True) -> np.ndarray:
        key = (case, text_encoder)
        if key not in cache:
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_v1, safety_checker=None, requires_safety_checker=False)
            pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            for name, _ in case:
                pipe.load_lora_weights(str(made[name].unet_only), adapter_name=name)
            pipe.set_adapters([n for n, _ in case], adapter_weights=[s for _, s in case])
            if text_encoder:
                fuse_text_encoder_oracle(pipe.text_encoder, [(made[n], s) for n, s in case])
            with torch.no_grad():
                images = pipe(BASE["prompt"], negative_prompt=BASE["negative_prompt"], num_inference_steps=STEPS, guidance_scale=BASE["guidance"],
                              latents=torch.from_numpy(LATENTS), height=SIZE, width=SIZE, output_type="np").images  # fmt: skip
            cache[key] = np.round(images * 255).astype(np.uint8)
        return cache[key]

    return run


ONE = (("peft", 1.0),)
TWO = (("peft", 1.0), ("kohya", 0.7))


def specs(made, case) -> list[LoraSpec]:
    return [LoraSpec(made[n].file, s) for n, s in case]


def generate(pipe: Pipeline) -> np.ndarray:
    return pipe.generate(scheduler="ddim", latents=LATENTS, **BASE).images


def test_the_oracle_tells_scales_and_parts_apart(oracle, tiny_sd_v1):
    """Without this the parity below would prove little: scale 1 vs 0.5, the text-encoder part, the LoRAs themselves."""
    assert psnr(oracle(ONE), oracle((("peft", 0.5),))) < 20
    assert psnr(oracle(ONE), oracle(ONE, text_encoder=False)) < FP32_DB - 10
    assert psnr(oracle(TWO), oracle(ONE)) < 25  # the kohya LoRA at 0.7 matters too


@pytest.mark.parametrize("case", [ONE, (("kohya", 1.0),), TWO], ids=["peft", "kohya", "peft+kohya"])
def test_reference_with_loras_fused_matches_diffusers(tiny_sd_v1, made, oracle, case):
    from ldm_rt.reference.checkpoints import load_model
    from ldm_rt.reference.lora import fuse_loras
    from ldm_rt.reference.torch_backend import torch_pipeline

    loaded = load_model(tiny_sd_v1)
    recorded = fuse_loras(loaded, specs(made, case))
    assert [r["scale"] for r in recorded] == [s for _, s in case] and all(len(r["sha256"]) == 64 for r in recorded)
    assert psnr(generate(torch_pipeline(loaded)), oracle(case)) >= FP32_DB


@pytest.fixture(scope="module")
def base_artifacts(tmp_path_factory, tiny_sd_v1):
    return exported(tmp_path_factory, tiny_sd_v1, fp16=True)  # shared with the runtime parity tests


@pytest.fixture(scope="module")
def fused_artifacts(tmp_path_factory, tiny_sd_v1, made):
    from ldm_rt.export.build import BuildOptions, build

    out = tmp_path_factory.mktemp("lora_fused") / "artifacts"
    build(BuildOptions(model=tiny_sd_v1, out=out, profile=EXPORT_PROFILE, onnx_only=True, progress=False, loras=tuple(specs(made, TWO))))
    return out


def test_fused_at_export_and_at_run_time_match_diffusers_and_each_other(base_artifacts, fused_artifacts, made, oracle):
    fused = Pipeline.load(fused_artifacts)
    assert [(r["file"], r["scale"], r["applied"]) for r in fused.loras] == [("peft_lora.safetensors", 1.0, "export"), ("kohya_lora.safetensors", 0.7, "export")]
    at_export = generate(fused)
    assert psnr(at_export, oracle(TWO)) >= FP32_DB

    run_time = Pipeline.load(base_artifacts, loras=[(made[n].file, s) for n, s in TWO])
    result = run_time.generate(scheduler="ddim", latents=LATENTS, **BASE)
    assert psnr(result.images, oracle(TWO)) >= FP32_DB
    assert psnr(result.images, at_export) >= FP32_DB  # measured: identical
    assert [(r["file"], r["scale"]) for r in result.params["loras"]] == [("peft_lora.safetensors", 1.0), ("kohya_lora.safetensors", 0.7)]
    assert result.params["loras"][0]["sha256"] == fused.loras[0]["sha256"]

    one = Pipeline.load(base_artifacts, loras=[f"{made['peft'].file}:1"])
    assert psnr(generate(one), oracle(ONE)) >= FP32_DB
    assert psnr(generate(Pipeline.load(base_artifacts)), oracle(ONE)) < 20  # without the LoRA: far off

    half = Pipeline.load(base_artifacts, precision="fp16", loras=[(made[n].file, s) for n, s in TWO])
    assert psnr(generate(half), at_export) >= FP16_DB


def test_the_torch_backend_runs_the_loras_the_export_fused(fused_artifacts, made, oracle, tmp_path):
    """--backend torch rebuilds the network from the source model: it fuses the manifest's LoRAs again (same
    files, sha256 checked), so its image is the artifacts' and its metadata's "export" record is true."""
    reference = Pipeline.load(fused_artifacts, backend="torch")
    assert psnr(generate(reference), oracle(TWO)) >= FP32_DB

    import json
    import shutil

    moved = Path(shutil.copytree(fused_artifacts, tmp_path / "copy"))
    manifest = json.loads((moved / "manifest.json").read_text())
    changed = tmp_path / "changed.safetensors"  # a valid LoRA, but not the one fused
    changed.write_bytes(Path(made["kohya"].file).read_bytes())
    manifest["source"]["loras"][0]["path"] = str(changed)
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="has changed since the export; rebuild"):
        Pipeline.load(moved, backend="torch")


def test_artifacts_on_disk_are_never_modified(base_artifacts, made):
    from ldm_rt.runtime.manifest import Manifest, sha256_file

    before = {p: sha256_file(p) for p in Path(base_artifacts).rglob("*.onnx")}
    Pipeline.load(base_artifacts, loras=[(made["peft"].file, 1.0)])
    assert {p: sha256_file(p) for p in Path(base_artifacts).rglob("*.onnx")} == before
    Manifest.read(base_artifacts)  # still a valid, unchanged build


def test_openvino_applies_run_time_loras_as_onnx_runtime_does(base_artifacts, made, oracle):
    """--backend openvino with --lora: the read model's weight constants replaced before it compiles; the image
    equals ONNX Runtime's with the same LoRAs (and diffusers'), fp32 and fp16 artifacts."""
    pytest.importorskip("openvino")
    loras = [(made[n].file, s) for n, s in TWO]
    on_openvino = Pipeline.load(base_artifacts, backend="openvino", loras=loras)
    assert [(r["file"], r["scale"], r["applied"]) for r in on_openvino.loras] == [("peft_lora.safetensors", 1.0, "run time"), ("kohya_lora.safetensors", 0.7, "run time")]
    image = generate(on_openvino)
    assert psnr(image, generate(Pipeline.load(base_artifacts, loras=loras))) >= FP32_DB
    assert psnr(image, oracle(TWO)) >= FP32_DB
    half = generate(Pipeline.load(base_artifacts, backend="openvino", precision="fp16", loras=loras))
    assert psnr(half, generate(Pipeline.load(base_artifacts, precision="fp16", loras=loras))) >= FP16_DB
