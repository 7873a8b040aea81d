"""Sample grids as PNG (written atomically), for the trainers' periodic previews."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_rt.runtime.atomic import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, pad: int = 2) -> None:
    """Tile (B, 3, H, W) images in [-1, 1] into rows of `nrow` with a white gap, save as PNG."""
    pixels = to_uint8(images)
    b, h, w, _ = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = pixels[i]
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())  # an OSError names `path` (runtime.atomic.naming)
