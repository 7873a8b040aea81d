"""Images in and out of the pipeline: float <-> uint8, input preparation, grids, PNGs that carry their parameters."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .atomic import atomic_write_bytes

# PNG text keys written for every image (a tEXt chunk each; iTXt when the value is not Latin-1).
TEXT_KEYS = ("prompt", "negative_prompt", "seed", "steps", "scheduler", "guidance", "model_hash")


class ImageInputError(ValueError):
    """An init image or mask cannot be used; the message says what to change."""


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """Decoder output (B, 3, H, W) in about [-1, 1] -> (B, H, W, 3) uint8, as diffusers' postprocessing."""
    x = np.clip((decoded.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return np.round(x.transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)  # (B, H, W, 3)


def as_rgb_array(image: np.ndarray | Image.Image | str | Path, what: str = "init image") -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image, a path, or an array (H, W, 3) uint8."""
    if isinstance(image, (str, Path)):
        image = open_image(image, what)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ImageInputError(f"{what} must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def as_mask_array(mask: np.ndarray | Image.Image | str | Path) -> np.ndarray:
    """(H, W) float32 in [0, 1] (1 = repaint, 0 = keep, as diffusers) from a PIL image, path or array."""
    if isinstance(mask, (str, Path)):
        mask = open_image(mask, "mask")
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[2] in (1, 3):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ImageInputError(f"mask must be (H, W) or (H, W, 1|3), got shape {arr.shape}")
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)


def open_image(path: str | Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (OSError, ValueError) as e:
        raise ImageInputError(f"cannot read {what} {path}: {e}") from None


def resize(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL Lanczos resize (what diffusers' VaeImageProcessor does) when the size differs; uint8 or float in [0, 1]."""
    if arr.shape[:2] == (height, width):
        return arr
    if arr.dtype == np.uint8:
        return np.asarray(Image.fromarray(arr).resize((width, height), Image.LANCZOS))
    image = Image.fromarray(arr.astype(np.float32), mode="F").resize((width, height), Image.LANCZOS)
    return np.clip(np.asarray(image), 0.0, 1.0)


def image_to_model(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1], the VAE encoder's input."""
    x = arr.astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)  # diffusers' order of operations
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # (1, 3, H, W)


def grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """(B, H, W, 3) -> one (rows*H, cols*W, 3) image, row-major, black where the grid is not full."""
    b, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    out = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
    for k in range(b):
        r, q = divmod(k, cols)
        out[r * h : (r + 1) * h, q * w : (q + 1) * w] = images[k]
    return out


def png_bytes(image: np.ndarray, text: Mapping[str, object]) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, str(value))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_png(path: str | Path, image: np.ndarray, text: Mapping[str, object]) -> None:
    """Write (H, W, 3) uint8 as PNG with `text` chunks; atomic, so a reader never sees half a file."""
    atomic_write_bytes(path, png_bytes(image, text))


def read_png_text(path: str | Path) -> dict[str, str]:
    with Image.open(path) as im:
        im.load()
        return dict(im.text)
