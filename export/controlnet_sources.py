"""The ControlNets an export adds (`--controlnet CN_SRC`, repeatable): loaded against the base model, checked to
fit it, and recorded for the manifest (path, weights sha256, layout).

A ControlNet is a diffusers ControlNetModel folder or an original single file (control_sd15_*, control_v11*),
read by reference/keymap_controlnet.load_controlnet. Each becomes the component controlnet_<k> in the order
given (runtime/contracts.add_controlnets); one made for another base model is refused in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm_rt.export.errors import SourceError
from ldm_rt.export.sources import Source, source_name, weights_sha256
from ldm_rt.reference.controlnet import ControlNetModel
from ldm_rt.reference.export_wrappers import controlnet_facts
from ldm_rt.reference.keymap_controlnet import load_controlnet
from ldm_rt.runtime.contracts import ControlNetFacts

# At most this many ControlNets per folder: each adds a pass as costly as the UNet's encoder to every step;
# diffusers' recipes combine two or three.
MAX_CONTROLNETS = 8


@dataclass
class ControlNetSource:
    model: ControlNetModel
    facts: ControlNetFacts
    record: dict[str, Any]  # what manifest.source["controlnets"] lists


def load_controlnets(paths: Sequence[Path], source: Source) -> list[ControlNetSource]:
    """The ControlNets at `paths` for the model in `source`, fp32, in order; SourceError (one line) for a missing
    or unreadable one, or one whose residuals, text width or control image do not fit this model."""
    if len(paths) > MAX_CONTROLNETS:
        raise SourceError(f"{len(paths)} ControlNets asked for, more than {MAX_CONTROLNETS}; combine fewer")
    facts = source.facts
    if paths and facts.context_length is None:
        raise SourceError(f"{source.path} has no text encoder; a ControlNet steers a text-conditioned UNet (SD 1.x/2.x, SDXL)")
    out = []
    for path in map(Path, paths):
        if not path.exists():
            raise SourceError(f"--controlnet {path} does not exist; pass a diffusers ControlNetModel folder or an original ControlNet file")
        try:
            model = load_controlnet(path, base=source.loaded.model.unet.config)
        except (ValueError, OSError) as e:  # CheckpointError / ConfigError: one line already
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"cannot use the ControlNet {path}: {text}") from None
        config = model.controlnet_config
        if config.unet.in_channels != facts.latent_channels:
            raise SourceError(
                f"the ControlNet {path} takes {config.unet.in_channels}-channel latents but {source.path} makes "
                f"{facts.latent_channels}: it was made for another base model"
            )
        if config.hint_factor != facts.latent_factor:
            raise SourceError(
                f"the ControlNet {path} reads control images {config.hint_factor}x the latent's size but the model's "
                f"autoencoder downsamples by {facts.latent_factor}: it was made for another base model"
            )
        if config.hint_channels != 3:
            raise SourceError(f"the ControlNet {path} takes {config.hint_channels}-channel control images; only RGB ones are supported")
        kind = "diffusers" if path.is_dir() else "single_file"
        record = {"kind": kind, "path": str(path.resolve()), "sha256": weights_sha256(path), "name": source_name(path)}
        if config.global_average_pooling:
            record["global_average_pooling"] = True
        out.append(ControlNetSource(model, controlnet_facts(model), record))
    return out
