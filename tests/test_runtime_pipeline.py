"""The runtime Pipeline on synthetic artifacts (tests/test_runtime_fixtures.py): the sampling loop against an
independent numpy loop, guidance batching, randomness, img2img, inpainting, errors, threads."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
from test_runtime_fixtures import LATENT_CHANNELS, SCHEDULER_CONFIG, build_synthetic_artifacts, psnr, synthetic

from ldm_rt.runtime.backends.base import unwrap
from ldm_rt.runtime.images import ImageInputError, image_to_model, to_uint8
from ldm_rt.runtime.params import GenerationError
from ldm_rt.runtime.pipeline import NonFiniteError, Pipeline
from ldm_rt.runtime.schedulers import SCHEDULERS, SchedulerConfig, make_scheduler


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return synthetic(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(art):
    return Pipeline.load(art[0])


def oracle(model, tokenizer, prompt, negative, steps, guidance, scheduler, seed, size=16):
    """Classifier-free guided sampling written out with separate uncond/cond calls of the numpy twin."""
    run = make_scheduler(scheduler, SchedulerConfig.from_dict(SCHEDULER_CONFIG)).set_timesteps(steps)
    ctx_c, ctx_u = model.text_encoder(tokenizer([prompt]).ids), model.text_encoder(tokenizer([negative]).ids)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, LATENT_CHANNELS, size // 2, size // 2), dtype=np.float32) * np.float32(run.init_noise_sigma)
    for i, t in enumerate(run.timesteps):
        x_in = run.scale_model_input(x, i)
        tt = np.full((1,), t, np.float32)
        eps_u, eps_c = model.unet(x_in, tt, ctx_u), model.unet(x_in, tt, ctx_c)
        x = run.step(eps_u + np.float32(guidance) * (eps_c - eps_u), i, x, generator=rng)
    return to_uint8(model.vae_decoder(x))


class Spy:
    """Wraps a component: records the inputs of each call, optionally corrupts one call's output."""

    def __init__(self, inner, nan_at_call: int | None = None):
        self.inner, self.contract, self.calls, self.nan_at_call = inner, inner.contract, [], nan_at_call
        self.lock = threading.Lock()

    def run(self, inputs):
        with self.lock:
            self.calls.append({k: np.array(v) for k, v in inputs.items()})
            n = len(self.calls)
        out = self.inner.run(inputs)
        if self.nan_at_call is not None and n == self.nan_at_call + 1:
            out = {k: np.full_like(v, np.nan) for k, v in out.items()}
        return out


def spied(pipe, name, **kw):
    spy = Spy(pipe.components[name], **kw)
    return Pipeline.from_artifacts(pipe.artifacts, {**pipe.components, name: spy}, "spy", "fp32"), spy


@pytest.mark.parametrize("scheduler", ["ddim", "euler-a", "dpmpp-2m", "pndm"])
def test_pipeline_equals_an_independent_numpy_loop(art, pipe, scheduler):
    root, model = art
    kw = dict(prompt="a red cube", negative="blurry", steps=6, guidance=7.5, scheduler=scheduler, seed=3)
    ours = pipe.generate(kw["prompt"], kw["negative"], kw["steps"], kw["guidance"], scheduler, kw["seed"], height=16, width=16)
    ref = oracle(model, pipe.artifacts.tokenizer, **kw)
    assert psnr(ours.images[0], ref[0]) >= 50
    # The comparison is sensitive to what parity tests must pin down:
    other = "ddim" if scheduler == "euler-a" else "ddpm"  # (euler-a and ddpm coincide on this schedule)
    for change in ({"prompt": "a blue ball"}, {"guidance": 3.0}, {"steps": 5}, {"scheduler": other},
                   {"prompt": kw["negative"], "negative": kw["prompt"]}):  # [uncond, cond] order swapped
        assert psnr(ours.images[0], oracle(model, pipe.artifacts.tokenizer, **{**kw, **change})[0]) < 35, change


