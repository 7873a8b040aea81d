"""LoRA names on SDXL (tiny random SDXL base, tests/tiny_models.py), checked on the fused weights.

A PEFT-layout file (`unet.<diffusers module>`, `text_encoder.*`, `text_encoder_2.*`, alpha in the metadata) is
fused by ldm-rt and by diffusers (`load_lora_weights` + `fuse_lora`, the oracle, UNet part); diffusers' fused UNet,
renamed to our layout by the key map, must equal ours. The same tensors in kohya's SDXL layout (the UNet under
sgm's own flattened names, as kohya's sd-scripts writes SDXL LoRAs, `lora_te1_`, `lora_te2_`) must fuse to the
same weights, and the text encoders to W + alpha/rank * up @ down computed here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_lora_formats import write_safetensors

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

RANK, ALPHA = 2, 3.0


def _pick(table: dict, component: str, endings: tuple[str, ...], n: int = 2) -> list[str]:
    return [m for m in table[component] if any(m.endswith(e) for e in endings)][:n]


@pytest.fixture(scope="module")
def setup(tiny_sdxl_base, tmp_path_factory):
    from ldm_rt.reference.checkpoints import load_model
    from ldm_rt.reference.lora import lora_module_table

    folder = tmp_path_factory.mktemp("sdxl_lora")
    table = lora_module_table(load_model(tiny_sdxl_base).model)
    assert {"unet", "text_encoder", "text_encoder_2"} <= set(table)
    rng = np.random.default_rng(0)
    chosen = {
        "unet": _pick(table, "unet", ("attn1.to_q", "attn2.to_k", "ff.net.2")) + _pick(table, "unet", ("in_layers.2",), 1),
        "text_encoder": _pick(table, "text_encoder", ("self_attn.q_proj",), 1),
        "text_encoder_2": _pick(table, "text_encoder_2", ("mlp.fc1",), 1),
    }
    weights = {}
    for component, modules in chosen.items():
        for module in modules:
            shape = table[component][module].shape
            down = (rng.standard_normal((RANK, *shape[1:])) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
            up = rng.standard_normal((shape[0], RANK, *([1, 1] if len(shape) == 4 else []))).astype(np.float32)
            weights[(component, module)] = (down, up)
    peft, kohya = {}, {}
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for (component, module), (down, up) in weights.items():
        theirs = table[component][module].aliases[0] if component == "unet" else module
        peft[f"{component}.{theirs}.lora_A.weight"], peft[f"{component}.{theirs}.lora_B.weight"] = down, up
        flat = kohya_prefix[component] + module.replace(".", "_")  # the UNet under sgm's names: ours
        kohya.update({f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up, f"{flat}.alpha": np.float32(ALPHA)})
    theirs_names = {(c, m): table[c][m].aliases[0] if c == "unet" else m for c, m in weights}  # diffusers' names
    meta = {c: {"r": RANK, "lora_alpha": ALPHA, "target_modules": sorted(n for (cc, _), n in theirs_names.items() if cc == c)} for c in chosen}
    meta_all = {f"{c}.{k}": v for c, cfg in meta.items() for k, v in cfg.items()}
    unet_keys = {k: v for k, v in peft.items() if k.startswith("unet.")}
    files = {
        "peft": write_safetensors(folder / "peft.safetensors", peft, {"lora_adapter_metadata": json.dumps(meta_all)}),
        "peft_unet": write_safetensors(folder / "peft_unet.safetensors", unet_keys,
                                       {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in meta["unet"].items()})}),
        "kohya": write_safetensors(folder / "kohya.safetensors", kohya),
    }  # fmt: skip
    return table, weights, files


@pytest.fixture(scope="module")
def base(tiny_sdxl_base):
    from ldm_rt.reference.checkpoints import load_model

    return load_model(tiny_sdxl_base).model


def _fused(base, file):
    import copy

    from ldm_rt.reference.lora import fuse_loras
    from ldm_rt.runtime.lora import LoraSpec

    model = copy.deepcopy(base)
    fuse_loras(model, [LoraSpec(file, 1.0)])
    return model


def test_sdxl_peft_lora_fuses_as_diffusers_does(tiny_sdxl_base, base, setup):
    from ldm_rt.reference.keymap_unet import unet_state_dict_from_diffusers

    table, weights, files = setup
    ours = _fused(base, files["peft"])
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_base)
    pipe.load_lora_weights(str(files["peft_unet"]))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    theirs = unet_state_dict_from_diffusers(pipe.unet.state_dict(), ours.unet.config)
    before = base.unet.state_dict()
    changed = 0
    for key, value in ours.unet.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-5, msg=key)
        changed += not torch.equal(value, before[key])
    assert changed == sum(c == "unet" for c, _ in weights)  # exactly the adapted weights moved
    for component in ("text_encoder", "text_encoder_2"):
        named = dict(getattr(ours, component).named_modules())
        base_named = dict(getattr(base, component).named_modules())
        for (c, module), (down, up) in weights.items():
            if c == component:
                expected = base_named[module].weight + ALPHA / RANK * torch.from_numpy(up @ down)
                torch.testing.assert_close(named[module].weight, expected, rtol=1e-5, atol=1e-5)


def test_sdxl_kohya_names_fuse_to_the_same_weights(base, setup):
    _, _, files = setup
    a, b = _fused(base, files["peft"]), _fused(base, files["kohya"])
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-6, msg=ka)


def test_an_sdxl_lora_on_sd1_is_refused(tiny_sd_v1, setup):
    from ldm_rt.reference.checkpoints import load_model
    from ldm_rt.reference.lora import fuse_loras
    from ldm_rt.runtime.lora import LoraError, LoraSpec

    _, _, files = setup
    with pytest.raises(LoraError, match="another architecture"):
        fuse_loras(load_model(tiny_sd_v1), [LoraSpec(files["kohya"], 1.0)])
