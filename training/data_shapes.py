"""Procedural text-to-image data: one coloured shape on a plain background, with a caption.

Caption grammar: `a {size} {color} {shape} {position} on a {background} background`; size, position and
background are each optional in the caption (an omitted attribute is still drawn, just not said), colour
and shape are always said. Every sample is a pure function of (seed, index), so the data is unlimited,
identical across runs and machines, and shards by index across processes.

Drawing is numpy only: each shape is rasterised at SUPERSAMPLE x the resolution and box-filtered down,
which gives anti-aliased edges. `classify_image` inverts the drawing (colour, background, position,
size, shape) and scores generated images later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

SIZES = ("small", "large")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 205, 40),
    "purple": (135, 50, 165),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # phrase -> centre as a fraction of the image side (x, y)
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}

RESOLUTION = 64
SUPERSAMPLE = 4
# Half-side of the shape's bounding box as a fraction of the image side; jittered within each range so the
# data is not just 540 fixed pictures. The ranges are far apart so `classify_image` can tell them apart.
HALF_SIZE = {"small": (0.10, 0.13), "large": (0.18, 0.22)}
POSITION_JITTER = 0.03  # of the image side, each axis
COLOR_JITTER = 10  # per channel, uniform +-


@dataclass(frozen=True)
class ShapeAttributes:
    size: str
    color: str
    shape: str
    position: str
    background: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class ShapeSample:
    image: torch.Tensor  # (3, H, W) float32 in [-1, 1]
    caption: str
    attributes: ShapeAttributes


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce, in a fixed order (the word-level tokenizer's vocab)."""
    words: list[str] = ["a", "on", "background"]
    for group in (SIZES, COLORS, SHAPES, *(p.split() for p in POSITIONS), BACKGROUNDS):
        for w in group:
            if w not in words:
                words.append(w)
    return words


def caption_for(attrs: ShapeAttributes, say_size: bool = True, say_position: bool = True, say_background: bool = True) -> str:
    parts = ["a"]
    if say_size:
        parts.append(attrs.size)
    parts += [attrs.color, attrs.shape]
    if say_position:
        parts.append(attrs.position)
    if say_background:
        parts += ["on a", attrs.background, "background"]
    return " ".join(parts)


def sample_attributes(rng: np.random.Generator) -> ShapeAttributes:
    return ShapeAttributes(
        size=SIZES[rng.integers(len(SIZES))],
        color=list(COLORS)[rng.integers(len(COLORS))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        position=list(POSITIONS)[rng.integers(len(POSITIONS))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
    )


def _coverage(shape: str, cx: float, cy: float, half: float, resolution: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (H, W) in [0, 1]: supersampled point tests, box-filtered."""
    n = resolution * SUPERSAMPLE
    # Sub-pixel sample centres in pixel units.
    coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    x = coords[None, :]
    y = coords[:, None]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":
        # Apex up, base 2*half wide, height 2*half, centroid (not box centre) at (cx, cy) so that the
        # classifier's centroid lands on the anchor: apex at cy - 4/3 half, base at cy + 2/3 half.
        t = (y - (cy - 4 * half / 3)) / (2 * half)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * half)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    inside = inside.astype(np.float32)
    return inside.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))  # (H, W)


def render(attrs: ShapeAttributes, rng: np.random.Generator, resolution: int = RESOLUTION) -> np.ndarray:
    """Draw the attributes (with small random jitter of size, position and colour) -> uint8 (H, W, 3)."""
    lo, hi = HALF_SIZE[attrs.size]
    half = rng.uniform(lo, hi) * resolution
    fx, fy = POSITIONS[attrs.position]
    cx = (fx + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * resolution
    cy = (fy + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * resolution
    color = np.clip(np.array(COLORS[attrs.color], np.float32) + rng.uniform(-COLOR_JITTER, COLOR_JITTER, 3), 0, 255)
    background = np.array(BACKGROUNDS[attrs.background], np.float32)
    alpha = _coverage(attrs.shape, cx, cy, half, resolution)[..., None]  # (H, W, 1)
    image = background * (1 - alpha) + color * alpha
    return np.round(image).astype(np.uint8)


def make_sample(seed: int, index: int, resolution: int = RESOLUTION, say_probability: float = 0.7) -> ShapeSample:
    """Sample `index` of the stream `seed`: a pure function of both."""
    rng = np.random.default_rng([seed, index])
    attrs = sample_attributes(rng)
    say = rng.random(3) < say_probability
    caption = caption_for(attrs, say_size=bool(say[0]), say_position=bool(say[1]), say_background=bool(say[2]))
    pixels = render(attrs, rng, resolution)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)
    return ShapeSample(image, caption, attrs)


class ShapesDataset:
    """Unlimited deterministic stream: item i of seed s is `make_sample(s, i)`.

    `class_label` maps attributes to an integer for class-conditional models (colour x shape, 18 classes).
    """

    num_classes = len(COLORS) * len(SHAPES)

    def __init__(self, seed: int = 0, resolution: int = RESOLUTION, say_probability: float = 0.7) -> None:
        if resolution < 8:
            raise ValueError(f"shapes resolution {resolution} is too small; use 32 or more")
        self.seed = seed
        self.resolution = resolution
        self.say_probability = say_probability

    def __getitem__(self, index: int) -> ShapeSample:
        return make_sample(self.seed, index, self.resolution, self.say_probability)

    @staticmethod
    def class_label(attrs: ShapeAttributes) -> int:
        return list(COLORS).index(attrs.color) * len(SHAPES) + SHAPES.index(attrs.shape)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    table = np.array([palette[n] for n in names], np.float32)
    return names[int(np.argmin(((table - rgb[None, :]) ** 2).sum(axis=1)))]


def classify_image(rgb: np.ndarray) -> ShapeAttributes:
    """Read the attributes back from an image (uint8 (H, W, 3)), generated or drawn.

    background: median of the border pixels -> nearest background colour; shape pixels: those farther from
    the background than half the largest distance; colour: their median -> nearest palette colour;
    position: their centroid -> nearest anchor; size: side of the bounding square of their area, via the
    fill ratio of the bounding box (square 1, circle pi/4, triangle 1/2), which also gives the shape.
    """
    img = np.asarray(rgb, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"classify_image wants an (H, W, 3) RGB array, got shape {img.shape}")
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (2W + 2H, 3)
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)

    distance = np.sqrt(((img - bg_rgb) ** 2).sum(axis=2))  # (H, W)
    mask = distance > 0.5 * max(float(distance.max()), 1.0)
    ys, xs = np.nonzero(mask)
    if not len(xs):
        raise ValueError("classify_image found no shape: every pixel is as close to the background as the farthest one")
    color = _nearest(np.median(img[mask], axis=0), COLORS)

    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    anchors = list(POSITIONS)
    position = anchors[int(np.argmin([(cx - POSITIONS[a][0]) ** 2 + (cy - POSITIONS[a][1]) ** 2 for a in anchors]))]

    box_area = float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    fill = mask.sum() / box_area
    shape = "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"
    side = np.sqrt(box_area) / max(h, w)  # bounding-box side as a fraction of the image
    threshold = HALF_SIZE["small"][1] + HALF_SIZE["large"][0]  # midway between small and large, full side
    size = "large" if side > threshold else "small"
    return ShapeAttributes(size=size, color=color, shape=shape, position=position, background=background)
