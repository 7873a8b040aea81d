"""SDXL LoRA at run time, end to end: a tiny random SDXL base (tests/tiny_models.py) exported once, LoRAs for the
UNet and both text encoders applied by ONNX Runtime as the sessions open, images equal to diffusers'
StableDiffusionXLPipeline with `load_lora_weights` + `set_adapters` (UNet and both text encoders loaded by
diffusers itself: the independent oracle) at PSNR >= 50 dB.

LoRAs: "diffusers", made by peft on the diffusers UNet (rank 4, alpha 8, attention q/v/out, proj_in and LoCon
conv1 3x3) plus both text encoders in PEFT layout (`text_encoder.*`, `text_encoder_2.*`), alphas in the
file's `lora_adapter_metadata`; "kohya", kohya's SDXL layout as sd-scripts writes it (the UNet under sgm's
flattened names, `lora_te1_` / `lora_te2_`, rank 2, `.alpha` 3, LoCon on the ResBlocks' 3x3 in_layers.2).
Same latents, Euler, 4 steps, 32x32. Measured: 68 dB, identical and 72 dB for the three cases; the LoRAs move
diffusers' image to 12-13 dB from the base model's, so the oracle tells them apart (the first test).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_lora_fixtures import PEFT_UNET_TARGETS, _jsonable, _unet_lora
from test_runtime_fixtures import psnr

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

SIZE, STEPS = 32, 4
PROMPT, NEGATIVE, GUIDANCE = "a red circle on the left", "blurry", 5.0
BAR_DB = 50.0
LATENTS = np.random.default_rng(7).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)
TE_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")
KOHYA_UNET_ENDINGS = ("attn1.to_k", "attn2.to_v", "ff.net.0.proj", "in_layers.2")  # in_layers.2: LoCon, 3x3




def _draw(g: torch.Generator, out_dim: int, in_shape: tuple[int, ...], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) large enough that the LoRA visibly moves the image."""
    down = torch.randn((rank, *in_shape), generator=g) / float(np.prod(in_shape)) ** 0.5
    up = torch.randn((out_dim, rank, *([1, 1] if len(in_shape) == 3 else [])), generator=g) / rank**0.5
    return down, up


def _encoder_modules(folder: Path, component: str) -> dict[str, tuple[int, int]]:
    """HF module name (text_model.-prefixed, as LoRA files write it) -> (out, in) for TE_TARGETS."""
    cfg = json.loads((folder / component / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.v_proj": (h, h), "self_attn.out_proj": (h, h), "mlp.fc1": (i, h)}
    return {f"text_model.encoder.layers.{layer}.{t}": shapes[t] for layer in range(cfg["num_hidden_layers"]) for t in TE_TARGETS}


@pytest.fixture(scope="module")
def sdxl_folder(small_sdxl_base) -> Path:
    return small_sdxl_base[0]  # the folder of the session's small SDXL base export (tests/sdxl_small_models.py)


@pytest.fixture(scope="module")
def loras(sdxl_folder, tmp_path_factory) -> dict[str, Path]:
    from safetensors.torch import save_file

    from ldm_rt.reference.checkpoints import load_model
    from ldm_rt.reference.lora import lora_module_table

    folder = tmp_path_factory.mktemp("sdxl_loras")
    g = torch.Generator().manual_seed(5)
    # diffusers / PEFT layout: the UNet part by peft itself
    unet, config = _unet_lora(sdxl_folder, PEFT_UNET_TARGETS, 4, 8.0, seed=11, gain=1.0)
    tensors = {f"unet.{k}": v for k, v in unet.items()}
    meta = {f"unet.{k}": v for k, v in _jsonable(config).items()}
    for component, alpha in (("text_encoder", 6.0), ("text_encoder_2", 2.0)):
        for module, (o, i) in _encoder_modules(sdxl_folder, component).items():
            down, up = _draw(g, o, (i,), 4)
            tensors[f"{component}.{module}.lora_A.weight"], tensors[f"{component}.{module}.lora_B.weight"] = down, up
        meta.update({f"{component}.r": 4, f"{component}.lora_alpha": alpha, f"{component}.target_modules": sorted(t.split(".")[-1] for t in TE_TARGETS)})
    peft = folder / "sdxl_peft.safetensors"
    save_file(tensors, str(peft), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)})
    # kohya's SDXL layout: the UNet under sgm's names (ours), lora_te1_ / lora_te2_
    table = lora_module_table(load_model(sdxl_folder).model)
    kohya: dict[str, torch.Tensor] = {}
    for module, info in table["unet"].items():
        if module.endswith(KOHYA_UNET_ENDINGS):
            flat = "lora_unet_" + module.replace(".", "_")
            kohya[f"{flat}.lora_down.weight"], kohya[f"{flat}.lora_up.weight"] = _draw(g, info.shape[0], info.shape[1:], 2)
            kohya[f"{flat}.alpha"] = torch.tensor(3.0)
    for component, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        for module, (o, i) in _encoder_modules(sdxl_folder, component).items():
            flat = prefix + module.replace(".", "_")
            kohya[f"{flat}.lora_down.weight"], kohya[f"{flat}.lora_up.weight"] = _draw(g, o, (i,), 2)
            kohya[f"{flat}.alpha"] = torch.tensor(3.0)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(folder / "sdxl_kohya.safetensors"))
    return {"diffusers": peft, "kohya": folder / "sdxl_kohya.safetensors"}


