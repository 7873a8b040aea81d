"""Small SDXL folders for the end-to-end tests (export -> runtime -> diffusers parity), where every UNet block
costs export time (tracing, graph clean-up, shape inference) but adds nothing the end-to-end path checks.

`make_small_sdxl(path, variant)` is tests/tiny_models.make_tiny_sdxl's folder (both encoders or a refiner's
second, tokenizers, VAE, scheduler, force_zeros/aesthetics flags, all saved by diffusers) with its UNet replaced
by a two-level one: no attention at the first level (as SDXL), one transformer block at the second, the same
text_time conditioning (pooled text_embeds + 6 or 5 Fourier-embedded time ids) and context width. The
per-level depth and the refiner's four-level layout are checked per component, against diffusers, by
tests/test_reference_unet_sdxl.py and tests/test_reference_sdxl_import.py on the full tiny models.
`time_cond_proj_dim` makes an LCM-distilled UNet (SDXL-LCM: guidance as a w-embedding) and `scheduler` swaps the
folder's scheduler class (as an LCM folder ships LCMScheduler), its config saved by diffusers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tiny_models import (
    ADD_EMBEDDING_GAIN,
    TINY_IMAGE_SIZE,
    TINY_SDXL_POOLED,
    TINY_SDXL_TEXT_2_DIM,
    TINY_SDXL_TEXT_DIM,
    TINY_SDXL_TIME_DIM,
    _randomise,
    _strengthen_unet,
    make_tiny_sdxl,
)


def small_sdxl_unet_config(refiner: bool, time_cond_proj_dim: int | None = None) -> dict[str, Any]:
    """diffusers UNet2DConditionModel kwargs: two levels of 64 and 128 channels (32 GroupNorm groups over at
    least 64 channels, so the time ids are not normalised away: see tiny_models._tiny_sdxl_unet_config)."""
    n_ids = 5 if refiner else 6
    config = dict(
        sample_size=TINY_IMAGE_SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=32, attention_head_dim=(2, 2),
        transformer_layers_per_block=1, use_linear_projection=True,
        cross_attention_dim=TINY_SDXL_TEXT_2_DIM if refiner else TINY_SDXL_TEXT_DIM + TINY_SDXL_TEXT_2_DIM,
        addition_embed_type="text_time", addition_time_embed_dim=TINY_SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=TINY_SDXL_POOLED + n_ids * TINY_SDXL_TIME_DIM,
    )  # fmt: skip
    if time_cond_proj_dim is not None:
        config["time_cond_proj_dim"] = time_cond_proj_dim
    return config


def make_small_sdxl(
    path: str | Path, variant: str = "base", seed: int = 0, *, time_cond_proj_dim: int | None = None,
    scheduler: str | None = None,
) -> Path:  # fmt: skip
    """A diffusers SDXL folder ("base", "refiner" or "turbo", as make_tiny_sdxl) with the small UNet above;
    `scheduler`: another diffusers scheduler class for the folder (e.g. "LCMScheduler"), from its saved config."""
    import diffusers
    from diffusers import UNet2DConditionModel

    path = make_tiny_sdxl(path, variant, seed)
    unet = UNet2DConditionModel(**small_sdxl_unet_config(variant == "refiner", time_cond_proj_dim))
    generator = torch.Generator().manual_seed(seed + 100)
    _randomise(unet, generator)
    _strengthen_unet(unet)
    with torch.no_grad():  # as make_tiny_sdxl: the micro-conditioning must move the image
        for name, p in unet.named_parameters():
            if name.startswith("add_embedding.") and name.endswith("weight"):
                p.mul_(ADD_EMBEDDING_GAIN)
    shutil.rmtree(path / "unet")
    unet.save_pretrained(str(path / "unet"), safe_serialization=True)
    if scheduler is not None:  # the class in both places diffusers reads it: scheduler_config.json and model_index.json
        getattr(diffusers, scheduler).from_pretrained(str(path / "scheduler")).save_config(str(path / "scheduler"))
        index = json.loads((path / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", scheduler]
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


SIZE = 32  # pixels the small SDXL artifacts are built for (latents 16 x 16); the profile is static at this size
# Up to two images per call (opt 1): tests/test_native_sdxl.py samples batches of two; the ONNX graphs are dynamic
# either way, so the range costs no export time.
PROFILE_FLAGS = ["--batch-range", "1:1:2", "--height-range", str(SIZE), "--width-range", str(SIZE)]
_ARTIFACTS: dict[tuple[str, str], tuple[Path, Path, str]] = {}


def small_sdxl_artifacts(tmp_path_factory, variant: str) -> tuple[Path, Path, str]:
    """(folder, artifacts, the export's stdout) of the small "base" or "refiner", exported once per session for every
    test file that asks (they cost most of the SDXL tests' time). The base goes through the export CLI
    (`build_engines.py --onnx-only`, fp32 parity per component, the ONNX Runtime attention variant); the refiner
    through the build API without that variant."""
    import contextlib
    import io

    from ldm_rt.export import build_engines
    from ldm_rt.export.build import BuildOptions, build
    from ldm_rt.runtime.contracts import ShapeProfile

    key = (str(tmp_path_factory.getbasetemp()), variant)
    if key not in _ARTIFACTS:
        folder = make_small_sdxl(tmp_path_factory.mktemp(f"small_sdxl_{variant}"), variant, seed=0 if variant == "base" else 1)
        out = tmp_path_factory.mktemp(f"small_sdxl_{variant}_artifacts") / "artifacts"
        stdout = io.StringIO()
        if variant == "base":
            err = io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(err):
                code = build_engines.main(["--model", str(folder), "--out", str(out), "--onnx-only", *PROFILE_FLAGS])
            assert code == 0, err.getvalue()
        else:
            build(BuildOptions(model=folder, out=out, profile=ShapeProfile.static(1, SIZE, SIZE), onnx_only=True, ort_variant=False, progress=False))
        _ARTIFACTS[key] = (folder, out, stdout.getvalue())
    return _ARTIFACTS[key]


# Session fixtures (registered for the suite by tests/conftest.py): every test file that needs the small SDXL base or
# refiner export takes these instead of exporting its own; a file that needs other weights (a LoRA fused at export,
# an LCM UNet, a ControlNet beside the UNet) keeps its own export.
@pytest.fixture(scope="session")
def small_sdxl_base(tmp_path_factory) -> tuple[Path, Path, str]:
    """(folder, artifacts, the export's stdout) of the small SDXL base: batch 1-2 at SIZE x SIZE."""
    return small_sdxl_artifacts(tmp_path_factory, "base")


@pytest.fixture(scope="session")
def small_sdxl_refiner(tmp_path_factory) -> tuple[Path, Path, str]:
    """(folder, artifacts, "") of the small SDXL refiner: batch 1 at SIZE x SIZE."""
    return small_sdxl_artifacts(tmp_path_factory, "refiner")