def test_guidance_batches_uncond_first_and_guidance_one_skips_it(pipe):
    p, spy = spied(pipe, "unet")
    p.generate("a red cube", "blurry", steps=3, guidance=7.5, seed=0, batch=2)
    assert [c["sample"].shape[0] for c in spy.calls] == [4, 4, 4]  # 2B rows per call, one call per step
    ctx = spy.calls[0]["encoder_hidden_states"]
    tok = pipe.artifacts.tokenizer
    emb = p.components["text_encoder"].run({"input_ids": tok(["blurry", "a red cube"]).ids})["last_hidden_state"]
    np.testing.assert_allclose(ctx, emb[[0, 0, 1, 1]], rtol=1e-6)  # [uncond x2, cond x2]
    np.testing.assert_array_equal(spy.calls[0]["sample"][:2], spy.calls[0]["sample"][2:])
    spy.calls.clear()
    p.generate("a red cube", steps=3, guidance=1.0, seed=0, batch=2)
    assert [c["sample"].shape[0] for c in spy.calls] == [2, 2, 2]


def test_same_seed_same_image_different_seed_different_image(pipe):
    for scheduler in ("ddim", "euler-a"):  # deterministic and stochastic steps
        a = pipe.generate("a cat", steps=4, seed=7, scheduler=scheduler).images
        b = pipe.generate("a cat", steps=4, seed=7, scheduler=scheduler).images
        c = pipe.generate("a cat", steps=4, seed=8, scheduler=scheduler).images
        np.testing.assert_array_equal(a, b)
        assert psnr(a, c) < 35


def test_latents_are_the_unit_noise_drawn_first_from_the_seed(pipe):
    shape = (1, LATENT_CHANNELS, 8, 8)
    noise = np.random.default_rng(11).standard_normal(shape, dtype=np.float32)
    a = pipe.generate("a dog", steps=4, seed=11, scheduler="euler").images
    b = pipe.generate("a dog", steps=4, seed=99, scheduler="euler", latents=noise).images
    np.testing.assert_array_equal(a, b)  # Euler's init_noise_sigma scaling applied to `latents` too
    with pytest.raises(GenerationError, match=r"latents have shape \(1, 4, 4, 4\), expected \(1, 4, 8, 8\)"):
        pipe.generate("a dog", steps=4, latents=noise[:, :, :4, :4])


def test_batch_rows_are_independent_samples_of_their_prompts(pipe):
    r = pipe.generate(["a red cube", "a blue ball"], steps=3, seed=5, batch=2)
    assert r.images.shape == (4, 16, 16, 3)
    assert psnr(r.images[0], r.images[1]) < 40 and psnr(r.images[0], r.images[2]) < 40
    assert r.params["prompts"] == ("a red cube", "a blue ball") and r.params["batch"] == 2


def test_threads_share_one_pipeline_and_each_equals_the_single_threaded_result(pipe):
    seeds = list(range(6))
    expected = {s: pipe.generate("a green cat", steps=5, seed=s, scheduler="dpmpp-2m").images for s in seeds}
    got, errors = {}, []

    def work(s):
        try:
            got[s] = pipe.generate("a green cat", steps=5, seed=s, scheduler="dpmpp-2m").images
        except Exception as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in seeds:
        np.testing.assert_array_equal(got[s], expected[s])


def test_img2img_runs_the_strength_fraction_and_starts_from_the_noised_image(art, pipe):
    _, model = art
    p, spy = spied(pipe, "unet")
    init = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    r = p.generate("a blue ball", steps=10, seed=2, init_image=init, strength=0.3, scheduler="euler")
    assert len(spy.calls) == 3 and len(r.timings["unet"]) == 3  # int(10 * 0.3) steps
    assert r.params["mode"] == "img2img"
    # The first UNet input is x = add_noise(scale * mean(E(init)), noise, first kept step), scaled for the model.
    run = make_scheduler("euler", SchedulerConfig.from_dict(SCHEDULER_CONFIG)).set_timesteps(10).with_strength(0.3)
    z0 = model.vae_encoder(image_to_model(init))[:, :LATENT_CHANNELS] * np.float32(0.5)
    noise = np.random.default_rng(2).standard_normal(z0.shape, dtype=np.float32)
    expected = run.scale_model_input(run.add_noise(z0, noise, 0), 0)
    np.testing.assert_allclose(spy.calls[0]["sample"][1:], expected, rtol=1e-4, atol=1e-5)  # the cond half
    assert spy.calls[0]["timestep"][0] == np.float32(run.timesteps[0])
    with pytest.raises(GenerationError, match="strength must be in"):
        pipe.generate("a", steps=10, init_image=init, strength=1.5)


