"""Step previews: the image as it forms, from the model's x0 estimate at chosen steps (run.denoised).

Two kinds:
- "fast": a per-model linear map from the latent's C channels to RGB (+ bias), fitted at export against the
  model's own VAE (export/preview_fit.py; `preview_factors.json`, listed in the manifest with its sha256), at
  latent resolution and repeated to the image size (nearest: a UI swaps it in place of the final image, pooling
  it gives the map's values back exactly, and no detail is made up; a UI wanting it smoother scales it itself).
  It costs a few numpy operations per preview, nothing beside a UNet step.
- "full": the VAE decoder on x0, exact; one decode per preview (the shipped model: about one UNet step; SD at
  512 px on a CPU: several).

At the schedule's last step the preview is of the final latents themselves (what the run returns), so a "full"
preview then is the final image (inpainting's paste-back included) and costs no second decode.

A folder built before previews has no factors: "fast" then falls back to "full" with one log line. A preview
is a view of the same run: a service asking every model for "fast" gets an exact preview, slower, rather than an
error on older folders; the log line says to rebuild (or run export's refresh_preview_factors) for fast ones.
Factors that fit their VAE poorly (below POOR_FIT_DB held out) are used as asked, with one log line saying so.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .atomic import check_file_target
from .images import SOFTWARE, grid, write_png
from .manifest import ArtifactError, Manifest, json_object
from .params import GenerationError

log = logging.getLogger(__name__)

PREVIEW_FILE = "preview_factors.json"
FORMAT = "ldm-rt-preview-factors"
PREVIEW_KINDS = ("fast", "full")
# Ours is under 2 kB (C x 3 weights, 3 biases, the fit's figures); anything past this is not a factors file.
MAX_FACTORS_BYTES = 64 << 10
# preview(step_index, num_steps, images (B, H, W, 3) uint8) at the steps preview_every chooses, and the last.
PreviewCallback = Callable[[int, int, np.ndarray], None]
# The PNG text key that marks a preview file as ours (`ldm-rt sample --preview` replaces only such files).
PREVIEW_KEY = "ldm-rt preview"
# Below this held-out PSNR the map explains the VAE poorly, said once in the log. A judgement, not a measurement on
# SD: the shipped model's tiny f = 4 VAE scores 12.6 dB (its mean colour alone 11.2), an exactly linear decoder 100+.
POOR_FIT_DB = 15.0


@dataclass(frozen=True)
class PreviewFactors:
    """rgb = latents . weights + bias: (B, C, h, w) scaled latents -> (B, 3, h, w) in the decoder's [-1, 1] units."""

    weights: np.ndarray  # (C, 3) float32
    bias: np.ndarray  # (3,) float32
    fit: dict[str, Any]  # how well it fits (export/preview_fit.py): held-out PSNR and what it was fitted on

    def to_rgb(self, latents: np.ndarray) -> np.ndarray:
        rgb = np.einsum("bchw,ck->bkhw", latents.astype(np.float32), self.weights)  # (B, 3, h, w)
        return rgb + self.bias[None, :, None, None]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "weights": self.weights.tolist(), "bias": self.bias.tolist(), "fit": self.fit}

    @classmethod
    def from_dict(cls, d: dict[str, Any], channels: int, path: Path) -> PreviewFactors:
        """The factors in `d` for latents of `channels` channels; anything else is one ArtifactError naming the file."""
        try:
            weights = np.asarray(d["weights"], dtype=np.float32)
            bias = np.asarray(d["bias"], dtype=np.float32)
            fit = d.get("fit", {})
            ok = d.get("format") == FORMAT and weights.shape == (channels, 3) and bias.shape == (3,) and isinstance(fit, dict)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or not (np.all(np.isfinite(weights)) and np.all(np.isfinite(bias))):
            raise ArtifactError(
                f"{path} is not a preview factors file for {channels} latent channels (a {channels} x 3 'weights', 3 'bias', "
                "finite numbers); rebuild the artifacts"
            )
        return cls(weights, bias, fit)

    @classmethod
    def read(cls, folder: str | Path, manifest: Manifest) -> PreviewFactors | None:
        """The folder's factors as its manifest lists them (confined, bounded, sha256 checked); None when it lists none."""
        if manifest.preview_factors is None:
            return None
        data = manifest.read_file(folder, manifest.preview_factors, MAX_FACTORS_BYTES, "preview factors file")
        path = Path(folder) / manifest.preview_factors.file
        return cls.from_dict(json_object(data, path), manifest.facts.latent_channels, path)


