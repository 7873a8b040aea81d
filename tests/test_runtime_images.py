"""runtime/images.py and runtime/guidance.py: pixel conversion, grids, PNG text chunks, the CFG formula."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm_rt.runtime import guidance as cfg
from ldm_rt.runtime.images import (
    ImageInputError,
    as_mask_array,
    as_rgb_array,
    grid,
    image_to_model,
    png_bytes,
    read_png_text,
    resize,
    to_uint8,
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
    got = read_png_text(path)
    assert got == {k: str(v) for k, v in text.items()}
    raw = path.read_bytes()
    assert b"tEXtprompt\x00a red cube" in raw and b"tEXtseed\x0042" in raw
    assert b"iTXtnote" in raw  # not Latin-1: PNG's international text chunk
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writer left nothing behind


def test_write_png_to_a_missing_folder_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        write_png(tmp_path / "no" / "x.png", np.zeros((2, 2, 3), np.uint8), {})
    assert list(tmp_path.iterdir()) == []


def test_input_conversions_and_errors(tmp_path):
    rgba = Image.new("RGBA", (5, 4), (10, 20, 30, 40))
    assert as_rgb_array(rgba).shape == (4, 5, 3)
    with pytest.raises(ImageInputError, match="uint8"):
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
    assert cfg.uses_uncond(7.5) and cfg.uses_uncond(0.0) and not cfg.uses_uncond(1.0)
    assert cfg.double(eps_u).shape == (4, 4, 3, 3)


def test_png_bytes_is_a_png():
    data = png_bytes(np.zeros((3, 3, 3), np.uint8), {"prompt": "x"})
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
