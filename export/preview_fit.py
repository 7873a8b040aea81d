"""At export: the latent -> RGB map of fast step previews (runtime/previews.py), fitted for the model being built.

A1111's and ComfyUI's "Latent2RGB" previews use hand-written factors per model family, wrong for any other VAE.
Here the map is fitted on the model's own autoencoder: synthetic images (colour gradients, smooth colour fields,
flat colours and white, black or gray grounds, each with a few circles and rectangles of other colours) are
encoded with the build's VAE encoder and decoded with its decoder, and a least-squares fit takes the scaled latent
of each latent pixel (plus 1, the bias) to the decoded image average-pooled over that pixel's f x f block (each
fit image's latent is decoded once more with a little noise added, so every latent direction is seen). The fit is judged on held-out
images it did not see: PSNR of the map's preview against the pooled decode (`fit.psnr_db`), recorded in the file.

It runs the folder's fp32 ONNX files in ONNX Runtime, as the runtime opens them, so a folder built before
previews gets its factors without a rebuild (`refresh_preview_factors`), and what is fitted is what samples.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ldm_rt.export.errors import ExportError
from ldm_rt.export.parity import ort_session
from ldm_rt.runtime.artifacts import Artifacts
from ldm_rt.runtime.atomic import atomic_write_text
from ldm_rt.runtime.contracts import ModelFacts, ShapeProfile
from ldm_rt.runtime.images import image_to_model
from ldm_rt.runtime.manifest import ComponentEntry, FileEntry
from ldm_rt.runtime.previews import PREVIEW_FILE, PreviewFactors, psnr_db

FIT_IMAGES, HELD_OUT = 16, 16  # 16 x (h x w) latent pixels for 3 x (C + 1) unknowns; 16 other images judge the fit
# Each fit image is decoded a second time from its latent plus noise of this fraction of the latent's spread: encoded
# images need not span every latent direction (3 colours into C channels), but a sampler's x0 estimates do.
JITTER = 0.25
# Fitted at this side (within the profile, rounded to its multiple): enough pixels per image. Where the profile's
# smallest size is larger (SD: 256-1024), the images are tiles of this side on fewer canvases (`canvases`), so the
# fit costs about as many VAE calls on an SD-sized model at 1024 px as on a small one.
FIT_SIDE = 64
SEED = 0

Codec = Callable[[np.ndarray], np.ndarray]


def _lerp_grid(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """(g, g, 3) colours bilinearly stretched over (height, width, 3), corners on corners."""
    g = grid.shape[0]
    y, x = np.linspace(0, g - 1, height), np.linspace(0, g - 1, width)
    y0, x0 = np.minimum(y.astype(int), g - 2), np.minimum(x.astype(int), g - 2)
    wy, wx = (y - y0)[:, None, None], (x - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x0 + 1] * wx  # (H, W, 3)
    bottom = grid[y0 + 1][:, x0] * (1 - wx) + grid[y0 + 1][:, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


def synthetic_images(count: int, height: int, width: int, seed: int = SEED) -> np.ndarray:
    """(count, height, width, 3) uint8: a gradient, a smooth colour field, a flat colour or a white, black or gray
    ground (what photographs and drawings have behind their subject), with 1-3 shapes on it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)

    def colour() -> np.ndarray:  # a third saturated (the RGB cube's corners), the rest anywhere in it
        return rng.integers(0, 2, 3).astype(np.float64) if rng.random() < 1 / 3 else rng.uniform(0, 1, 3)

    images = []
    for k in range(count):
        if k % 4 == 0:
            a, b, angle = colour(), colour(), rng.uniform(0, 2 * np.pi)
            t = np.cos(angle) * xx + np.sin(angle) * yy
            t = (t - t.min()) / max(np.ptp(t), 1e-9)
            image = a + (b - a) * t[..., None]  # (H, W, 3)
        elif k % 4 == 1:
            image = _lerp_grid(np.stack([np.stack([colour() for _ in range(3)]) for _ in range(3)]), height, width)
        else:
            ground = colour() if k % 4 == 2 else np.full(3, rng.choice([0.0, 0.5, 1.0]))
            image = np.broadcast_to(ground, (height, width, 3)).copy()
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            r = rng.uniform(0.1, 0.35) * min(height, width)
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2 if rng.random() < 0.5 else (abs(yy - cy) <= r) & (abs(xx - cx) <= r * rng.uniform(0.5, 2))
            image[inside] = colour()
        images.append(image)
    return np.round(np.clip(np.stack(images), 0, 1) * 255).astype(np.uint8)


