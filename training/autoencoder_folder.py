"""The autoencoder trainer's product, which the LDM trainer reads as its frozen first stage.

    <folder>/
      autoencoder.json         {"config": AutoencoderConfig, "info": {"step", "heldout_psnr", ...}}
      autoencoder.safetensors  original SD key layout (`encoder.down.0.block.0.norm1.weight`, ...)

`load_autoencoder` also takes an ldm-rt model folder and uses its autoencoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ldm_rt.reference.autoencoder import AutoencoderKL, VQModel
from ldm_rt.reference.checkpoint_errors import CheckpointError
from ldm_rt.reference.configs import AutoencoderConfig, ConfigError
from ldm_rt.reference.model_folder import is_model_folder, load_model_folder, load_strict
from ldm_rt.runtime.atomic import atomic_directory

from .io_errors import naming

AE_JSON = "autoencoder.json"
AE_WEIGHTS = "autoencoder.safetensors"


def build_autoencoder(config: AutoencoderConfig) -> AutoencoderKL | VQModel:
    return AutoencoderKL(config) if config.kind == "kl" else VQModel(config)


def save_autoencoder(path: str | Path, ae: AutoencoderKL | VQModel, info: dict[str, Any]) -> None:
    with naming(path), atomic_directory(path) as tmp:
        (tmp / AE_JSON).write_text(json.dumps({"config": ae.config.to_dict(), "info": info}, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in ae.state_dict().items()}, str(tmp / AE_WEIGHTS))


def load_autoencoder(path: str | Path) -> tuple[AutoencoderKL | VQModel, dict[str, Any]]:
    """-> (autoencoder in eval mode, info). `path`: an autoencoder folder or an ldm-rt model folder."""
    path = Path(path)
    if is_model_folder(path):
        loaded = load_model_folder(path)
        return loaded.model.autoencoder.eval(), {"source": str(path), **loaded.info}
    if not (path / AE_JSON).is_file():
        raise CheckpointError(f"{path} holds no {AE_JSON} and is not an ldm-rt model folder; point --ae at the autoencoder run's 'autoencoder' folder")
    try:
        meta = json.loads((path / AE_JSON).read_text())
        config = AutoencoderConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path / AE_JSON} is not a valid autoencoder description ({e}); re-run the autoencoder trainer") from None
    ae = build_autoencoder(config)
    try:
        state = load_file(str(path / AE_WEIGHTS))
    except Exception as e:  # safetensors raises several types for a missing or corrupt file
        raise CheckpointError(f"{path / AE_WEIGHTS} is not a readable safetensors file ({e})") from None
    load_strict(ae, state, where=str(path / AE_WEIGHTS))
    return ae.eval(), meta.get("info", {})
