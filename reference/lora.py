"""LoRA on the PyTorch reference: the table of modules a LoRA may target, and fusing LoRA deltas into the weights.

Parsing, names and the delta arithmetic are the runtime's (runtime/lora.py: one owner, no torch); this module
supplies what only the reference knows: which modules exist, under which names. Our UNet uses the original
(ldm/sgm) module names and its diffusers names come from `keymap_unet.unet_key_map` (the one owner of that
fact); the text encoders keep transformers' names, with `text_model.` optional (transformers 5 saves
CLIPTextModel without that level).

    loaded = load_model("sd15/")
    records = fuse_loras(loaded, [LoraSpec(Path("style.safetensors"), 0.8)])   # weights changed in place
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm_rt.runtime.lora import (
    PICKLE_SUFFIXES,
    LoraError,
    LoraFile,
    LoraSpec,
    ModuleDelta,
    ModuleInfo,
    lazy_deltas,
    read_lora,
    records,
)

from .keymap_unet import unet_key_map
from .ldm import LatentDiffusion
from .model_folder import LoadedModel

TEXT_PREFIX = "text_model."
TARGET_TYPES = (nn.Linear, nn.Conv2d)


def _targets(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(m.weight.shape) for name, m in module.named_modules() if isinstance(m, TARGET_TYPES)}


def lora_module_table(model: LatentDiffusion) -> dict[str, dict[str, ModuleInfo]]:
    """component -> our module name -> (weight shape, other names), for every Linear and Conv2d a LoRA may adapt.
    Component names are the export's (contract names): unet, text_encoder, text_encoder_2."""
    table: dict[str, dict[str, ModuleInfo]] = {}
    key_map = unet_key_map(model.unet.config)
    table["unet"] = {
        name: ModuleInfo(shape, (key_map[f"{name}.weight"].removesuffix(".weight"),))
        for name, shape in _targets(model.unet).items()
    }
    for component in ("text_encoder", "text_encoder_2"):
        encoder = getattr(model, component, None)
        if encoder is not None:
            table[component] = {
                name: ModuleInfo(shape, (name.removeprefix(TEXT_PREFIX),) if name.startswith(TEXT_PREFIX) else ())
                for name, shape in _targets(encoder).items()
            }
    return table


def read_lora_any(path: str | Path) -> LoraFile:
    """A LoRA file for the reference and the export: .safetensors as the runtime reads it, or a .pt/.ckpt
    through torch.load(weights_only=True) (tensors only; any other object in the pickle is refused)."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return read_lora(path)
    import hashlib

    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError: all mean an unusable file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoraError(f"LoRA {path} cannot be read as a tensors-only pickle ({first[:120]}); convert it to .safetensors") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoraError(f"LoRA {path} is not a dictionary of tensors; convert it to .safetensors")
    tensors = {str(k): v.detach().to(torch.float32).numpy() for k, v in data.items()}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return LoraFile(path, digest, tensors, {})


def load_lora_files(specs: Sequence[LoraSpec]) -> list[tuple[LoraFile, float]]:
    return [(read_lora_any(s.path), s.scale) for s in specs]


@torch.no_grad()
def fuse_deltas(model: LatentDiffusion, deltas: dict[str, dict[str, ModuleDelta]]) -> int:
    """W += delta for every module named in `deltas` (runtime.lora.lazy_deltas: each computed in float32 as its
    weight is fused, stored in the weight's dtype, so one module's delta is in memory at a time).
    Returns the number of weights changed."""
    n = 0
    for component, modules in deltas.items():
        root = getattr(model, component)
        named = dict(root.named_modules())
        for name, delta in modules.items():
            weight = named[name].weight
            fused = weight.float() + torch.from_numpy(np.ascontiguousarray(delta.array())).reshape(weight.shape)
            weight.copy_(fused.to(weight.dtype))
            n += 1
    return n


def fuse_lora_files(loaded: LoadedModel | LatentDiffusion, files: Sequence[tuple[LoraFile, float]]) -> list[dict]:
    """Fuse LoRA files already read (each at its scale; they add up) into the model's weights, in place.
    Returns what manifests record of each: file name, sha256, scale. A LoraError when one does not fit."""
    model = loaded.model if isinstance(loaded, LoadedModel) else loaded
    fuse_deltas(model, lazy_deltas(files, lora_module_table(model)))
    return records(files)


def fuse_loras(loaded: LoadedModel | LatentDiffusion, specs: Sequence[LoraSpec]) -> list[dict]:
    """Read and fuse every LoRA of `specs` (fuse_lora_files). A LoraError (one line) on a bad file."""
    return fuse_lora_files(loaded, load_lora_files(specs))