def check_preview(preview: Any, every: Any, kind: Any) -> None:
    """generate()'s preview arguments, or one GenerationError naming the bad one."""
    if preview is not None and not callable(preview):
        raise GenerationError(f"preview must be a callable (step_index, num_steps, images), got {type(preview).__name__}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise GenerationError(f"preview_every must be an integer >= 1 (a preview every N steps), got {every!r}")
    if kind not in PREVIEW_KINDS:
        raise GenerationError(f"preview_kind must be one of {', '.join(PREVIEW_KINDS)}, got {kind!r}")


def due(i: int, num_steps: int, every: int) -> bool:
    """Whether step i (0-based) of num_steps gets a preview: every `every`-th step, and always the last."""
    return (i + 1) % every == 0 or i + 1 == num_steps


class Previewer:
    """One generate() call's previews. `decode`: scaled latents -> decoder output (B, 3, H, W); `finish`: decoder
    output -> the (B, H, W, 3) uint8 images (the same post-processing the final image gets); `factors` None: full."""

    def __init__(
        self, callback: PreviewCallback, every: int, factors: PreviewFactors | None, latent_factor: int,
        decode: Callable[[np.ndarray], np.ndarray], finish: Callable[[np.ndarray], np.ndarray], timings: dict[str, Any],
        defer_final: bool,
    ) -> None:  # fmt: skip
        self.callback = callback
        self.every = every
        self.factors = factors
        self.latent_factor = latent_factor
        self.decode = decode
        self.finish = finish
        self.timings = timings
        # "full" when the final image is decoded anyway: the last preview is that image, not a second decode.
        self.defer_final = defer_final and factors is None
        self.pending: tuple[int, int] | None = None

    def due(self, i: int, num_steps: int) -> bool:
        return due(i, num_steps, self.every)

    def show(self, i: int, num_steps: int, latents: np.ndarray, final: bool) -> None:
        """Preview step i from `latents` (x0, or the run's final latents when `final`)."""
        if final and self.defer_final:
            self.pending = (i, num_steps)
            return
        t0 = time.perf_counter()
        # An x0 estimate can be inf where the schedule's alpha_bar is 0 (epsilon-prediction at zero terminal SNR).
        latents = np.nan_to_num(latents.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if self.factors is not None:
            f = self.latent_factor
            decoded = self.factors.to_rgb(latents).repeat(f, axis=2).repeat(f, axis=3)  # (B, 3, H, W), nearest
        else:
            decoded = np.nan_to_num(self.decode(latents))
        images = self.finish(decoded)
        self.timings["preview"] = self.timings.get("preview", 0.0) + time.perf_counter() - t0
        self.callback(i, num_steps, images)

    def flush(self, images: np.ndarray) -> None:
        """The deferred last preview: the final images themselves."""
        if self.pending is not None:
            (i, num_steps), self.pending = self.pending, None
            self.callback(i, num_steps, images)


def is_preview_file(path: str | Path) -> bool:
    """Whether `path` is a PNG whose text says we wrote it as a preview (read from its header chunks only)."""
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and PREVIEW_KEY in im.info
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # not an image we can read: not ours
        return False


def check_preview_target(path: str | Path) -> Path:
    """A preview file path that is new or a preview we wrote (a user's file is never replaced): else ValueError."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--preview {path}: previews are written as PNG; give a name ending in .png")
    check_file_target(path)  # NotAFileTarget (an OSError naming the path) for a folder, device or FIFO
    if not (path.parent if str(path.parent) else Path(".")).is_dir():
        raise ValueError(f"--preview {path}: folder {path.parent} does not exist; create it first")
    if path.exists() and not is_preview_file(path):
        raise ValueError(f"--preview {path} exists and is not a preview ldm-rt wrote; choose a new file name (it is never overwritten)")
    return path


def write_preview(path: Path, images: np.ndarray, i: int, num_steps: int) -> None:
    """The step's preview (a batch as one grid) written atomically over the previous one, after checking again
    that `path` is still new or ours."""
    check_preview_target(path)
    write_png(path, images[0] if len(images) == 1 else grid(images), {PREVIEW_KEY: f"step {i + 1}/{num_steps}", "Software": SOFTWARE[0]})


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two decoder-unit images ([-1, 1] mapped to [0, 1] and clipped, as 8-bit output sees them)."""
    a, b = (np.clip((np.asarray(v, np.float64) + 1.0) / 2.0, 0.0, 1.0) for v in (a, b))
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


__all__ = [
    "PREVIEW_FILE", "PREVIEW_KEY", "PREVIEW_KINDS", "PreviewCallback", "PreviewFactors", "Previewer", "check_preview",
    "check_preview_target", "due", "is_preview_file", "psnr_db", "write_preview",
]  # fmt: skip
