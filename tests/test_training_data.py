"""Datasets of the trainers: the procedural shapes (determinism, grammar, classifier) and image folders."""

from __future__ import annotations

import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_rt.runtime.tokenizer import PromptTokenizer
from ldm_rt.training.data_folder import DataError, ImageFolderDataset
from ldm_rt.training.data_shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesDataset,
    classify_image,
    make_sample,
    vocabulary,
)
from ldm_rt.training.datasets import DataConfig, get_batch, make_dataset, shard_indices
from ldm_rt.training.images import to_uint8
from ldm_rt.training.train_ldm import caption_vocabulary

CAPTION = re.compile(
    rf"^a (?:({'|'.join(SIZES)}) )?({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
    rf"(?: ({'|'.join(POSITIONS)}))?(?: on a ({'|'.join(BACKGROUNDS)}) background)?$"
)


def test_same_seed_and_index_give_the_same_sample_and_other_seeds_differ():
    a, b, c = make_sample(7, 123), make_sample(7, 123), make_sample(8, 123)
    assert torch.equal(a.image, b.image) and a.caption == b.caption and a.attributes == b.attributes
    assert not torch.equal(a.image, c.image)
    assert a.image.shape == (3, 64, 64) and a.image.dtype == torch.float32
    assert a.image.min() >= -1 and a.image.max() <= 1


def test_captions_follow_the_grammar_and_say_what_is_drawn():
    said = {"size": 0, "position": 0, "background": 0}
    n = 300
    for i in range(n):
        s = make_sample(0, i)
        m = CAPTION.match(s.caption)
        assert m, s.caption
        size, color, shape, position, background = m.groups()
        attrs = s.attributes
        assert (color, shape) == (attrs.color, attrs.shape)
        for name, value in (("size", size), ("position", position), ("background", background)):
            if value is not None:
                assert value == getattr(attrs, name), (s.caption, attrs)
                said[name] += 1
    # Optional parts appear often but not always (say_probability 0.7).
    assert all(0.55 * n < k < 0.85 * n for k in said.values()), said


def test_edges_are_anti_aliased():
    pixels = to_uint8(make_sample(0, 3).image[None])[0].reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    assert len(colours) > 4  # background, shape, and blended edge pixels in between


def test_classifier_recovers_the_drawn_attributes():
    n, right = 300, 0
    for i in range(n):
        s = make_sample(3, i)
        right += classify_image(to_uint8(s.image[None])[0]).to_dict() == s.attributes.to_dict()
    assert right / n >= 0.99


def test_classifier_sees_a_changed_colour():
    s = make_sample(0, 5)
    pixels = to_uint8(s.image[None])[0].copy()
    other = next(c for c in COLORS if c != s.attributes.color)
    shape_mask = np.abs(pixels.astype(int) - np.array(BACKGROUNDS[s.attributes.background])).sum(axis=2) > 60
    pixels[shape_mask] = COLORS[other]
    assert classify_image(pixels).color == other


def test_vocabulary_tokenizes_every_caption_without_unknown_words():
    words = vocabulary()
    assert len(words) == len(set(words))
    tok = PromptTokenizer.word_level(words, max_length=16)
    captions = [make_sample(1, i).caption for i in range(200)]
    ids = tok(captions).ids
    unk = tok._tokenizer.token_to_id("<|unk|>")
    assert not (ids == unk).any()
    assert not any(tok(captions).truncated)


def test_shards_of_a_step_are_disjoint_and_cover_the_global_batch():
    shards = [list(shard_indices(40, 8, r, 4)) for r in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(40, 48))
    assert all(len(s) == 2 for s in shards)


def test_heldout_split_of_shapes_is_another_stream():
    config = DataConfig(seed=0)
    train, held = make_dataset(config, "train"), make_dataset(config, "heldout")
    assert isinstance(train, ShapesDataset) and train.seed != held.seed
    batch = get_batch(train, range(4))
    assert batch.images.shape == (4, 3, 64, 64) and len(batch.captions) == 4 and batch.labels.shape == (4,)


def _write_folder(root, n=6, size=(80, 48)):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"caption {i}\n")
    return root