def test_latent_blend_inpainting_keeps_the_unmasked_region(art, pipe):
    _, model = art
    init = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    keep_all = pipe.generate("a cat", steps=4, seed=1, init_image=init, mask=np.zeros((16, 16), np.uint8), strength=0.9,
                             mask_blur=None)  # no paste-back: the sampler's own output
    # After the last step the known region is the clean image latent: the output is D(E(init)).
    moments = model.vae_encoder(image_to_model(init))
    expected = to_uint8(model.vae_decoder(moments[:, :LATENT_CHANNELS] * np.float32(0.5)))
    assert psnr(keep_all.images, expected) >= 50
    assert psnr(keep_all.images, init[None]) < 20  # the autoencoder round trip alone changes the kept pixels
    # Repainting everything at full strength is plain txt2img from the same noise.
    repaint = pipe.generate("a cat", steps=4, seed=1, init_image=init, mask=np.full((16, 16), 255, np.uint8), strength=1.0)
    assert psnr(repaint.images, pipe.generate("a cat", steps=4, seed=1).images) >= 50
    assert repaint.params["mode"] == "inpaint"


def test_thread_settings_reach_every_session(tmp_path_factory):
    root, _ = synthetic(tmp_path_factory)
    for threads, spin in ((1, False), (2, True)):
        pipe = Pipeline.load(root, threads=threads, spin=spin)
        for c in pipe.components.values():
            so = unwrap(c).session.get_session_options()  # the encoder's opens here (on first use otherwise)
            assert so.intra_op_num_threads == threads
            assert so.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")


@pytest.mark.parametrize("variant", ["text", "inpaint"])
def test_inpainting_pastes_the_kept_pixels_back(variant, tmp_path_factory):
    """Users expect the region the mask keeps to come back unchanged (within 1 level); mask_blur softens the
    seam (it then reaches into the kept side, as AUTOMATIC1111's), None returns the decoder's pixels."""
    pipe = Pipeline.load(synthetic(tmp_path_factory, variant)[0])
    init = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    keep, seam = mask < 128, np.zeros((16, 16), bool)
    seam[1:15, 1:15] = True  # within 3 pixels of the repainted square
    kw = dict(prompt="a cat", steps=3, seed=1, init_image=init, mask=mask)
    raw, hard, soft = (pipe.generate(**kw, mask_blur=blur) for blur in (None, 0, 1.0))
    kept_error = lambda r: np.abs(r.images[0].astype(int) - init.astype(int))[keep]  # noqa: E731
    assert kept_error(raw).max() > 20  # without the paste-back the kept region moves
    assert kept_error(hard).max() <= 1
    np.testing.assert_array_equal(hard.images[0][~keep], raw.images[0][~keep])  # the repainted region is the sampler's
    far = keep & ~seam
    np.testing.assert_array_equal(soft.images[0][far], init[far])  # the seam stays near the mask's edge
    assert np.abs(soft.images[0].astype(int) - init.astype(int))[keep & seam].max() > 1
    assert hard.params["mask_blur"] == 0.0 and soft.params["mask_blur"] == 1.0 and raw.params["mask_blur"] is None


