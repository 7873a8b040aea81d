"""Images in and out of the pipeline: float <-> uint8, input preparation (8- and 16-bit, size bounded before
decoding), the inpainting paste-back, grids, and image files that carry their generation parameters."""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFilter, PngImagePlugin, features

from .atomic import atomic_file, atomic_write_bytes, write_synced

# Text keys written for every image (PNG: a tEXt chunk each, iTXt when the value is not Latin-1).
TEXT_KEYS = ("prompt", "negative_prompt", "seed", "steps", "scheduler", "guidance", "guidance_rescale", "model_hash")
# Init images and masks larger than this are refused from their header, before any pixel is decoded:
# 8192 x 8192 is 201 MB as RGB, and the float32 mask resize needs as much again. Below Pillow's own
# DecompressionBombWarning (89.5 MP), so an accepted image never warns.
MAX_INPUT_PIXELS = 8192 * 8192
# Output file formats by extension. JPEG and WebP carry the parameters as one JSON object in the EXIF
# UserComment (character code "UNICODE", UTF-16BE, as piexif and AUTOMATIC1111 write it).
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
LOSSY_QUALITY = 95
# The "Software" text of the images ldm-rt writes (Result.metadata) and of its native runtime's (metadata.cpp).
SOFTWARE = ("ldm-rt", "ldm-rt-native")
_USER_COMMENT_UNICODE = b"UNICODE\x00"
# Pillow modes deeper than 8 bits per sample: convert("L"/"RGB") clips them to 255 (or truncates floats)
# instead of scaling them.
_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageInputError(ValueError):
    """An init image or mask cannot be used; the message says what to change."""


