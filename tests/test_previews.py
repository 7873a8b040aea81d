"""Step previews (runtime/previews.py, export/preview_fit.py): the x0 estimate every scheduler gives (against
diffusers' pred_original_sample), the latent -> RGB fit (on the synthetic model, whose decoder is linear, so the
right map is known; and through a real export of the tiny SD model), fast and full previews through
Pipeline.generate, and `ldm-rt sample --preview`."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_runtime_fixtures import SCALE, build_synthetic_artifacts, exported, one_line_error, psnr, run_cli, synthetic

from ldm_rt.export import preview_fit
from ldm_rt.export.parity import ort_session
from ldm_rt.runtime.artifacts import Artifacts
from ldm_rt.runtime.cli import main as cli_main
from ldm_rt.runtime.manifest import ArtifactError, Manifest
from ldm_rt.runtime.params import GenerationError
from ldm_rt.runtime.pipeline import Pipeline
from ldm_rt.runtime.previews import PREVIEW_FILE, PREVIEW_KEY, PreviewFactors, is_preview_file, psnr_db
from ldm_rt.runtime.schedulers import scheduler_from_diffusers_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

SIZE, STEPS, SEED = 16, 5, 3
ARGS = dict(prompt="a red car", negative_prompt="blurry", steps=STEPS, guidance=7.5, height=SIZE, width=SIZE, seed=SEED, scheduler="ddim")
SYNTHETIC_ARGS = dict(prompt="a red cube", steps=STEPS, guidance=7.5, height=SIZE, width=SIZE, seed=SEED, scheduler="ddim")
# The synthetic decoder is linear: the fit is exact up to float32 rounding (measured: more than 100 dB held out),
# a map with its channels shuffled is not (measured 30-40 dB on its small mid-gray range).
EXACT_DB, SHUFFLED_DB = 80.0, 50.0


@pytest.fixture(scope="module")
def art(tmp_path_factory, tiny_sd_v1) -> Path:
    return exported(tmp_path_factory, tiny_sd_v1, False)


@pytest.fixture(scope="module")
def pipe(art) -> Pipeline:
    return Pipeline.load(art)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, np.ndarray]] = []

    def __call__(self, i: int, n: int, images: np.ndarray) -> None:
        self.calls.append((i, n, images.copy()))


# ---- the x0 estimate of every scheduler -----------------------------------------------------------------------
DIFFUSERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler", "dpm": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
    "dpmsde": "DPMSolverSDEScheduler",  # its midpoint evaluations read their own sigma (needs torchsde, a test dependency)
}  # fmt: skip
SD1 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False, clip_sample=False)


# diffusers' DPM SDE draws from torchsde's Brownian tree, which warns about float32 rounding of its interval ends.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning", "ignore:Should have t:UserWarning")
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", sorted(DIFFUSERS))
def test_denoised_is_diffusers_x0_prediction_at_every_step(kind, prediction_type):
    """run.denoised(model_output, i, sample) is diffusers' pred_original_sample (the multistep solvers: the data
    prediction their step stores), at every step including Heun's and DPM++ SDE's second (midpoint) evaluations."""
    config = dict(SD1, prediction_type=prediction_type, timestep_spacing="trailing" if prediction_type == "v_prediction" else "leading")
    theirs = getattr(diffusers, DIFFUSERS[kind]).from_config(config)
    run = scheduler_from_diffusers_config({"_class_name": DIFFUSERS[kind], **config}).set_timesteps(6)
    theirs.set_timesteps(6)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((1, 4, 4, 4)).astype(np.float32)) * theirs.init_noise_sigma
    generator = torch.Generator().manual_seed(0)
    for i, t in enumerate(theirs.timesteps):
        m = (0.3 * theirs.scale_model_input(x, t) + 0.1 * np.cos(float(t) / 100)).to(torch.float32)
        out = theirs.step(m, t, x, generator=generator) if kind in ("ddpm", "euler-a") else theirs.step(m, t, x)
        want = theirs.model_outputs[-1] if kind in ("dpm", "unipc") else out.pred_original_sample
        got = run.denoised(m.numpy(), i, x.numpy())
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4 * max(1.0, float(want.abs().max())), err_msg=f"{kind} step {i}")
        x = out.prev_sample


# ---- the fit at export ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    """The synthetic model (tests/test_runtime_fixtures.py) with fitted factors: its decoder is W_d (latent / scale),
    nearest-upsampled, so the right map is W_d / scale with no bias."""
    root, model = build_synthetic_artifacts(tmp_path_factory.mktemp("previews_linear") / "artifacts")
    factors = preview_fit.refresh_preview_factors(root)
    return root, model, factors


def test_the_fit_recovers_a_linear_decoder_and_a_shuffled_map_is_clearly_worse(linear):
    root, model, factors = linear
    np.testing.assert_allclose(factors.weights, (model.w_decoder / SCALE).T, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(factors.bias, 0.0, atol=1e-5)
    assert factors.fit["psnr_db"] >= EXACT_DB and factors.fit["height"] == factors.fit["width"] == 32  # the profile's max
    # Judged again on images the fit never saw (another seed), through the folder's own ONNX VAE.
    manifest = Manifest.read(root)
    enc, dec = (ort_session(root / manifest.components[n].precisions["fp32"].onnx.file) for n in ("vae_encoder", "vae_decoder"))
    images = preview_fit.synthetic_images(8, 32, 32, seed=99)
    x, y = preview_fit._pairs(images, lambda i: enc.run(None, {"image": i})[0], lambda z: dec.run(None, {"latent": z})[0], manifest.facts)
    good = psnr_db(x @ factors.weights + factors.bias, y)
    shuffled = psnr_db(x @ np.roll(factors.weights, 1, axis=0) + factors.bias, y)  # each channel read as its neighbour
    assert good >= EXACT_DB and shuffled <= SHUFFLED_DB, (good, shuffled)
    # Where the profile's smallest size is large (SD), the images are tiles on fewer canvases: the same exact fit.
    tiled = preview_fit.fit_factors(model.vae_encoder, model.vae_decoder, manifest.facts, 256, 192)
    np.testing.assert_allclose(tiled.weights, factors.weights, rtol=1e-3, atol=1e-6)
    assert tiled.fit["canvases"] == 4 and tiled.fit["psnr_db"] >= EXACT_DB  # 16 + 16 tiles of 64 px, 12 a canvas


def test_the_export_fits_and_lists_the_factors_with_their_hash(art):
    """A real build (the tiny SD model's random VAE: its decode is hardly linear in the latent, measured 14.5 dB held
    out, about what the mean colour alone scores, 14.4 dB: the file records that honestly)."""
    manifest = Manifest.read(art)
    assert manifest.preview_factors is not None and manifest.preview_factors.file == PREVIEW_FILE
    manifest.verify_file(art, manifest.preview_factors)
    factors = PreviewFactors.read(art, manifest)
    assert factors.weights.shape == (manifest.facts.latent_channels, 3)
    assert factors.fit["images"] == preview_fit.FIT_IMAGES and factors.fit["held_out"] == preview_fit.HELD_OUT
    assert 10.0 <= factors.fit["psnr_db"] < 60.0
    assert (factors.fit["height"], factors.fit["width"]) == (24, 24)  # FIT_SIDE within the profile (8..24)


def test_synthetic_fit_images_are_varied():
    images = preview_fit.synthetic_images(16, 32, 32)
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8
    assert len({im.tobytes() for im in images}) == 16
    assert min(float(im.std()) for im in images) > 5  # every image has a shape or a gradient on it
    np.testing.assert_array_equal(images, preview_fit.synthetic_images(16, 32, 32))  # fixed seed
    tiles, canvas = preview_fit.synthetic_images(12, 64, 64), preview_fit.canvases(12, 256, 192)  # 4 x 3 tiles
    assert canvas.shape == (1, 256, 192, 3)
    np.testing.assert_array_equal(canvas[0, 64:128, 128:192], tiles[5])


# ---- previews through generate ----------------------------------------------------------------------------------
def test_the_shipped_model_carries_current_factors(caplog):
    """engines/default: its factors are what the fit gives on its own VAE today (like its sampler spec, they are
    refreshed without a re-export: refresh_preview_factors). Its small f = 4 VAE is far from linear: 12.6 dB held out
    (the mean colour alone: 11.2 dB), so fast previews are rough there, and the log says so; its final fast preview
    measured 14.9 dB from the final image at latent resolution (a gray image: 8.9 dB)."""
    artifacts = Artifacts.open()
    manifest, root = artifacts.manifest, artifacts.root
    shipped = PreviewFactors.read(root, manifest)
    assert shipped is not None, "run ldm_rt.export.preview_fit.refresh_preview_factors('engines/default/artifacts') and commit it"
    encoder, decoder = (root / manifest.components[n].precisions["fp32"].onnx.file for n in ("vae_encoder", "vae_decoder"))
    again = preview_fit.fit_onnx(encoder, decoder, manifest.facts, manifest.profile)
    np.testing.assert_allclose(shipped.weights, again.weights, rtol=1e-4, atol=1e-5)
    assert shipped.fit == again.fit and shipped.fit["psnr_db"] >= 11.5
    pipe = Pipeline.load()
    seen = Recorder()
    prompts = ["a large red circle on the left on a white background", "a small blue square at the top on a black background"]
    with caplog.at_level(logging.WARNING, logger="ldm_rt"):
        result = pipe.generate(prompts, steps=10, seed=3, guidance=5, preview=seen, preview_every=10)
    assert any("poorly" in r.getMessage() and "--preview-kind full" in r.getMessage() for r in caplog.records)
    f = pipe.facts.latent_factor
    pooled = [im.astype(np.float64).reshape(2, 16, f, 16, f, 3).mean(axis=(2, 4)) for im in (seen.calls[-1][2], result.images)]
    assert psnr(np.round(pooled[0]).astype(np.uint8), np.round(pooled[1]).astype(np.uint8)) >= 13.0


@pytest.fixture(scope="module")
def plain(pipe):
    return pipe.generate(**ARGS)


def test_fast_previews_form_towards_the_final_image_and_do_not_change_it(linear):
    pipe = Pipeline.load(linear[0])
    plain = pipe.generate(**SYNTHETIC_ARGS)
    seen = Recorder()
    result = pipe.generate(**SYNTHETIC_ARGS, preview=seen, preview_kind="fast")
    np.testing.assert_array_equal(result.images, plain.images)
    assert result.params == plain.params  # previews are not parameters of the image
    assert [(i, n) for i, n, _ in seen.calls] == [(i, STEPS) for i in range(STEPS)]
    first, last = seen.calls[0][2], seen.calls[-1][2]
    assert last.shape == result.images.shape and last.dtype == np.uint8
    # The exact map on the final latents, nearest-repeated as this decoder repeats: the final image to rounding ...
    assert np.max(np.abs(last.astype(int) - result.images.astype(int))) <= 1
    # ... and the first preview (the x0 estimate at the noisiest step) is not there yet.
    assert np.abs(first.astype(int) - result.images.astype(int)).max() > 1
    # Full previews decode the same x0 estimates: with an exact map, the two kinds agree at every step.
    full = Recorder()
    pipe.generate(**SYNTHETIC_ARGS, preview=full, preview_kind="full")
    for (_, _, a), (_, _, b) in zip(seen.calls, full.calls, strict=True):
        assert np.max(np.abs(a.astype(int) - b.astype(int))) <= 1


def test_a_fast_preview_is_the_folder_map_on_the_latents_repeated_to_the_image_size(pipe, plain):
    seen = Recorder()
    pipe.generate(**ARGS, preview=seen, preview_every=STEPS)
    f = pipe.facts.latent_factor
    want = np.round(np.clip((pipe.preview_factors.to_rgb(plain.latents) + 1) / 2, 0, 1) * 255).transpose(0, 2, 3, 1)
    (_, _, last), = seen.calls
    np.testing.assert_array_equal(last[:, ::f, ::f], want.astype(np.uint8))
    np.testing.assert_array_equal(last, last[:, ::f, ::f].repeat(f, axis=1).repeat(f, axis=2))


@pytest.mark.parametrize("every,steps", [(2, [1, 3, 4]), (3, [2, 4]), (5, [4]), (9, [4])])
def test_preview_every_n_steps_and_the_last(pipe, every, steps):
    seen = Recorder()
    pipe.generate(**ARGS, preview=seen, preview_every=every)
    assert [i for i, _, _ in seen.calls] == steps


def test_full_previews_decode_x0_and_the_last_is_the_final_image(pipe, plain):
    seen = Recorder()
    decodes = []
    decoder = pipe.components["vae_decoder"]
    run = decoder.run
    try:
        decoder.run = lambda feeds: decodes.append(1) or run(feeds)  # counts the VAE decodes
        result = pipe.generate(**ARGS, preview=seen, preview_every=2, preview_kind="full")
    finally:
        del decoder.run
    np.testing.assert_array_equal(result.images, plain.images)
    assert [i for i, _, _ in seen.calls] == [1, 3, 4]
    np.testing.assert_array_equal(seen.calls[-1][2], result.images)  # the final image itself ...
    assert len(decodes) == 3  # ... not decoded twice: two previews and the final image
    assert result.timings["preview"] > 0
    # An earlier full preview is the decoded x0 estimate: sharper than the noisy latents, not the final image yet.
    assert not np.array_equal(seen.calls[0][2], result.images)


def test_inpainting_previews_keep_the_init_image_and_end_on_the_pasted_result(pipe):
    rng = np.random.default_rng(1)
    init = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[:, SIZE // 2 :] = 1.0
    args = {**ARGS, "init_image": init, "mask": mask, "mask_blur": 0.0}
    seen = Recorder()
    result = pipe.generate(**args, preview=seen, preview_every=2, preview_kind="full")
    np.testing.assert_array_equal(result.images, pipe.generate(**args).images)
    np.testing.assert_array_equal(seen.calls[-1][2], result.images)
    for _, _, images in seen.calls:  # pasted back like the final image: the kept half is the init image
        np.testing.assert_array_equal(images[0, :, : SIZE // 2], init[:, : SIZE // 2])


def test_bad_preview_arguments_are_refused(pipe):
    for kwargs, word in (
        (dict(preview=Recorder(), preview_every=0), "preview_every"),
        (dict(preview=Recorder(), preview_every=True), "preview_every"),
        (dict(preview=Recorder(), preview_kind="exact"), "preview_kind"),
        (dict(preview="out.png"), "callable"),
    ):
        with pytest.raises(GenerationError, match=word):
            pipe.generate(**ARGS, **kwargs)


# ---- folders without factors --------------------------------------------------------------------------------------
def without_factors(src: Path, dst: Path) -> Path:
    """A copy of `src` as a folder built before previews: no factors file, no manifest entry."""
    shutil.copytree(src, dst)
    (dst / PREVIEW_FILE).unlink()
    manifest = json.loads((dst / "manifest.json").read_text())
    del manifest["preview_factors"]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_an_older_folder_previews_full_decodes_saying_so_once(art, tmp_path, caplog):
    old = Pipeline.load(without_factors(art, tmp_path / "old"))
    fast, full = Recorder(), Recorder()
    with caplog.at_level(logging.WARNING, logger="ldm_rt"):
        old.generate(**ARGS, preview=fast, preview_every=2)
        old.generate(**ARGS, preview=fast, preview_every=2)
    lines = [r.getMessage() for r in caplog.records if "preview" in r.getMessage()]
    assert len(lines) == 1 and "full VAE decodes" in lines[0] and "rebuild" in lines[0]
    old.generate(**ARGS, preview=full, preview_every=2, preview_kind="full")
    for (_, _, a), (_, _, b) in zip(fast.calls, full.calls):
        np.testing.assert_array_equal(a, b)
    for folder, line in ((old.artifacts.root, "previews: full only"), (art, "previews: fast (latent -> RGB map fitted on this VAE, ")):
        code, out, err = run_cli(cli_main, ["info", "--model", str(folder)])
        assert code == 0 and line in out, err


def test_refresh_adds_the_factors_to_an_older_folder_without_a_rebuild(art, tmp_path):
    old = without_factors(art, tmp_path / "old")
    onnx_before = {p.name: p.read_bytes() for p in (old / "onnx" / "fp32").iterdir()}
    factors = preview_fit.refresh_preview_factors(old)
    assert {p.name: p.read_bytes() for p in (old / "onnx" / "fp32").iterdir()} == onnx_before
    want = PreviewFactors.read(art, Manifest.read(art))
    np.testing.assert_allclose(factors.weights, want.weights, rtol=1e-4, atol=1e-5)  # the build's own fit, again
    assert Pipeline.load(old).preview_factors is not None


def test_a_changed_factors_file_is_refused(art, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    (copy / PREVIEW_FILE).write_text((copy / PREVIEW_FILE).read_text().replace('"weights": [', '"weights": [[0, 0, 0], ', 1))
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        Pipeline.load(copy).generate(**ARGS, preview=Recorder())


# ---- the CLI ----------------------------------------------------------------------------------------------------------
def sample_args(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "sample", "--model", str(model), "--prompt", "a red car", "--steps", "3", "--height", str(SIZE), "--width", str(SIZE),
        "--seed", "1", "--scheduler", "ddim", "--out", str(tmp_path / "out.png"), *extra,
    ]  # fmt: skip


def test_cli_writes_the_preview_atomically_and_may_replace_its_own(art, tmp_path, monkeypatch):
    import ldm_rt.runtime.atomic as atomic

    preview = tmp_path / "preview.png"
    renames = []
    real_replace = atomic.os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: renames.append((Path(a), Path(b))) or real_replace(a, b))
    code, _, err = run_cli(cli_main, sample_args(art, tmp_path, "--preview", str(preview), "--preview-kind", "full"))
    assert code == 0, err
    to_preview = [a for a, b in renames if b == preview]
    assert len(to_preview) == 3 and all(a.parent == tmp_path and a.name.startswith(".preview.png.") for a in to_preview)
    assert is_preview_file(preview) and not is_preview_file(tmp_path / "out.png")
    from PIL import Image

    with Image.open(preview) as im, Image.open(tmp_path / "out.png") as out:
        assert im.info[PREVIEW_KEY] == "step 3/3"
        np.testing.assert_array_equal(np.asarray(im), np.asarray(out))  # the last full preview is the image
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "preview.png"]  # no temp file left
    (tmp_path / "out.png").unlink()
    code, _, err = run_cli(cli_main, sample_args(art, tmp_path, "--preview", str(preview), "--preview-every", "2"))
    assert code == 0, err  # an earlier preview is ours to replace


@pytest.mark.parametrize(
    "setup,extra,message",
    [
        ("user", ["--preview", "{p}"], "is not a preview ldm-rt wrote"),
        ("user-png", ["--preview", "{p}"], "is not a preview ldm-rt wrote"),
        (None, ["--preview", "{tmp}/p.jpg"], "ending in .png"),
        (None, ["--preview", "{tmp}/out.png"], "also an output image"),
        (None, ["--preview", "{tmp}/missing/p.png"], "does not exist"),
        (None, ["--preview-every", "2"], "needs --preview"),
        (None, ["--preview", "{p}", "--preview-every", "0"], "at least 1"),
    ],
)
def test_cli_refuses_bad_preview_targets_in_one_line_touching_nothing(tmp_path, tmp_path_factory, setup, extra, message):
    from PIL import Image

    model, _ = synthetic(tmp_path_factory)
    p = tmp_path / "p.png"
    if setup == "user":
        p.write_text("my notes")
    elif setup == "user-png":
        Image.new("RGB", (4, 4)).save(p)
    before = p.read_bytes() if p.exists() else None
    code, _, err = run_cli(cli_main, sample_args(model, tmp_path, *(a.format(p=p, tmp=tmp_path) for a in extra)))
    assert message in one_line_error(code, err, "ldm-rt")
    assert (p.read_bytes() if p.exists() else None) == before
    assert not (tmp_path / "out.png").exists()