def test_inpainting_unet_gets_mask_and_masked_image_channels(tmp_path_factory):
    root, _ = synthetic(tmp_path_factory, "inpaint")
    pipe = Pipeline.load(root)
    with pytest.raises(GenerationError, match="inpainting model: pass init_image and mask"):
        pipe.generate("a cat", steps=2)
    p, spy = spied(pipe, "unet")
    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255  # repaint the right half
    init = np.full((16, 16, 3), 200, np.uint8)
    p.generate("a cat", steps=2, seed=0, guidance=2.0, init_image=init, mask=mask, strength=1.0)
    sample = spy.calls[0]["sample"]
    assert sample.shape == (2, 9, 8, 8)
    np.testing.assert_array_equal(sample[:, 4, :, :4], 0.0)
    np.testing.assert_array_equal(sample[:, 4, :, 4:], 1.0)
    masked_latents = sample[0, 5:]
    assert np.abs(masked_latents[:, :, 4:]).max() < 1e-6 < np.abs(masked_latents[:, :, :4]).max()  # repaint area blanked


def test_non_finite_output_names_component_and_step(pipe):
    p, _ = spied(pipe, "unet", nan_at_call=2)
    with pytest.raises(NonFiniteError, match="^unet produced non-finite values in out_sample at step 2$"):
        p.generate("a cat", steps=4, seed=0)


def test_callback_timings_and_params(pipe):
    seen = []
    r = pipe.generate("a cat", steps=4, seed=0, callback=lambda i, n, t, x: seen.append((i, n, t, x.shape)))
    assert [s[0] for s in seen] == [0, 1, 2, 3] and all(s[1] == 4 and s[3] == (1, 4, 8, 8) for s in seen)
    assert seen[0][2] > seen[-1][2]
    assert set(r.timings) >= {"text_encoder", "unet", "vae_decoder", "total"} and len(r.timings["unet"]) == 4
    assert r.params["seed"] == 0 and r.params["model_hash"] == pipe.artifacts.model_hash
    assert r.to_pil()[0].size == (16, 16)


def test_built_from_components_it_is_the_same_loop(pipe):
    """The constructor takes the parts an artifacts folder provides (how the torch reference is built):
    the same parts give the same image; a model with a text encoder needs its tokenizer."""
    a = pipe.artifacts
    parts = (dict(pipe.components), a.tokenizer, a.scheduler_config, a.manifest.facts, a.manifest.profile)
    built = Pipeline(*parts, backend="onnxruntime", model_hash="m")
    r = built.generate("a cat", steps=3, seed=4, scheduler="euler-a")
    np.testing.assert_array_equal(r.images, pipe.generate("a cat", steps=3, seed=4, scheduler="euler-a").images)
    assert r.params["model_hash"] == "m" and built.artifacts is None
    with pytest.raises(GenerationError, match="has a text encoder: pass its tokenizer"):
        Pipeline(parts[0], None, *parts[2:], backend="onnxruntime")
    with pytest.raises(GenerationError, match=r"needs the components \['vae_decoder'\]"):
        Pipeline({k: v for k, v in parts[0].items() if k != "vae_decoder"}, *parts[1:], backend="onnxruntime")


def test_too_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm_rt"):
        r = pipe.generate("a red cube on the table " * 4, steps=2, seed=0)
    assert r.images.shape == (1, 16, 16, 3)
    assert any(rec.levelno == logging.WARNING and rec.name == "ldm_rt.runtime.tokenizer" for rec in caplog.records)


def test_input_errors(pipe):
    with pytest.raises(GenerationError, match="mask needs init_image"):
        pipe.generate("a", steps=2, mask=np.zeros((16, 16), np.uint8))
    with pytest.raises(GenerationError, match="unknown scheduler"):
        pipe.generate("a", steps=2, scheduler="kdpm2")
    assert set(pipe.schedulers) == set(SCHEDULERS)


