"""The quality script (training/quality.py): fresh prompts, the scorer, and the command end to end on a tiny
ldm-rt model folder (torch reference) and on synthetic artifacts (onnxruntime)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_rt.runtime.pipeline import Pipeline
from ldm_rt.training import quality
from ldm_rt.training.data_shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, ShapeAttributes, make_sample, render
from ldm_rt.training.datasets import HELDOUT_SEED_OFFSET, DataConfig, get_batch, make_dataset
from test_runtime_fixtures import SCALE, synthetic

# An independent reading of the grammar (not quality.named_attributes): prompts must name all but size.
PROMPT = re.compile(
    rf"^a (?:({'|'.join(SIZES)}) )?({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) ({'|'.join(POSITIONS)}) "
    rf"on a ({'|'.join(BACKGROUNDS)}) background$"
)
OUTPUTS = ("quality.json", "quality.md", "samples.png")


def parse(prompt: str) -> dict[str, str]:
    m = PROMPT.match(prompt)
    assert m, f"prompt does not name colour, shape, position and background: {prompt!r}"
    size, color, shape, position, background = m.groups()
    named = {"color": color, "shape": shape, "position": position, "background": background}
    return named if size is None else {"size": size, **named}


def oracle(prompts, seeds) -> np.ndarray:
    """Draws exactly what each prompt says (a random size when it says none), as the training data does."""
    images = []
    for prompt, seed in zip(prompts, seeds):
        rng = np.random.default_rng(seed)
        named = parse(prompt)
        named.setdefault("size", SIZES[rng.integers(len(SIZES))])
        images.append(render(ShapeAttributes(**named), rng))
    return np.stack(images)


def wrong_color(prompts, seeds) -> np.ndarray:
    """As the oracle, but every shape in the next palette colour."""
    names = list(COLORS)
    shifted = []
    for prompt in prompts:
        color = parse(prompt)["color"]
        shifted.append(re.sub(rf"\b{color}\b", names[(names.index(color) + 1) % len(names)], prompt, count=1))
    return oracle(shifted, seeds)


# ---- prompts ------------------------------------------------------------------------------------------------
def test_fresh_prompts_are_deterministic_distinct_and_name_every_scored_attribute():
    specs = quality.fresh_prompts(200)
    assert specs == quality.fresh_prompts(200, seed=1234)
    assert [s.prompt for s in quality.fresh_prompts(200, seed=1235)] != [s.prompt for s in specs]
    assert len({s.prompt for s in specs}) == 200 and len({s.seed for s in specs}) == 200
    said_size = 0
    for s in specs:
        named = parse(s.prompt)  # colour, shape, position, background always; size sometimes
        assert quality.named_attributes(s.prompt) == named
        assert all(getattr(s.attributes, k) == v for k, v in named.items()), (s.prompt, s.attributes)
        assert ("size" in named) == s.says_size
        said_size += s.says_size
    assert 60 < said_size < 140
    # Every combination of the four attributes appears well mixed, not a handful repeated.
    for name, values in (("color", COLORS), ("position", POSITIONS), ("background", BACKGROUNDS), ("shape", SHAPES)):
        counts = [sum(getattr(s.attributes, name) == v for s in specs) for v in values]
        assert min(counts) >= 0.4 * 200 / len(values), (name, counts)


def test_fresh_prompts_are_not_the_trainers_data_stream():
    for seed in (1234, 0):  # even seed 0 is not the trainer's stream: default_rng(seed) != default_rng([seed, i])
        ours = [s.attributes for s in quality.fresh_prompts(200, seed)]
        for stream in (0, HELDOUT_SEED_OFFSET):
            theirs = [make_sample(stream, i).attributes for i in range(200)]
            same = sum(a == b for a, b in zip(ours, theirs))
            assert same < 5, (seed, stream, same)  # chance is 200/540 ~ 0.4


def test_prompt_count_is_bounded_by_the_grammar():
    assert len({s.prompt for s in quality.fresh_prompts(quality.DISTINCT_PROMPTS)}) == quality.DISTINCT_PROMPTS == 810
    with pytest.raises(quality.QualityError, match="810"):
        quality.fresh_prompts(811)


# ---- scoring ------------------------------------------------------------------------------------------------
def test_an_oracle_generator_scores_near_perfect_and_a_wrong_colour_scores_zero_on_colour():
    settings = quality.Settings(prompts=200, batch=32)
    report, specs, images = quality.measure(oracle, settings, ae_psnr=31.0, progress=False)
    assert images.shape == (200, 64, 64, 3) and images.dtype == np.uint8
    assert all(report["accuracy"][k] >= 0.99 for k in quality.ATTRIBUTES), report["accuracy"]
    assert report["scored_images"]["color"] == 200 and report["scored_images"]["size"] == sum(s.says_size for s in specs)
    assert report["all_met"] and report["met"] == {"color": True, "background": True, "position": True, "ae_psnr_db": True}

    wrong, _, _ = quality.measure(wrong_color, settings, ae_psnr=29.9, progress=False)
    assert wrong["accuracy"]["color"] <= 0.01
    assert all(wrong["accuracy"][k] >= 0.99 for k in ("background", "position", "shape", "size")), wrong["accuracy"]
    assert wrong["met"] == {"color": False, "background": True, "position": True, "ae_psnr_db": False} and not wrong["all_met"]
    table = quality.markdown_table(wrong)
    assert re.search(r"\| color \| 0\.0 % \(of 200\) \| >= 90 % \| \*\*no\*\* \|", table), table
    assert "29.90 dB | >= 30 dB | **no**" in table


def test_a_flat_image_is_unreadable_and_counts_as_wrong():
    records = quality.score(["a red circle on the left on a white background"], np.full((1, 64, 64, 3), 240, np.uint8))
    assert records[0]["classified"] is None and not any(records[0]["correct"].values())
    acc, counts = quality.accuracies(records)
    assert acc["color"] == 0.0 and acc["size"] is None and counts["size"] == 0


# ---- the command --------------------------------------------------------------------------------------------
def _run(model, out, *extra):
    return quality.main(["--model", str(model), "--out", str(out), "--prompts", "4", "--steps", "2", "--heldout", "4", "--batch", "3", *extra])


def test_end_to_end_on_a_tiny_model_folder(tiny_ldm_rt_model, tmp_path, capsys):
    from ldm_rt.export.sources import weights_sha256
    from ldm_rt.training.autoencoder_folder import load_autoencoder
    from ldm_rt.training.train_autoencoder import evaluate

    out = tmp_path / "q"
    assert _run(tiny_ldm_rt_model, out) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    report = json.loads((out / "quality.json").read_text())
    for key in ("model", "settings", "accuracy", "targets", "met", "ae_psnr_db", "records"):
        assert key in report
    assert report["model"]["kind"] == "model_folder"
    # The same hash export records for the artifacts built from this folder.
    assert report["model"]["weights_sha256"] == weights_sha256(tiny_ldm_rt_model)
    assert set(report["accuracy"]) == set(quality.ATTRIBUTES) and set(report["met"]) == {*quality.TARGETS, "ae_psnr_db"}
    assert [r["prompt"] for r in report["records"]] == [s.prompt for s in quality.fresh_prompts(4)]
    assert [r["seed"] for r in report["records"]] == [1234, 1235, 1236, 1237]
    assert all(set(r["classified"] or {}) <= set(quality.ATTRIBUTES) for r in report["records"])
    # PSNR as train_autoencoder reports it, on its held-out split at the model's resolution (32).
    ae, _ = load_autoencoder(tiny_ldm_rt_model)
    heldout = make_dataset(DataConfig(resolution=32), "heldout")
    assert report["ae_psnr_db"] == pytest.approx(evaluate(ae, heldout, 4, torch.device("cpu"), 3), abs=1e-4)
    with Image.open(out / "samples.png") as grid:
        assert grid.width >= 2 * quality.GRID_CELL and grid.height > 2 * quality.GRID_CELL  # 2 x 2 with captions
        assert json.loads(grid.text["settings"])["prompts"] == 4
    assert "| color |" in (out / "quality.md").read_text()
    printed = capsys.readouterr().out
    assert "| background |" in printed and "missed:" in printed


def test_end_to_end_on_artifacts_and_require_targets(tmp_path_factory, tmp_path):
    root, model = synthetic(tmp_path_factory)
    out = tmp_path / "q"
    assert _run(root, out, "--require-targets") == 1  # a random model misses the targets; outputs are still written
    report = json.loads((out / "quality.json").read_text())
    assert report["model"]["kind"] == "artifacts" and not report["all_met"] and len(report["records"]) == 4
    # The held-out PSNR through the artifacts' ONNX autoencoder, against the graphs' numpy twins.
    x = get_batch(make_dataset(DataConfig(resolution=report["resolution"]), "heldout"), range(4)).images.numpy()
    mean = model.vae_encoder(x)[:, :4]
    recon = np.clip(model.vae_decoder(mean * SCALE), -1, 1)
    mse = (((recon - x) / 2) ** 2).reshape(4, -1).mean(axis=1)
    assert report["ae_psnr_db"] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), abs=1e-3)


def test_each_image_is_what_its_own_seed_gives_alone(tmp_path_factory):
    root, _ = synthetic(tmp_path_factory)
    sampler = quality.artifacts_sampler(root, steps=3, guidance=5.0, scheduler="ddim")
    specs = quality.fresh_prompts(5)  # more than the artifacts' batch of 4: split inside the generator
    images = sampler.generate([s.prompt for s in specs], [s.seed for s in specs])
    pipe = Pipeline.load(root)
    for s, image in zip(specs, images):
        alone = pipe.generate(s.prompt, steps=3, guidance=5.0, seed=s.seed, height=sampler.resolution, width=sampler.resolution).images[0]
        assert np.abs(alone.astype(int) - image.astype(int)).max() <= 1


@pytest.mark.parametrize("kind", ["missing", "neither"])
def test_bad_model_path_is_one_line_exit_2_and_writes_nothing(kind, tmp_path, capsys):
    model = tmp_path / "nope"
    if kind == "neither":
        model.mkdir()
        (model / "weights.safetensors").write_bytes(b"")
    out = tmp_path / "q"
    assert _run(model, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(model) in err and "--model" in err
    assert not out.exists()
