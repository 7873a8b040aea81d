"""runtime/images.py and runtime/guidance.py: pixel conversion (8- and 16-bit), input size bounds, the
inpainting paste-back, grids, PNG/JPEG/WebP metadata, the CFG formula."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from ldm_rt.runtime import guidance as cfg
from ldm_rt.runtime.images import (
    MAX_INPUT_PIXELS,
    ImageInputError,
    ImageOutputError,
    as_mask_array,
    as_rgb_array,
    grid,
    image_to_model,
    output_format,
    paste_kept,
    png_bytes,
    read_image_text,
    resize,
    to_uint8,
    write_images,
    write_png,
)


def test_to_uint8_maps_minus_one_to_one_onto_0_255_with_rounding_and_clipping():
    decoded = np.array([-2.0, -1.0, 0.0, 1.0, 3.0, 2 * (100.5 / 255) - 1], dtype=np.float32).reshape(1, 1, 1, 6)
    decoded = np.repeat(decoded, 3, axis=1)  # (1, 3, 1, 6)
    out = to_uint8(decoded)
    assert out.shape == (1, 1, 6, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 100]  # 127.5 and 100.5 round half to even


def test_image_to_model_is_the_inverse_of_to_uint8():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    x = image_to_model(pixels)
    assert x.shape == (1, 3, 8, 12) and x.dtype == np.float32
    np.testing.assert_array_equal(to_uint8(x)[0], pixels)


def test_grid_places_images_row_major():
    images = np.stack([np.full((2, 3, 3), k, dtype=np.uint8) for k in range(1, 6)])  # 5 images
    g = grid(images)
    assert g.shape == (2 * 2, 3 * 3, 3)  # 2 rows of height 2, 3 columns (ceil sqrt 5) of width 3
    assert g[0, 0, 0] == 1 and g[0, 3, 0] == 2 and g[0, 6, 0] == 3 and g[2, 0, 0] == 4 and g[2, 3, 0] == 5
    assert g[2, 6, 0] == 0  # the empty cell


def test_png_text_chunks_round_trip_and_use_text_chunks(tmp_path):
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    text = {"prompt": "a red cube", "negative_prompt": "blurry", "seed": 42, "steps": 7, "scheduler": "euler",
            "guidance": 7.5, "model_hash": "ab" * 32, "note": "caf\u00e9 \u2603"}
    path = tmp_path / "x.png"
    write_png(path, image, text)
    got = read_image_text(path)
    assert got == {k: str(v) for k, v in text.items()}
    raw = path.read_bytes()
    assert b"tEXtprompt\x00a red cube" in raw and b"tEXtseed\x0042" in raw
    assert b"iTXtnote" in raw  # not Latin-1: PNG's international text chunk
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writer left nothing behind


def test_write_png_to_a_missing_folder_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        write_png(tmp_path / "no" / "x.png", np.zeros((2, 2, 3), np.uint8), {})
    assert e.value.filename == str(tmp_path / "no" / "x.png")  # the user's path, not the temp file beside it
    assert list(tmp_path.iterdir()) == []


def test_input_conversions_and_errors(tmp_path):
    rgba = Image.new("RGBA", (5, 4), (10, 20, 30, 40))
    assert as_rgb_array(rgba).shape == (4, 5, 3)
    with pytest.raises(ImageInputError, match="uint8 or uint16"):
        as_rgb_array(np.zeros((4, 5, 3), np.float32))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageInputError, match="cannot read init image"):
        as_rgb_array(tmp_path / "bad.png")
    mask = as_mask_array(Image.new("L", (5, 4), 255))
    assert mask.dtype == np.float32 and mask.shape == (4, 5) and mask.max() == 1.0
    assert resize(np.zeros((4, 5, 3), np.uint8), 8, 10).shape == (8, 10, 3)
    assert resize(np.ones((4, 5), np.float32), 8, 10).shape == (8, 10)


def test_classifier_free_guidance_formula_and_order():
    rng = np.random.default_rng(1)
    eps_u, eps_c = rng.standard_normal((2, 2, 4, 3, 3), dtype=np.float32)
    out = np.concatenate([eps_u, eps_c])  # the UNet's [uncond, cond] batch
    np.testing.assert_allclose(cfg.combine(out, 7.5), eps_u + 7.5 * (eps_c - eps_u), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cfg.combine(out, 1.0), eps_c, atol=1e-6)
    assert cfg.uses_uncond(7.5) and not cfg.uses_uncond(0.0) and not cfg.uses_uncond(1.0)  # <= 1: cond only (Turbo)
    assert cfg.double(eps_u).shape == (4, 4, 3, 3)


def test_png_bytes_is_a_png():
    data = png_bytes(np.zeros((3, 3, 3), np.uint8), {"prompt": "x"})
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 2, rows: list[bytes] | None = None) -> bytes:
    """A PNG written by hand: the sizes Pillow cannot write (16-bit RGB) or that we must not decode (huge)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + r for r in rows)) if rows else zlib.compress(b"\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_sixteen_bit_and_float_images_are_scaled_not_clipped_to_white(tmp_path):
    gray16 = np.array([[0, 30000], [65535, 1000]], np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(gray16).save(path)  # a 16-bit grayscale PNG: Pillow opens it as mode I;16
    assert Image.open(path).mode == "I;16"
    np.testing.assert_allclose(as_mask_array(path), gray16 / 65535, atol=1e-7)  # 30000 keeps (< 0.5); clipped it repainted
    np.testing.assert_array_equal(as_rgb_array(path)[..., 1], [[0, 117], [255, 4]])
    (tmp_path / "c48.png").write_bytes(png_header(2, 1, 16, 2, [np.array([30000, 65535, 0] * 2, ">u2").tobytes()]))
    np.testing.assert_array_equal(as_rgb_array(tmp_path / "c48.png")[0, 0], [117, 255, 0])  # 48-bit RGB, read by Pillow
    np.testing.assert_array_equal(as_rgb_array(np.full((2, 2, 3), 30000, np.uint16))[0, 0], [117, 117, 117])  # RGB48 array
    as_int32 = Image.fromarray(gray16.astype(np.int32))  # mode I, as some readers give 16-bit data
    np.testing.assert_allclose(as_mask_array(as_int32), gray16 / 65535, atol=1e-7)
    as_float = Image.fromarray(np.array([[0.25, 1.0]], np.float32))  # mode F, values in [0, 1]
    np.testing.assert_allclose(as_mask_array(as_float), [[0.25, 1.0]])
    np.testing.assert_array_equal(as_rgb_array(as_float)[0, :, 0], [64, 255])
    with pytest.raises(ImageInputError, match=r"values must lie in \[0, 1\], got 0..255"):
        as_mask_array(Image.fromarray(np.array([[0.0, 255.0]], np.float32)))
    with pytest.raises(ImageInputError, match="32-bit integer image with values 0..70000"):
        as_mask_array(Image.fromarray(np.array([[0, 70000]], np.int32)))
    np.testing.assert_allclose(as_mask_array(gray16), gray16 / 65535, atol=1e-7)  # uint16 arrays too


def test_masks_with_nan_or_out_of_range_values_are_refused():
    for bad, message in ((np.array([[0.0, np.nan]]), "NaN or Inf"), (np.array([[0.0, np.inf]]), "NaN or Inf"),
                         (np.array([[-0.5, 1.0]]), r"\[0, 1\], got -0.5..1"), (np.array([["a"]]), "must hold numbers")):
        with pytest.raises(ImageInputError, match=message):
            as_mask_array(bad)
    np.testing.assert_array_equal(as_mask_array(np.array([[True, False]])), [[1.0, 0.0]])


def test_image_size_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    side = int(MAX_INPUT_PIXELS**0.5) + 8  # just over the cap: below Pillow's own bomb limits
    (tmp_path / "big.png").write_bytes(png_header(side, side))
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    for call, what in ((as_rgb_array, "init image"), (as_mask_array, "mask")):
        with pytest.raises(ImageInputError, match=f"^{what} is {side}x{side} .* over the limit of 67.1 MP .*; downscale it first$"):
            call(tmp_path / "big.png")
    assert decoded == []
    monkeypatch.undo()
    (tmp_path / "bomb.png").write_bytes(png_header(30000, 30000))  # 900 MP: Pillow's DecompressionBombError
    with pytest.raises(ImageInputError, match="^init image .*bomb.png is too large to decode .*; downscale it first$"):
        as_rgb_array(tmp_path / "bomb.png")
    with pytest.raises(ImageInputError, match="over the limit"):
        as_mask_array(np.zeros((side, side), np.uint8))


def test_paste_kept_matches_diffusers_apply_overlay_and_blur_softens_the_seam():
    rng = np.random.default_rng(0)
    generated = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    init = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    hard = paste_kept(generated, init, mask / 255.0)
    image_processor = pytest.importorskip("diffusers.image_processor")
    theirs = image_processor.VaeImageProcessor().apply_overlay(Image.fromarray(mask), Image.fromarray(init), Image.fromarray(generated[0]))
    np.testing.assert_array_equal(hard[0], np.asarray(theirs))  # the same composite as diffusers' (hard mask)
    soft = paste_kept(generated, init, mask / 255.0, blur=2.0)
    inner, outer = np.zeros((32, 32), bool), np.ones((32, 32), bool)
    inner[14:18, 10:14] = True  # deep inside the repainted square
    outer[2:30, 0:26] = False  # far outside it
    np.testing.assert_array_equal(soft[0][inner], generated[0][inner])
    np.testing.assert_array_equal(soft[0][outer], init[outer])
    edge = soft[0, 16, 3:5].astype(float)  # across the seam at x = 4: a mix of both
    assert not np.array_equal(edge, init[16, 3:5]) and not np.array_equal(edge, generated[0, 16, 3:5])
    floats = paste_kept(generated / 255.0, init / 255.0, mask / 255.0)
    np.testing.assert_allclose(floats * 255, hard, atol=1e-9)


def test_output_formats_follow_the_name_and_carry_the_parameters(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    text = {"prompt": "caf\u00e9 \u2603", "seed": 3, "parameters": '{"steps": 2}'}
    paths = write_images([(tmp_path / name, image, text) for name in ("a.png", "b.jpg", "c.JPEG", "d.webp")])
    for path, fmt in zip(paths, ("PNG", "JPEG", "JPEG", "WEBP")):
        with Image.open(path) as im:
            assert im.format == fmt
        assert read_image_text(path) == {k: str(v) for k, v in text.items()}
    for name in ("x.tiff", "x", "x.gif"):
        with pytest.raises(ImageOutputError, match=r"cannot write .*; end the name with one of .png, .jpg, .jpeg"):
            output_format(tmp_path / name)
    with pytest.raises(ImageOutputError, match="do not fit a JPEG file's EXIF"):
        write_images([(tmp_path / "long.jpg", image, {"prompt": "x" * 40000})])
    assert not (tmp_path / "long.jpg").exists()


def test_write_images_never_replaces_a_fifo_and_leaves_no_temp(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        write_images([(tmp_path / "first.png", np.zeros((2, 2, 3), np.uint8), {}), (fifo, np.zeros((2, 2, 3), np.uint8), {})])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.png"] and fifo.is_fifo()


def test_write_images_has_every_file_on_disk_before_the_first_rename(tmp_path, monkeypatch):
    """All or none after a power cut too: each temp file is fsynced (atomic.write_synced, the one owner of that)
    before any is renamed into place."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append("replace"), real_replace(src, dst))[1])
    image = np.zeros((2, 2, 3), np.uint8)
    write_images([(tmp_path / f"{k}.png", image, {}) for k in range(3)])
    assert events == ["fsync"] * 3 + ["replace"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.png", "1.png", "2.png"]