def test_class_conditional_model_takes_labels_and_no_prompt(tmp_path_factory):
    root, model = synthetic(tmp_path_factory, "class")
    pipe = Pipeline.load(root)
    p, spy = spied(pipe, "unet")
    r = p.generate(steps=3, seed=0, class_labels=[1, 3], batch=2)
    assert r.images.shape == (4, 16, 16, 3) and r.params["class_labels"] == [1, 1, 3, 3]
    assert [c["sample"].shape[0] for c in spy.calls] == [4, 4, 4]  # no text encoder: no guidance pass
    np.testing.assert_array_equal(spy.calls[0]["class_labels"], [1, 1, 3, 3])
    assert psnr(r.images[0], r.images[2]) < 35  # the label matters
    for kwargs, message in [({}, "class-conditional: pass class_labels"), ({"class_labels": [5]}, "ints in \\[0, 5\\)"),
                            ({"class_labels": [1], "prompt": "a cat"}, "no text encoder and takes no prompt")]:
        with pytest.raises(GenerationError, match=message):
            pipe.generate(steps=2, **kwargs)
    with pytest.raises(GenerationError, match="not class-conditional"):
        Pipeline.load(synthetic(tmp_path_factory)[0]).generate("a cat", steps=2, class_labels=[1])


def test_a_zero_terminal_snr_model_refuses_only_the_schedulers_that_cannot_take_it(tmp_path, caplog):
    """pndm and lms cannot sample a zero-terminal-SNR schedule: asking for one is the error (naming every
    scheduler the model can use), not loading; dpmpp-2m-karras warns below the steps it needs there."""
    zero_snr = {**SCHEDULER_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    root, _ = build_synthetic_artifacts(tmp_path / "artifacts", scheduler_config=zero_snr)
    pipe = Pipeline.load(root)
    refused = ("pndm", "lms", "lms-karras", "heun", "heun-karras", "dpmpp-sde", "dpmpp-sde-karras")  # no zero-SNR option in diffusers' Heun and DPM++ SDE
    usable = [name for name in SCHEDULERS if name not in refused]
    assert list(pipe.schedulers) == usable
    for name in usable:
        images = pipe.generate("a cat", steps=3, seed=0, scheduler=name).images.astype(np.float32)
        assert np.isfinite(images).all() and images.std() > 0, name
    for name in refused:
        with pytest.raises(GenerationError) as e:
            pipe.generate("a cat", steps=2, scheduler=name)
        message = str(e.value)
        assert message.startswith(f"{name} ") and "cannot sample a zero-terminal-SNR schedule" in message and "\n" not in message
        assert message.endswith("this model can use " + ", ".join(usable))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm_rt"):
        pipe.generate("a cat", steps=39, seed=0, scheduler="dpmpp-2m-karras")
        pipe.generate("a cat", steps=40, seed=0, scheduler="dpmpp-2m-karras")
        pipe.generate("a cat", steps=5, seed=0, scheduler="dpmpp-2m")
    assert [r.getMessage() for r in caplog.records] == [
        "dpmpp-2m-karras has given broken images on this model's schedule below 40 steps; running 39 (use more steps or another scheduler)"]


@pytest.mark.parametrize("kwargs, message", [
    ({"strength": 0.5}, "strength needs init_image"),
    ({"mask_blur": 2.0}, "mask_blur needs mask"),
    ({"prompt": None}, "prompt must be a string or a non-empty list of strings, got NoneType"),
    ({"prompt": 7}, "prompt must be a string or a non-empty list of strings, got int"),
    ({"prompt": ["a cat", 7]}, "prompt 1 must be a string, got int"),
    ({"prompt": "caf\udce9"}, "prompt is not valid text: character 3 ('\\udce9') is not Unicode"),
    ({"negative_prompt": "caf\udce9"}, "negative_prompt is not valid text"),
])
def test_arguments_that_would_be_ignored_or_crash_are_one_line_errors(pipe, kwargs, message):
    with pytest.raises(GenerationError) as e:
        pipe.generate(**{"prompt": "a cat", "steps": 2, **kwargs})
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_, np.int32, "datetime64[s]", "U3", [("a", "f4"), ("b", "f4")]])
def test_latents_must_be_floating_point(pipe, dtype):
    latents = np.zeros((1, LATENT_CHANNELS, 8, 8), dtype=dtype)
    with pytest.raises(GenerationError, match=r"^latents must be a float16/32/64 array of noise, got dtype "):
        pipe.generate("a cat", steps=2, latents=latents)


