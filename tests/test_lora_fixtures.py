"""LoRA files for the LoRA tests, made the way users get them (imported by tests/test_lora_*.py).

- `make_peft_lora`: diffusers / PEFT layout. The UNet part is made by `peft` itself (LoraConfig on the
  diffusers UNet of a tiny SD folder, `get_peft_model_state_dict`), alpha != rank, stored in the file's
  `lora_adapter_metadata` as diffusers' `save_lora_weights` writes it; LoCon included (`conv1` of every
  ResnetBlock: a 3x3 down, 1x1 up). transformers 5 refuses peft 0.21 for text-encoder adapters, so the
  text-encoder part is drawn directly in PEFT's key layout.
- `make_kohya_lora`: a second PEFT LoRA (other modules, rank, alpha) converted to kohya / A1111 layout by
  diffusers' own converter (`convert_state_dict_to_kohya`), whose `.alpha` keys (it writes alpha = rank) are
  then set to the true alpha; text encoder as `lora_te_*`.

Each maker also writes a UNet-only copy for the oracle (diffusers' `load_lora_weights`, which with
transformers 5 cannot take the text-encoder part) and returns the text-encoder tensors so the test computes
the oracle's fused text-encoder weights itself (`fuse_text_encoder_oracle`), independently of ldm-rt's code.
LoRA matrices are drawn large (the delta about the size of the weight) so that a LoRA, and its scale,
visibly move the image; tests/test_lora_parity.py measures that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

PEFT_UNET_TARGETS = ["to_q", "to_v", "to_out.0", "proj_in", "conv1"]  # conv1: LoCon (3x3)
KOHYA_UNET_TARGETS = ["to_k", "ff.net.2", "proj_out", "conv2", "time_emb_proj"]
PEFT_TE_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1")
KOHYA_TE_TARGETS = ("self_attn.k_proj", "self_attn.out_proj", "mlp.fc2")


@dataclass
class MadeLora:
    file: Path  # what ldm-rt is given: UNet + text encoder
    unet_only: Path  # what diffusers' load_lora_weights is given
    rank: int
    alpha: float
    # text-encoder module (HF name) -> (down (r, in), up (out, r)) for the oracle's own fusion
    text_encoder: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _unet_lora(sd_folder: Path, targets: list[str], rank: int, alpha: float, seed: int, gain: float) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT's LoRA state dict (no prefix) of the diffusers UNet in sd_folder, randomised, and its config."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    unet.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * gain / rank**0.5)
    sd = {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    return sd, unet.peft_config["default"].to_dict()


def _text_lora(sd_folder: Path, targets: tuple[str, ...], rank: int, seed: int, gain: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    cfg = json.loads((sd_folder / "text_encoder" / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden), "self_attn.v_proj": (hidden, hidden),
              "self_attn.out_proj": (hidden, hidden), "mlp.fc1": (inter, hidden), "mlp.fc2": (hidden, inter)}  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(cfg["num_hidden_layers"]):
        for t in targets:
            o, i = shapes[t]
            down = torch.randn(rank, i, generator=g) / i**0.5
            up = torch.randn(o, rank, generator=g) * gain / rank**0.5
            out[f"text_model.encoder.layers.{layer}.{t}"] = (down, up)
    return out


def _jsonable(config: dict) -> dict:
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items() if k not in ("runtime_config",)}


def make_peft_lora(sd_folder: Path, out_dir: Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 1, gain: float = 1.0) -> MadeLora:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    unet, config = _unet_lora(sd_folder, PEFT_UNET_TARGETS, rank, alpha, seed, gain)
    te = _text_lora(sd_folder, PEFT_TE_TARGETS, rank, seed + 100, gain)
    unet_keys = {f"unet.{k}": v for k, v in unet.items()}
    te_keys = {}
    for module, (down, up) in te.items():
        te_keys[f"text_encoder.{module}.lora_A.weight"] = down
        te_keys[f"text_encoder.{module}.lora_B.weight"] = up
    te_config = {**_jsonable(config), "target_modules": sorted(t.split(".")[-1] for t in PEFT_TE_TARGETS)}
    meta_unet = {f"unet.{k}": v for k, v in _jsonable(config).items()}
    meta_all = {**meta_unet, **{f"text_encoder.{k}": v for k, v in te_config.items()}}
    full, unet_only = out_dir / "peft_lora.safetensors", out_dir / "peft_lora_unet.safetensors"
    save_file({**unet_keys, **te_keys}, str(full), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta_all, sort_keys=True)})
    save_file(unet_keys, str(unet_only), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta_unet, sort_keys=True)})
    return MadeLora(full, unet_only, rank, alpha, te)


def make_kohya_lora(sd_folder: Path, out_dir: Path, *, rank: int = 2, alpha: float = 1.0, seed: int = 2, gain: float = 1.0) -> MadeLora:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    unet, _ = _unet_lora(sd_folder, KOHYA_UNET_TARGETS, rank, alpha, seed, gain)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in unet.items()})
    kohya = {k: (torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}  # the converter writes alpha = rank
    te = _text_lora(sd_folder, KOHYA_TE_TARGETS, rank, seed + 100, gain)
    te_keys = {}
    for module, (down, up) in te.items():
        flat = "lora_te_" + module.replace(".", "_")
        te_keys.update({f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up, f"{flat}.alpha": torch.tensor(float(alpha))})
    full, unet_only = out_dir / "kohya_lora.safetensors", out_dir / "kohya_lora_unet.safetensors"
    save_file({**kohya, **te_keys}, str(full))
    save_file(kohya, str(unet_only))
    return MadeLora(full, unet_only, rank, alpha, te)


@torch.no_grad()
def fuse_text_encoder_oracle(text_encoder: torch.nn.Module, loras: list[tuple[MadeLora, float]]) -> None:
    """W += scale * alpha / rank * up @ down on a transformers CLIPTextModel, computed here from the tensors drawn."""
    named = dict(text_encoder.named_modules())
    for made, scale in loras:
        for module, (down, up) in made.text_encoder.items():
            m = named.get(module) or named[module.removeprefix("text_model.")]
            m.weight += scale * made.alpha / made.rank * (up @ down)


def test_kohya_conversion_keeps_the_true_alpha(tiny_sd_v1, tmp_path):
    from safetensors.torch import load_file

    made = make_kohya_lora(tiny_sd_v1, tmp_path, rank=2, alpha=1.0)
    sd = load_file(str(made.file))
    alphas = [v.item() for k, v in sd.items() if k.endswith(".alpha")]
    assert alphas and set(alphas) == {1.0}
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv2.") for k in sd)  # LoCon in kohya layout
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_mlp_fc2.") for k in sd)
