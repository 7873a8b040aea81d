"""Which data a trainer reads (`DataConfig`) and how a step's batch is cut from it.

Both datasets are addressed by an unlimited integer index, so a run's data position is the number of
samples consumed so far; step batches are consecutive index ranges, and each process takes every
world-th index of its range (like torch's DistributedSampler), so shards never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config_loading import MAX_SEED
from .data_folder import DataError, ImageFolderDataset
from .data_shapes import ShapesDataset

HELDOUT_SEED_OFFSET = 1_000_003  # procedural held-out data: a seed no training run uses
# Training images are resized to this side at most: twice SDXL's 1024, beyond any first stage trained here;
# a typo guard so a huge value fails at once rather than allocating the batch.
MAX_RESOLUTION = 2048


@dataclass(frozen=True)
class DataConfig:
    kind: str = "shapes"  # "shapes" (procedural, data_shapes.py) or "folder" (image + .txt caption)
    path: str | None = None  # the image folder (kind "folder")
    resolution: int = 64
    seed: int = 0  # the data stream; the held-out stream is seed + HELDOUT_SEED_OFFSET (shapes)
    say_probability: float = 0.7  # shapes: chance that size / position / background are said in the caption
    center_crop: bool = True  # folder: centre crop after resizing the shorter side; False: random crop
    random_flip: bool = False  # folder: horizontal flip with p=0.5 (never for shapes: "left" would lie)
    heldout_fraction: float = 0.02  # folder: fraction of files kept out of training for evaluation

    def __post_init__(self) -> None:
        if self.kind not in ("shapes", "folder"):
            raise DataError(f"data.kind must be 'shapes' or 'folder', got {self.kind!r}")
        if self.kind == "folder" and not self.path:
            raise DataError("data.kind is 'folder' but data.path is not set; set data.path to an image folder")
        if not 8 <= self.resolution <= MAX_RESOLUTION:
            raise DataError(f"data.resolution {self.resolution} is out of range; use 32 to {MAX_RESOLUTION}")
        if not 0 <= self.seed <= MAX_SEED:
            raise DataError(f"data.seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if not 0.0 <= self.say_probability <= 1.0:  # also refuses NaN
            raise DataError(f"data.say_probability must be in [0, 1], got {self.say_probability}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise DataError(f"data.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


def make_dataset(config: DataConfig, split: str = "train") -> ShapesDataset | ImageFolderDataset | None:
    """split "train" or "heldout" (held-out images for the PSNR report; None if a folder holds none out)."""
    if config.kind == "folder" and split == "heldout" and config.heldout_fraction == 0:
        return None
    if config.kind == "shapes":
        seed = config.seed if split == "train" else config.seed + HELDOUT_SEED_OFFSET
        return ShapesDataset(seed=seed, resolution=config.resolution, say_probability=config.say_probability)
    return ImageFolderDataset(
        config.path,  # type: ignore[arg-type]
        resolution=config.resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip and split == "train",
        seed=config.seed,
        split=split,
        heldout_fraction=config.heldout_fraction,
    )


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    captions: list[str]
    labels: torch.Tensor | None  # (B,) int64 class labels (shapes only), else None


def shard_indices(position: int, global_batch: int, rank: int, world_size: int) -> range:
    """This process's indices of the step batch that starts at data position `position`."""
    return range(position + rank, position + global_batch, world_size)


def get_batch(dataset, indices) -> Batch:
    samples = [dataset[i] for i in indices]
    labels = None
    if isinstance(dataset, ShapesDataset):
        labels = torch.tensor([ShapesDataset.class_label(s.attributes) for s in samples], dtype=torch.int64)
    return Batch(torch.stack([s.image for s in samples]), [s.caption for s in samples], labels)