@pytest.fixture(scope="module")
def artifacts(small_sdxl_base) -> Path:
    return small_sdxl_base[1]  # run-time LoRAs need no export of their own: the session's small SDXL base


@pytest.fixture(scope="module")
def oracle(sdxl_folder, loras):
    """((name, scale), ...) -> diffusers' 8-bit image, cached; one pipeline with both LoRAs loaded, switched by
    set_adapters (empty: LoRAs disabled)."""
    cache: dict = {}
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for name, path in loras.items():
        pipe.load_lora_weights(str(path), adapter_name=name)

    def run(case: tuple[tuple[str, float], ...]) -> np.ndarray:
        if case not in cache:
            if case:
                pipe.enable_lora()
                pipe.set_adapters([n for n, _ in case], adapter_weights=[s for _, s in case])
            else:
                pipe.disable_lora()
            with torch.no_grad():
                images = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                              latents=torch.from_numpy(LATENTS), output_type="np").images  # fmt: skip
            cache[case] = (images * 255).round().astype(np.uint8)
        return cache[case]

    return run


def generate(pipe) -> np.ndarray:
    return pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance=GUIDANCE, scheduler="euler", latents=LATENTS, seed=0).images


BOTH = (("diffusers", 1.0), ("kohya", 0.6))


DIFFUSERS, KOHYA = (("diffusers", 1.0),), (("kohya", 0.8),)


def test_the_oracle_tells_the_loras_apart(oracle):
    """Without this the parity below would prove little: each LoRA moves diffusers' image far below the bar, and
    the second LoRA on top of the first moves it again (scales: tests/test_lora_parity.py)."""
    assert psnr(oracle(DIFFUSERS), oracle(())) < 25
    assert psnr(oracle(KOHYA), oracle(())) < 25
    assert psnr(oracle(BOTH), oracle(DIFFUSERS)) < 30


@pytest.mark.parametrize("case", [DIFFUSERS, KOHYA, BOTH], ids=["diffusers", "kohya", "both"])
def test_run_time_sdxl_loras_equal_diffusers(artifacts, loras, oracle, case):
    from ldm_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(artifacts, loras=[(loras[n], s) for n, s in case])
    assert [(r["file"], r["scale"], r["applied"]) for r in pipe.loras] == [(loras[n].name, s, "run time") for n, s in case]
    assert psnr(generate(pipe), oracle(case)) >= BAR_DB


def test_the_text_encoder_parts_matter(artifacts, loras, oracle, tmp_path):
    """The same kohya file without its lora_te1_/lora_te2_ keys lands far from the oracle: both encoders' parts
    are applied, not only the UNet's."""
    from safetensors.torch import load_file, save_file

    from ldm_rt.runtime.pipeline import Pipeline

    full = load_file(str(loras["kohya"]))
    for dropped in ("lora_te1_", "lora_te2_"):
        part = tmp_path / f"without_{dropped}.safetensors"
        save_file({k: v for k, v in full.items() if not k.startswith(dropped)}, str(part))
        assert psnr(generate(Pipeline.load(artifacts, loras=[(part, 0.8)])), oracle(KOHYA)) < BAR_DB - 10


def test_the_unused_last_layer_of_the_first_encoder_is_recorded(artifacts, capsys):
    """SDXL reads its first text encoder at the penultimate layer, so the export drops the last one; a LoRA on it
    changes nothing (in diffusers too), so the targets list it as unused instead of refusing such LoRAs."""
    from ldm_rt.runtime.cli import main
    from ldm_rt.runtime.lora import LoraTargets

    targets = LoraTargets.read(artifacts)
    last = {m for m in targets.modules["text_encoder"] if ".layers.2." in m}  # the tiny encoders have 3 layers
    assert last
    for rel, entry in targets.files.items():
        assert set(entry["unused"]) == (last if entry["component"] == "text_encoder" else set()), rel
    assert main(["info", "--model", str(artifacts)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out[out.index("loras (modules a LoRA may adapt):") :].splitlines() if x.startswith("  text_encoder: "))
    assert line.endswith(f", {len(last)} unused by the outputs (a LoRA there changes nothing)")
