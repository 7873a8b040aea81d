"""Image-folder dataset: `name.png` + `name.txt` caption beside it (the SD fine-tuning convention).

Items are addressed by an unlimited index, like the procedural data: index i is file perm_e[i mod n] of
epoch e = i // n (a fresh permutation per epoch from the seed), and the random crop/flip of item i come
from (seed, i). So a trainer's data position is one integer and resuming replays nothing twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_rt.runtime.images import ImageInputError, as_rgb_array, open_image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_CAPTION_BYTES = 64 * 1024  # read no further: the tokenizer keeps a few dozen tokens of a caption anyway


class DataError(ValueError):
    """A dataset cannot be read; the message names the path and what to do."""


@dataclass(frozen=True)
class FolderSample:
    image: torch.Tensor  # (3, H, W) float32 in [-1, 1]
    caption: str
    path: Path


def list_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder; pass a folder of images")
    try:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as e:
        raise DataError(f"image folder {root} is not readable ({e}); check its permissions") from None
    if not files:
        raise DataError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}); add some or fix the path")
    return files


def split_files(files: list[Path], heldout_fraction: float, split: str) -> list[Path]:
    """A fixed held-out subset: every file whose position in a seeded permutation falls in the first
    `heldout_fraction` (at least one file when the fraction is > 0)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if heldout_fraction <= 0:
        return files if split == "train" else []
    order = np.random.default_rng(12345).permutation(len(files))
    n_held = max(1, int(round(heldout_fraction * len(files))))
    held = set(order[:n_held].tolist())
    chosen = [f for i, f in enumerate(files) if (i in held) == (split == "heldout")]
    if not chosen:
        raise DataError(f"{len(files)} images are too few to hold out {heldout_fraction:.0%}; add images or lower data.heldout_fraction")
    return chosen


def load_image(path: Path, resolution: int, center_crop: bool, rng: np.random.Generator, flip: bool) -> torch.Tensor:
    """Resize the shorter side to `resolution`, crop a square (centre or random), maybe flip -> (3, R, R).
    The size is checked from the header before decoding; 16-bit and float images are scaled, not clipped."""
    try:
        pixels = as_rgb_array(open_image(path, "training image"), "training image")  # (H, W, 3) uint8
    except ImageInputError as e:
        message = str(e) if str(path) in str(e) else f"{path}: {e}"
        raise DataError(f"{message} (or remove the file from the data folder)") from None
    im = Image.fromarray(pixels)
    w, h = im.size
    scale = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = im.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = int(rng.integers(w - resolution + 1)), int(rng.integers(h - resolution + 1))
    im = im.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(im, dtype=np.float32)  # (R, R, 3)
    if flip:
        pixels = pixels[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1) / 127.5 - 1.0  # (3, R, R)


def read_caption(image: Path) -> str:
    """The UTF-8 text of the .txt caption beside `image`, stripped; "" when there is none."""
    path = image.with_suffix(".txt")
    if not path.is_file():
        return ""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CAPTION_BYTES + 1)
        if len(data) > MAX_CAPTION_BYTES:
            raise DataError(f"caption {path} is over {MAX_CAPTION_BYTES // 1024} KiB; a caption is a sentence or a few, shorten it")
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"caption {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read caption {path} ({e.strerror}); fix its permissions or remove it") from None


class ImageFolderDataset:
    def __init__(
        self,
        root: str | Path,
        resolution: int = 64,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        split: str = "train",
        heldout_fraction: float = 0.0,
    ) -> None:
        self.root = Path(root)
        self.files = split_files(list_images(root), heldout_fraction, split)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self._epoch = -1
        self._order = np.arange(len(self.files))
        missing = sum(not f.with_suffix(".txt").is_file() for f in self.files)
        if missing:
            logger.info("%d of %d images in %s have no .txt caption; they get the empty caption", missing, len(self.files), root)

    def __len__(self) -> int:
        return len(self.files)

    def file_for(self, index: int) -> Path:
        epoch, position = divmod(index, len(self.files))
        if self._epoch != epoch:  # consecutive indices share an epoch: permute once per epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
            self._epoch = epoch
        return self.files[int(self._order[position])]

    def __getitem__(self, index: int) -> FolderSample:
        path = self.file_for(index)
        rng = np.random.default_rng([self.seed, index, 1])
        flip = self.random_flip and bool(rng.random() < 0.5)
        image = load_image(path, self.resolution, self.center_crop, rng, flip)
        return FolderSample(image, read_caption(path), path)