class ImageOutputError(ValueError):
    """An output file name or image cannot be written as asked; the message says what to change."""


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """Decoder output (B, 3, H, W) in about [-1, 1] -> (B, H, W, 3) uint8, as diffusers' postprocessing."""
    x = np.clip((decoded.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return np.round(x.transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)  # (B, H, W, 3)


# ---- inputs ------------------------------------------------------------------------------------------------
def as_rgb_array(image: np.ndarray | Image.Image | str | Path, what: str = "init image") -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image (16-bit and float modes scaled, not clipped), a path, or an array
    (H, W, 3) of uint8 or uint16 (scaled by 255/65535)."""
    if isinstance(image, (str, Path)):
        image = open_image(image, what)
    if isinstance(image, Image.Image):
        _check_size(image.width, image.height, what)
        if image.mode in _DEEP_MODES:
            gray = np.round(_unit_gray(image, what) * np.float32(255.0)).astype(np.uint8)  # (H, W)
            return np.repeat(gray[:, :, None], 3, axis=2)
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype not in (np.uint8, np.uint16):
        raise ImageInputError(f"{what} must be uint8 or uint16 (H, W, 3), got {arr.dtype} {arr.shape}")
    _check_size(arr.shape[1], arr.shape[0], what)
    if arr.dtype == np.uint16:
        return np.round(arr.astype(np.float32) * np.float32(255.0 / 65535.0)).astype(np.uint8)
    return arr


def as_mask_array(mask: np.ndarray | Image.Image | str | Path) -> np.ndarray:
    """(H, W) float32 in [0, 1] (1 = repaint, 0 = keep, as diffusers) from a PIL image (8-bit levels / 255,
    16-bit / 65535, float as is), a path, or an array (uint8 / 255, uint16 / 65535, bool, or numbers in [0, 1])."""
    if isinstance(mask, (str, Path)):
        mask = open_image(mask, "mask")
    if isinstance(mask, Image.Image):
        _check_size(mask.width, mask.height, "mask")
        if mask.mode in _DEEP_MODES:
            return _unit_gray(mask, "mask")
        return np.asarray(mask.convert("L"), dtype=np.float32) / np.float32(255.0)
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[2] in (1, 3):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ImageInputError(f"mask must be (H, W) or (H, W, 1|3), got shape {arr.shape}")
    _check_size(arr.shape[1], arr.shape[0], "mask")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if arr.dtype == np.uint16:
        return (arr.astype(np.float64) / 65535.0).astype(np.float32)
    if arr.dtype.kind not in "biuf":
        raise ImageInputError(f"mask must hold numbers (1 = repaint, 0 = keep), got dtype {arr.dtype}")
    return _checked_unit(arr.astype(np.float32), "mask")


def _unit_gray(image: Image.Image, what: str) -> np.ndarray:
    """(H, W) float32 in [0, 1] from a 16-bit ("I;16*", or "I" holding 0..65535) or float ("F", in [0, 1]) image."""
    arr = np.asarray(image)
    if image.mode == "F":
        return _checked_unit(arr.astype(np.float32), what)
    lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
    if lo < 0 or hi > 65535:
        raise ImageInputError(f"{what} is a 32-bit integer image with values {lo}..{hi}; give an 8- or 16-bit image")
    return (arr.astype(np.float64) / 65535.0).astype(np.float32)


def _checked_unit(arr: np.ndarray, what: str) -> np.ndarray:
    # NaN would compare False everywhere (every pixel "keep"): refused, as is any value outside [0, 1].
    if not np.all(np.isfinite(arr)):
        raise ImageInputError(f"{what} contains NaN or Inf; give values in [0, 1] (1 = repaint, 0 = keep)")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ImageInputError(f"{what} values must lie in [0, 1], got {arr.min():g}..{arr.max():g}; scale it first")
    return arr


def _check_size(width: int, height: int, what: str) -> None:
    if width * height > MAX_INPUT_PIXELS:
        raise ImageInputError(
            f"{what} is {width}x{height} ({width * height / 1e6:.1f} MP), over the limit of "
            f"{MAX_INPUT_PIXELS / 1e6:.1f} MP ({math.isqrt(MAX_INPUT_PIXELS)}x{math.isqrt(MAX_INPUT_PIXELS)}); downscale it first"
        )


def open_image(path: str | Path, what: str) -> Image.Image:
    """Decode an image file whose header states a size within MAX_INPUT_PIXELS (checked before decoding)."""
    try:
        with Image.open(path) as im:
            _check_size(im.width, im.height, what)
            im.load()
            return im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning when made an error
        raise ImageInputError(f"{what} {path} is too large to decode ({e}); downscale it first") from None
    except (OSError, ValueError) as e:
        if isinstance(e, ImageInputError):
            raise
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


# ---- inpainting --------------------------------------------------------------------------------------------
def paste_kept(images: np.ndarray, init: np.ndarray, mask: np.ndarray, blur: float = 0.0) -> np.ndarray:
    """Inpainting's final composite: the init image where the mask keeps it, the generated image where it
    repaints (diffusers' `apply_overlay`, AUTOMATIC1111's overlay). The sampler changes the kept region a
    little (the autoencoder round trip; a plain UNet's latent blend is only as sharp as the latent grid).

    images (B, H, W, 3) and init (H, W, 3), both uint8 or both float; mask (H, W), >= 0.5 = repaint (the
    sampler's binarisation). blur: Gaussian radius in pixels of a soft seam (as A1111's mask_blur: it
    reaches a few radii into both sides); 0 keeps every kept pixel exactly."""
    repaint = np.asarray(mask) >= 0.5  # (H, W)
    if not blur:
        return np.where(repaint[None, :, :, None], images, init[None]).astype(images.dtype)
    seam = Image.fromarray(repaint.astype(np.uint8) * np.uint8(255)).filter(ImageFilter.GaussianBlur(blur))
    alpha = (np.asarray(seam, dtype=np.float32) / np.float32(255.0))[None, :, :, None]  # (1, H, W, 1)
    out = alpha * images.astype(np.float32) + (np.float32(1.0) - alpha) * init.astype(np.float32)[None]
    return np.round(out).astype(np.uint8) if images.dtype == np.uint8 else out.astype(images.dtype)


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


# ---- outputs -----------------------------------------------------------------------------------------------
def output_format(path: str | Path) -> str:
    """The file format an output name asks for (by extension), or ImageOutputError naming those we write."""
    suffix = Path(path).suffix.lower()
    fmt = OUTPUT_FORMATS.get(suffix)
    if fmt == "WEBP" and not features.check("webp"):
        fmt = None
    if fmt is None:
        names = ", ".join(s for s, f in OUTPUT_FORMATS.items() if f != "WEBP" or features.check("webp"))
        kind = f"{suffix} files" if suffix else "a name without an extension"
        raise ImageOutputError(f"{path}: cannot write {kind}; end the name with one of {names}")
    return fmt


def output_paths(out: str | Path, count: int, as_grid: bool = False) -> list[Path]:
    """Where `count` images go: `out` itself for one image or a grid, else NAME_0.EXT, NAME_1.EXT, ..."""
    out = Path(out)
    if count == 1 or as_grid:
        return [out]
    return [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(count)]


def png_bytes(image: np.ndarray, text: Mapping[str, object]) -> bytes:
    return encode_image(image, text, "PNG")


def encode_image(image: np.ndarray, text: Mapping[str, object], fmt: str) -> bytes:
    """(H, W, 3) uint8 as PNG (a text chunk per key), JPEG or WebP (the keys as one JSON object in the
    EXIF UserComment)."""
    buf = io.BytesIO()
    im = Image.fromarray(image)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, str(value))
        im.save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()
    exif = Image.Exif()
    comment = json.dumps({k: str(v) for k, v in text.items()}, ensure_ascii=False)
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = _USER_COMMENT_UNICODE + comment.encode("utf-16-be")
    try:
        im.save(buf, format=fmt, exif=exif, quality=LOSSY_QUALITY)
    except ValueError as e:  # JPEG's EXIF segment holds at most 64 kB
        raise ImageOutputError(f"the parameters do not fit a {fmt} file's EXIF ({e}); write a .png instead") from None
    return buf.getvalue()


def write_images(files: Sequence[tuple[str | Path, np.ndarray, Mapping[str, object]]]) -> list[Path]:
    """Write each (path, (H, W, 3) uint8, text) in the format its extension names: all of them or none.
    Every image is encoded first, then each is written to a temp file beside its path, and only when all
    temps are complete are they renamed into place (a reader never sees half a file; a failure removes
    the temps). Paths that are folders, devices or FIFOs are refused (atomic.NotAFileTarget)."""
    encoded = [(Path(path), encode_image(image, text, output_format(path))) for path, image, text in files]
    with contextlib.ExitStack() as stack:
        for path, data in encoded:
            try:
                tmp = stack.enter_context(atomic_file(path))  # renamed over `path` when the stack closes
                write_synced(tmp, data)  # every file on disk before the first rename
            except OSError as e:
                if e.strerror is None:  # already a one-line message (NotAFileTarget)
                    raise
                raise OSError(f"cannot write {path}: {e.strerror}; no image was written") from None
    return [path for path, _ in encoded]


def write_png(path: str | Path, image: np.ndarray, text: Mapping[str, object]) -> None:
    """Write (H, W, 3) uint8 as PNG with `text` chunks; atomic, so a reader never sees half a file."""
    atomic_write_bytes(path, png_bytes(image, text))


def written_by_ldm_rt(path: str | Path) -> bool:
    """Whether the existing file `path` is an image ldm-rt or its native runtime wrote (its "Software" text): the
    only existing file an output may replace, so a file of the user's own is never overwritten."""
    try:
        return read_image_text(path).get("Software") in SOFTWARE
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # not an image we can read: not ours
        return False


def read_image_text(path: str | Path) -> dict[str, str]:
    """The text an image written here carries: PNG text chunks, or the JSON of a JPEG/WebP EXIF UserComment."""
    with Image.open(path) as im:
        im.load()
        if im.format == "PNG":
            return dict(im.text)
        comment = im.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment, b"")
    if not comment.startswith(_USER_COMMENT_UNICODE):
        return {}
    return json.loads(comment[len(_USER_COMMENT_UNICODE) :].decode("utf-16-be"))