def canvases(count: int, height: int, width: int, seed: int = SEED) -> np.ndarray:
    """`count` synthetic images of FIT_SIDE tiled on as few (n, height, width, 3) canvases as hold them (the last
    row and column cropped); one image per canvas when a canvas is under two tiles a side."""
    t = FIT_SIDE
    if height < 2 * t or width < 2 * t:
        return synthetic_images(count, height, width, seed)
    rows, cols = -(-height // t), -(-width // t)
    n = -(-count // (rows * cols))
    tiles = synthetic_images(n * rows * cols, t, t, seed)  # (n * rows * cols, t, t, 3)
    grid = tiles.reshape(n, rows, cols, t, t, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, rows * t, cols * t, 3)
    return np.ascontiguousarray(grid[:, :height, :width])


def fit_side(pixels: tuple[int, int, int], multiple: int) -> int:
    """FIT_SIDE rounded up to `multiple`, within the profile's [min, max] (whose ends are multiples)."""
    lo, _, hi = pixels
    return min(max(-(-FIT_SIDE // multiple) * multiple, lo), hi)


def _pairs(
    images: np.ndarray, encode: Codec, decode: Codec, facts: ModelFacts, jitter: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(latent pixels (N, C), pooled decoded RGB (N, 3)) of `images`, one image per call; with `jitter`, each
    latent is decoded again with JITTER noise added (N twice as large)."""
    f, c = facts.latent_factor, facts.latent_channels
    xs, ys = [], []
    for image in images:
        # The scaled latent the UNet sees (the posterior mean for KL), as Pipeline._encode_image makes it.
        latent = (encode(image_to_model(image))[:, :c] * np.float32(facts.scale_factor)).astype(np.float32)  # (1, C, h, w)
        latents = [latent]
        if jitter is not None:
            noise = jitter.standard_normal(latent.shape) * JITTER * max(float(latent.std()), 1e-3)
            latents.append((latent + noise).astype(np.float32))
        for z in latents:
            decoded = decode(z).astype(np.float64)  # (1, 3, H, W)
            _, _, h, w = z.shape
            pooled = decoded.reshape(1, 3, h, f, w, f).mean(axis=(3, 5))  # (1, 3, h, w)
            xs.append(z[0].reshape(c, -1).T)
            ys.append(pooled[0].reshape(3, -1).T)
    return np.concatenate(xs).astype(np.float64), np.concatenate(ys)


def fit_factors(encode: Codec, decode: Codec, facts: ModelFacts, height: int, width: int) -> PreviewFactors:
    """Least squares latent (+1) -> pooled decode on FIT_IMAGES synthetic images, judged on HELD_OUT others."""
    fit_canvases, held_canvases = canvases(FIT_IMAGES, height, width, SEED), canvases(HELD_OUT, height, width, SEED + 1)
    x_fit, y_fit = _pairs(fit_canvases, encode, decode, facts, jitter=np.random.default_rng(SEED))
    x_held, y_held = _pairs(held_canvases, encode, decode, facts)
    solution, *_ = np.linalg.lstsq(np.concatenate([x_fit, np.ones((len(x_fit), 1))], axis=1), y_fit, rcond=None)  # (C + 1, 3)
    weights, bias = solution[:-1].astype(np.float32), solution[-1].astype(np.float32)
    predict = lambda x: x @ weights + bias  # noqa: E731  (N, 3)
    fit = {
        "psnr_db": round(psnr_db(predict(x_held), y_held), 2),  # held-out images: how good the previews are
        "psnr_db_fitted": round(psnr_db(predict(x_fit), y_fit), 2),  # the fit images, jittered latents included
        "images": FIT_IMAGES,
        "held_out": HELD_OUT,
        "canvases": len(fit_canvases) + len(held_canvases),
        "height": height,
        "width": width,
        "seed": SEED,
        "jitter": JITTER,
    }
    return PreviewFactors(weights, bias, fit)


def fit_onnx(encoder: Path, decoder: Path, facts: ModelFacts, profile: ShapeProfile) -> PreviewFactors:
    """fit_factors with the VAE's fp32 ONNX files in ONNX Runtime (opened as the runtime opens them)."""
    enc, dec = ort_session(encoder), ort_session(decoder)
    m = facts.pixel_multiple
    return fit_factors(
        lambda image: enc.run(["latent_parameters"], {"image": image})[0],
        lambda latent: dec.run(["image"], {"latent": latent})[0],
        facts, fit_side(profile.height, m), fit_side(profile.width, m),
    )  # fmt: skip


def record_preview_factors(root: Path, components: dict[str, ComponentEntry], facts: ModelFacts, profile: ShapeProfile) -> FileEntry | None:
    """Fit and write root/preview_factors.json from the build's fp32 VAE; its manifest entry (None without a VAE encoder)."""
    if "vae_encoder" not in components or "vae_decoder" not in components:
        return None
    encoder, decoder = (root / components[n].precisions["fp32"].onnx.file for n in ("vae_encoder", "vae_decoder"))
    factors = fit_onnx(encoder, decoder, facts, profile)
    atomic_write_text(root / PREVIEW_FILE, json_text(factors))
    return FileEntry.of(root, PREVIEW_FILE)


def json_text(factors: PreviewFactors) -> str:
    return json.dumps(factors.to_dict(), indent=1) + "\n"


def refresh_preview_factors(folder: str | Path) -> PreviewFactors:
    """Fit the factors of a built folder from its own fp32 VAE and list them in its manifest, re-exporting nothing
    (folders built before previews). The file's hash is checked at every load like the others'."""
    artifacts = Artifacts.open(folder)
    manifest, root = artifacts.manifest, artifacts.root
    for name in ("vae_encoder", "vae_decoder"):
        if name not in manifest.components or "fp32" not in manifest.components[name].precisions:
            raise ExportError(f"{root} has no fp32 {name}; fast previews are fitted on it: rebuild the artifacts")
        pe = manifest.components[name].precisions["fp32"]
        manifest.verify_file(root, pe.onnx)
        if pe.external_data is not None:
            manifest.verify_file(root, pe.external_data)
    manifest.preview_factors = record_preview_factors(root, manifest.components, manifest.facts, manifest.profile)
    manifest.write(root)  # last: a crash before it leaves the file unlisted, which nothing reads
    return PreviewFactors.read(root, manifest)