def test_a_nan_in_the_mask_is_refused_not_read_as_keep(pipe):
    init = np.zeros((16, 16, 3), np.uint8)
    mask = np.ones((16, 16), np.float32)
    mask[3, 3] = np.nan
    with pytest.raises(ImageInputError, match="mask contains NaN or Inf"):
        pipe.generate("a cat", steps=2, init_image=init, mask=mask)
    with pytest.raises(ImageInputError, match=r"mask values must lie in \[0, 1\], got 2..2; scale it first"):
        pipe.generate("a cat", steps=2, init_image=init, mask=np.full((16, 16), 2.0))


def test_batch_is_bounded_before_memory_is_spent_whatever_the_profile_says(art):
    import dataclasses

    from ldm_rt.runtime.contracts import ShapeProfile
    from ldm_rt.runtime.manifest import Manifest
    from ldm_rt.runtime.params import MAX_IMAGES_PER_CALL, MAX_PIXELS_PER_CALL, make_params

    manifest = dataclasses.replace(Manifest.read(art[0]), profile=ShapeProfile(batch=(1, 1, 10**9), height=(8, 16, 2048), width=(8, 16, 2048)))
    kw = dict(prompt="a cat", negative_prompt="", steps=2, guidance=7.5, scheduler="ddim", seed=0, strength=0.8)
    assert make_params(manifest, batch=MAX_IMAGES_PER_CALL, height=16, width=16, **kw).batch == MAX_IMAGES_PER_CALL
    with pytest.raises(GenerationError, match=r"^100000000 images per call \(1 prompts x batch 100000000\) is over the runtime's limit of 1024"):
        make_params(manifest, batch=10**8, height=16, width=16, **kw)
    assert make_params(manifest, batch=MAX_PIXELS_PER_CALL // 2048**2, height=2048, width=2048, **kw).batch == 64
    with pytest.raises(GenerationError, match=r"^65 images of 2048x2048 in one call is over the runtime's limit of 268435456 pixels"):
        make_params(manifest, batch=65, height=2048, width=2048, **kw)


def test_result_save_writes_the_parameters_the_cli_writes_in_the_format_the_name_says(pipe, tmp_path):
    from PIL import Image

    from ldm_rt.runtime.images import read_image_text

    r = pipe.generate(["a red cube", "a blue ball"], "blurry", steps=2, seed=4, batch=2, guidance_rescale=0.5)
    paths = r.save(tmp_path / "x.png")
    assert paths == [tmp_path / f"x_{k}.png" for k in range(4)]
    text = read_image_text(paths[2])
    assert text == r.metadata(2)
    assert text["prompt"] == "a blue ball" and text["negative_prompt"] == "blurry" and text["batch_index"] == "2"
    assert {k: text[k] for k in ("seed", "steps", "scheduler", "guidance", "guidance_rescale")} == {
        "seed": "4", "steps": "2", "scheduler": "ddim", "guidance": "7.5", "guidance_rescale": "0.5"}
    assert json.loads(text["parameters"])["prompts"] == ["a red cube", "a blue ball"]
    np.testing.assert_array_equal(np.asarray(Image.open(paths[3])), r.images[3])
    for name, fmt in (("g.jpg", "JPEG"), ("g.webp", "WEBP")):
        (path,) = r.save(tmp_path / name, as_grid=True)
        with Image.open(path) as im:
            assert im.format == fmt and im.size == (32, 32)
        assert read_image_text(path) == r.metadata(None)
        assert read_image_text(path)["prompt"] == '["a red cube", "a blue ball"]'


def test_unknown_words_of_prompt_and_negative_prompt_are_named_once(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm_rt"):
        pipe.generate(["a red astronaut", "a blue horse"], "ugly zebra", steps=2, seed=0)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert messages == ["prompt 0: the model does not know 'astronaut' (read as unknown words)",
                        "prompt 1: the model does not know 'horse' (read as unknown words)",
                        "negative prompt 0: the model does not know 'zebra' (read as unknown words)"]
