"""A diffusers SD v1 folder written as one original-layout checkpoint (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.*`), the single `.safetensors` file that
stable-diffusion.cpp (and A1111, ComfyUI) load. The renaming is ldm-rt's own key maps run backwards
(reference/keymap_unet.py, keymap_autoencoder.py), which check every key and shape on the way; the weights are
written in fp16 by default, as the SD 1.5 checkpoints its users download. One component is held at a time.

    python -m benchmarks.single_file DIFFUSERS_DIR OUT.safetensors [--dtype f32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DTYPES = ("f16", "f32")


def diffusers_to_single_file(folder: Path, out: Path, dtype: str = "f16") -> Path:
    """Write `out` (a new file; an existing one is refused) from the diffusers folder `folder`."""
    import torch
    from safetensors.torch import load_file, save_file

    from ldm_rt.reference.checkpoints import UNET_PREFIX, VAE_PREFIX, hf_text_keys
    from ldm_rt.reference.keymap_autoencoder import autoencoder_config_from_diffusers, autoencoder_state_dict_from_diffusers
    from ldm_rt.reference.keymap_text_encoder import SD_V1_PREFIX
    from ldm_rt.reference.keymap_unet import unet_config_from_diffusers, unet_state_dict_from_diffusers

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out} exists; remove it or choose another output path")
    to = torch.float16 if dtype == "f16" else torch.float32

    def config(part: str) -> dict:
        return json.loads((folder / part / "config.json").read_text())

    def weights(part: str, name: str) -> dict:
        return load_file(str(folder / part / name))

    state: dict = {}
    unet = unet_state_dict_from_diffusers(weights("unet", "diffusion_pytorch_model.safetensors"), unet_config_from_diffusers(config("unet")))
    state.update({UNET_PREFIX + k: v.to(to) for k, v in unet.items()})
    del unet
    vae = autoencoder_state_dict_from_diffusers(weights("vae", "diffusion_pytorch_model.safetensors"), autoencoder_config_from_diffusers(config("vae")))
    state.update({VAE_PREFIX + k: v.to(to) for k, v in vae.items()})
    del vae
    text = hf_text_keys(weights("text_encoder", "model.safetensors"))
    state.update({SD_V1_PREFIX + k: v.to(to) for k, v in text.items()})
    del text
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/single_file.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="diffusers StableDiffusionPipeline folder (SD v1)")
    parser.add_argument("out", type=Path, help="the .safetensors file to write (must not exist)")
    parser.add_argument("--dtype", choices=DTYPES, default="f16", help="weight type (default f16, as users' SD 1.5 files)")
    args = parser.parse_args(argv)
    try:
        print(diffusers_to_single_file(args.folder, args.out, args.dtype))
    except (OSError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