def test_image_folder_pairs_images_with_captions_and_is_deterministic(tmp_path):
    root = _write_folder(tmp_path / "data")
    ds = ImageFolderDataset(root, resolution=32, center_crop=False, random_flip=True, seed=1)
    s = ds[3]
    assert s.image.shape == (3, 32, 32) and s.image.min() >= -1 and s.image.max() <= 1
    assert s.caption == f"caption {s.path.stem[3:]}"
    assert torch.equal(ds[3].image, s.image)
    # An epoch visits every file once.
    assert sorted(ds.file_for(i).name for i in range(6)) == sorted(p.name for p in root.glob("*.png"))


def test_image_folder_centre_crop_and_flip(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :16] = 255  # white left quarter: cropped away by a centre crop
    Image.fromarray(pixels).save(root / "a.png")
    centre = ImageFolderDataset(root, resolution=32, center_crop=True)[0].image
    assert centre.max() == -1.0
    square = np.zeros((32, 32, 3), dtype=np.uint8)
    square[:, :8] = 255
    Image.fromarray(square).save(root / "a.png")
    left_is_white = [
        bool(ImageFolderDataset(root, resolution=32, random_flip=flip, seed=s)[0].image[:, :, 0].max() > 0)
        for flip in (False, True)
        for s in range(8)
    ]
    assert all(left_is_white[:8]) and 0 < sum(left_is_white[8:]) < 8


def test_image_folder_heldout_split_is_disjoint(tmp_path):
    root = _write_folder(tmp_path / "data", n=10)
    train = ImageFolderDataset(root, split="train", heldout_fraction=0.2)
    held = ImageFolderDataset(root, split="heldout", heldout_fraction=0.2)
    assert len(held) == 2 and len(train) == 8 and not set(train.files) & set(held.files)


@pytest.mark.parametrize("case", ["missing", "empty", "not_a_folder"])
def test_unusable_image_folder_is_one_clear_error(tmp_path, case):
    path = tmp_path / "data"
    if case == "empty":
        path.mkdir()
        (path / "notes.txt").write_text("no images")
    elif case == "not_a_folder":
        path.write_text("a file")
    with pytest.raises(DataError, match=str(path)) as info:
        ImageFolderDataset(path)
    assert "\n" not in str(info.value)


def test_unreadable_image_names_the_file(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        ImageFolderDataset(root)[0]


def test_sixteen_bit_images_are_scaled_not_clipped_to_white(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    Image.fromarray(np.full((32, 32), 128 * 257, dtype=np.uint16)).save(root / "gray16.png")  # mode I;16
    image = ImageFolderDataset(root, resolution=32)[0].image
    assert image.shape == (3, 32, 32) and torch.allclose(image, torch.full_like(image, 128 / 127.5 - 1), atol=1e-6)  # white would be 1.0


def _png_header(path, width, height):
    """A PNG whose header states a size and whose pixel data is empty: only the header can be read."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [9000, 20000])  # over our bound (a real, decodable image); over Pillow's bomb bound
def test_a_huge_image_is_refused_from_its_header_naming_the_file(tmp_path, side):
    root = tmp_path / "data"
    root.mkdir()
    if side == 9000:
        Image.new("1", (side, side)).save(root / "huge.png")  # 10 kB on disk, 243 MB once decoded as RGB
    else:
        _png_header(root / "huge.png", side, side)
    with pytest.raises(DataError, match=str(root / "huge.png")) as info:
        ImageFolderDataset(root, resolution=32)[0]
    assert "\n" not in str(info.value) and ("over the limit" in str(info.value) or "too large" in str(info.value))


@pytest.mark.parametrize("content, message", [(b"caf\xe9 au lait", "is not UTF-8 text"), (b"x" * (65 * 1024), "is over 64 KiB")])
def test_a_bad_caption_is_one_line_naming_the_file(tmp_path, content, message):
    root = _write_folder(tmp_path / "data", n=1)
    (root / "img0.txt").write_bytes(content)
    for read in (lambda: ImageFolderDataset(root, resolution=32)[0], lambda: caption_vocabulary(str(root))):
        with pytest.raises(DataError, match=message) as info:
            read()
        assert str(root / "img0.txt") in str(info.value)
