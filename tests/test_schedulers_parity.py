"""Parity of the numpy schedulers with diffusers' same-named schedulers (the oracle): whole sampling
trajectories with a fixed toy model, img2img (with_strength + add_noise), timestep/sigma tables.

Stochastic steps are made comparable by patching diffusers' `randn_tensor` to return the noise array
we also pass to our `step(noise=...)`.
"""

from __future__ import annotations

import ast
import functools
import importlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_rt.runtime.schedulers import scheduler_from_diffusers_config  # noqa: E402

CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
    "dpmsde": "DPMSolverSDEScheduler",  # needs torchsde to import; its Brownian-tree noise is replaced by the feed
}
SD1 = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    timestep_spacing="leading",
    skip_prk_steps=True,
)
PRESETS = {
    "sd1": SD1,
    "sd2-v-trailing": dict(SD1, prediction_type="v_prediction", timestep_spacing="trailing"),
    "linear-defaults": {},  # each class's own diffusers defaults (PNDM: PRK warm-up, DDIM: clip_sample)
    "cosine-trailing": dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"),
    "sd1-linspace": dict(SD1, timestep_spacing="linspace"),
}
STEPS = (1, 7, 25)  # plus 50 steps for the SD v1 config; 15 is where DPM's lower_order_final switches


# ---- the fixed toy model and the noise feed ----------------------------------------------------------
def toy_model(x: np.ndarray, t) -> np.ndarray:
    return (0.1 * x * np.cos(float(t) / 100) + 0.05 * np.sin(x)).astype(np.float32)


def toy_model_with_variance(x: np.ndarray, t) -> np.ndarray:
    # learned variance: twice the channels, the second half in [-1, 1] as learned_range expects
    return np.concatenate([toy_model(x, t), np.tanh(x).astype(np.float32)], axis=1)


class NoiseFeed:
    current: np.ndarray | None = None


@pytest.fixture
def feed(monkeypatch):
    noise = NoiseFeed()

    def fake_randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == noise.current.shape
        return torch.from_numpy(noise.current.copy()).to(dtype or torch.float32)

    for module in ("scheduling_ddpm", "scheduling_ddim", "scheduling_euler_ancestral_discrete", "scheduling_dpmsolver_multistep", "scheduling_lcm", "scheduling_tcd"):
        module = importlib.import_module(f"diffusers.schedulers.{module}")
        monkeypatch.setattr(module, "randn_tensor", fake_randn_tensor)

    class FeedNoiseSampler:  # DPMSolverSDEScheduler's BrownianTreeNoiseSampler: unit-variance increments
        def __init__(self, x, sigma_min, sigma_max, seed=None, transform=None):
            pass

        def __call__(self, sigma, sigma_next):
            return torch.from_numpy(noise.current.copy())

    monkeypatch.setattr(importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_sde"), "BrownianTreeNoiseSampler", FeedNoiseSampler)
    return noise


@functools.cache
def img2img_get_timesteps():
    """StableDiffusionImg2ImgPipeline.get_timesteps, compiled from diffusers' source file: importing the
    pipeline module would import transformers (seconds) for one eight-line method."""
    path = Path(diffusers.__file__).parent / "pipelines" / "stable_diffusion" / "pipeline_stable_diffusion_img2img.py"
    tree = ast.parse(path.read_text())
    (method,) = [
        node
        for cls in tree.body
        if isinstance(cls, ast.ClassDef) and cls.name == "StableDiffusionImg2ImgPipeline"
        for node in cls.body
        if isinstance(node, ast.FunctionDef) and node.name == "get_timesteps"
    ]
    namespace: dict = {}
    exec(compile(ast.Module(body=[method], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["get_timesteps"]


def make_pair(kind: str, config: dict, **options):
    theirs = getattr(diffusers, CLASSES[kind]).from_config(config)
    ours = scheduler_from_diffusers_config({"_class_name": CLASSES[kind], **config}, **options)
    return theirs, ours


def assert_close(ref: np.ndarray, ours: np.ndarray, ref_in: np.ndarray, what: str) -> None:
    # rtol 1e-5; atol relative to the magnitude of the step's operands (float32 rounding in diffusers).
    scale = max(1.0, float(np.abs(ref).max()), float(np.abs(ref_in).max()))
    if ours.shape != ref.shape or not np.all(np.abs(ours - ref) <= 1e-5 * scale + 1e-5 * np.abs(ref)):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=what)  # the report


def assert_same_timesteps(theirs, ours) -> None:
    t_ref = theirs.numpy()
    if np.issubdtype(ours.dtype, np.integer):
        np.testing.assert_array_equal(ours, t_ref)
        assert t_ref.dtype == np.int64
    else:
        np.testing.assert_allclose(ours, t_ref, rtol=1e-6)


def run_trajectory(
    kind, config, n, feed, *, eta=0.0, strength=None, teacher_forcing=False, model=toy_model, shape=(2, 4, 8, 8), gamma=None
):
    # ddim's eta and tcd's gamma (diffusers: `eta` of step; both default to 0.3 when not given)
    step_kwargs = {"eta": eta} if kind == "ddim" else {"eta": gamma} if gamma is not None else {}
    theirs, ours = make_pair(kind, config, **({"eta": eta} if kind == "ddim" else {"gamma": gamma} if gamma is not None else {}))
    rng = np.random.default_rng(n)
    unit = rng.standard_normal(shape).astype(np.float32)
    theirs.set_timesteps(n)
    run = ours.set_timesteps(n)
    timesteps = theirs.timesteps
    if strength is None:
        x_ref = torch.from_numpy(unit) * theirs.init_noise_sigma
        x = unit * run.init_noise_sigma
    else:
        if kind == "lcm":  # LatentConsistencyModelImg2ImgPipeline: the schedule built for the strength, no step skipped
            theirs.set_timesteps(n, strength=strength)
            timesteps = theirs.timesteps
        else:
            timesteps, _ = img2img_get_timesteps()(SimpleNamespace(scheduler=theirs), n, strength, "cpu")
        run = run.with_strength(strength)
        x0 = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        x_ref = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(unit), timesteps[:1].repeat(shape[0]))
        x = run.add_noise(x0, unit, 0)
    assert_same_timesteps(timesteps, run.timesteps)
    assert_close(x_ref.numpy(), x, x_ref.numpy(), f"{kind} n={n}: initial sample")
    for i, t in enumerate(timesteps):
        feed.current = rng.standard_normal(shape).astype(np.float32)
        if teacher_forcing:
            x = x_ref.numpy().copy()
        x_in = run.scale_model_input(x, i)
        x_in_ref = theirs.scale_model_input(x_ref, t)
        assert_close(x_in_ref.numpy(), x_in, x_ref.numpy(), f"{kind} n={n}: model input {i}")
        out_ref = theirs.step(
            torch.from_numpy(model(x_in_ref.numpy(), t.item())), t, x_ref, **step_kwargs
        ).prev_sample
        x_new = run.step(model(x_in, run.timesteps[i]), i, x, noise=feed.current)
        assert x_new.dtype == np.float32
        assert_close(out_ref.numpy(), x_new, x_ref.numpy(), f"{kind} n={n}: step {i}")
        x, x_ref = x_new, out_ref


# ---- whole trajectories ------------------------------------------------------------------------------
BASE_CASES = [(kind, preset) for preset in PRESETS for kind in CLASSES]


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("kind,preset", BASE_CASES, ids=[f"{k}-{p}" for k, p in BASE_CASES])
def test_trajectory_matches_diffusers(kind, preset, n, feed):
    if kind == "pndm" and not PRESETS[preset].get("skip_prk_steps", False) and n < 4:
        pytest.skip("diffusers' PNDM with its Runge-Kutta warm-up needs >= 4 steps (ours raises, tested elsewhere)")
    run_trajectory(kind, PRESETS[preset], n, feed)


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_sd1_50_step_trajectory_matches_diffusers(kind, feed):
    run_trajectory(kind, SD1, 50, feed)


EXTRA_CASES = {
    "euler-karras": ("euler", dict(SD1, use_karras_sigmas=True), {}),
    "lms-karras": ("lms", dict(SD1, use_karras_sigmas=True), {}),
    "dpmpp-2m-karras": ("dpm", dict(SD1, use_karras_sigmas=True), {}),
    "dpmpp-2m-karras-range": ("dpm", dict(SD1, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), {}),
    "euler-karras-range": ("euler", dict(SD1, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), {}),
    "euler-sigma-min-tail": ("euler", dict(SD1, final_sigmas_type="sigma_min"), {}),
    "euler-sample": ("euler", dict(SD1, prediction_type="sample"), {}),
    "dpmpp-3m": ("dpm", dict(SD1, solver_order=3), {}),
    "dpmpp-1": ("dpm", dict(SD1, solver_order=1), {}),
    "dpmpp-2m-heun": ("dpm", dict(SD1, solver_type="heun"), {}),
    "dpmpp-2m-sigma-min-no-lower-final": ("dpm", dict(SD1, final_sigmas_type="sigma_min", lower_order_final=False), {}),
    "dpmpp-3m-sigma-min": ("dpm", dict(SD1, solver_order=3, final_sigmas_type="sigma_min"), {}),
    "dpmpp-2m-euler-at-final": ("dpm", dict(SD1, final_sigmas_type="sigma_min", euler_at_final=True), {}),
    "dpmpp-2m-lambda-clipped": ("dpm", dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), {}),
    "dpmpp-2m-sample": ("dpm", dict(SD1, prediction_type="sample"), {}),
    "dpmpp-2m-thresholding": ("dpm", dict(SD1, thresholding=True, sample_max_value=2.0), {}),
    "ddim-eta-0.5": ("ddim", SD1, {"eta": 0.5}),
    "ddim-eta-1-clip": ("ddim", dict(clip_sample=True, clip_sample_range=2.0), {"eta": 1.0}),
    "ddim-thresholding": ("ddim", dict(SD1, thresholding=True, sample_max_value=1.5), {}),
    "ddim-sample": ("ddim", dict(SD1, prediction_type="sample"), {}),
    "ddim-alpha-one": ("ddim", dict(SD1, set_alpha_to_one=True), {}),
    "ddpm-fixed-large": ("ddpm", dict(SD1, variance_type="fixed_large"), {}),
    "ddpm-fixed-small-log": ("ddpm", dict(SD1, variance_type="fixed_small_log"), {}),
    "ddpm-thresholding": ("ddpm", dict(SD1, thresholding=True), {}),
    "ddpm-learned-range": ("ddpm", dict(SD1, variance_type="learned_range"), {"model": toy_model_with_variance}),
    "dpm-learned-range": (
        "dpm",
        dict(SD1, variance_type="learned_range"),
        {"model": toy_model_with_variance, "shape": (2, 3, 8, 8)},  # diffusers keeps channels [:3]
    ),
    "pndm-prk-sd1": ("pndm", dict(SD1, skip_prk_steps=False), {}),
    "pndm-v": ("pndm", dict(SD1, prediction_type="v_prediction", set_alpha_to_one=True), {}),
    "trained-betas": ("euler", dict(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist()), {}),
    "heun-karras": ("heun", dict(SD1, use_karras_sigmas=True), {}),
    "heun-v": ("heun", dict(SD1, prediction_type="v_prediction"), {}),
    "heun-sample-clip": ("heun", dict(SD1, prediction_type="sample", clip_sample=True, clip_sample_range=0.5), {}),
    "unipc-3": ("unipc", dict(SD1, solver_order=3), {}),
    "unipc-3-v": ("unipc", dict(SD1, solver_order=3, prediction_type="v_prediction"), {}),
    "unipc-1": ("unipc", dict(SD1, solver_order=1), {}),
    "unipc-bh1": ("unipc", dict(SD1, solver_type="bh1", final_sigmas_type="sigma_min"), {}),
    "unipc-from-dpm-midpoint": ("unipc", dict(SD1, solver_type="midpoint"), {}),  # read as bh2, as diffusers
    "unipc-karras": ("unipc", dict(SD1, use_karras_sigmas=True), {}),
    "unipc-karras-range-sigma-min": (
        "unipc", dict(SD1, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, final_sigmas_type="sigma_min"), {}
    ),
    "unipc-3-no-lower-final": ("unipc", dict(SD1, solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"), {}),
    "unipc-sample": ("unipc", dict(SD1, prediction_type="sample"), {}),
    "unipc-disable-corrector": ("unipc", dict(SD1, disable_corrector=[0, 1, 3]), {}),
    "unipc-thresholding": ("unipc", dict(SD1, thresholding=True, sample_max_value=2.0), {}),
    "dpmpp-2m-sde": ("dpm", dict(SD1, algorithm_type="sde-dpmsolver++"), {}),
    "dpmpp-2m-sde-karras": ("dpm", dict(SD1, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), {}),
    "dpmpp-2m-sde-v-trailing": ("dpm", dict(PRESETS["sd2-v-trailing"], algorithm_type="sde-dpmsolver++"), {}),
    "dpmpp-2m-sde-heun": ("dpm", dict(SD1, algorithm_type="sde-dpmsolver++", solver_type="heun"), {}),
    "dpmpp-1-sde": ("dpm", dict(SD1, algorithm_type="sde-dpmsolver++", solver_order=1), {}),
    "dpmpp-3m-sde": ("dpm", dict(SD1, algorithm_type="sde-dpmsolver++", solver_order=3), {}),
    "dpmpp-3m-sde-sigma-min": (  # the last step keeps noise: sigma_min tail, no lower order there
        "dpm", dict(SD1, algorithm_type="sde-dpmsolver++", solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False), {}
    ),
    "dpmpp-2m-sde-sample": ("dpm", dict(SD1, algorithm_type="sde-dpmsolver++", prediction_type="sample"), {}),
    "lcm-original-steps-100": ("lcm", dict(SD1, original_inference_steps=100), {}),
    "lcm-original-steps-37-scaling-3": ("lcm", dict(SD1, original_inference_steps=37, timestep_scaling=3.0), {}),
    "lcm-v": ("lcm", dict(SD1, prediction_type="v_prediction"), {}),
    "lcm-sample-clip": ("lcm", dict(SD1, prediction_type="sample", clip_sample=True, clip_sample_range=0.5), {}),
    "lcm-thresholding": ("lcm", dict(SD1, thresholding=True, sample_max_value=1.5), {}),
    "tcd-gamma-0": ("tcd", SD1, {"gamma": 0.0}),
    "tcd-gamma-1": ("tcd", SD1, {"gamma": 1.0}),
    "tcd-gamma-0.55-v": ("tcd", dict(SD1, prediction_type="v_prediction"), {"gamma": 0.55}),
    "tcd-sample-original-steps-100": ("tcd", dict(SD1, prediction_type="sample", original_inference_steps=100), {}),
    "dpmpp-sde-karras": ("dpmsde", dict(SD1, use_karras_sigmas=True), {}),
    "dpmpp-sde-v-trailing": ("dpmsde", PRESETS["sd2-v-trailing"], {}),
}


@pytest.mark.parametrize("n", (5, 25))
@pytest.mark.parametrize("case", sorted(EXTRA_CASES))
def test_trajectory_matches_diffusers_extra_configs(case, n, feed):
    kind, config, options = EXTRA_CASES[case]
    options = dict(options)
    run_trajectory(kind, config, n, feed, eta=options.pop("eta", 0.0), **options)


ZERO_SNR = dict(SD1, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)


@pytest.mark.parametrize("n", (1, 7, 25))
@pytest.mark.parametrize("kind", ["ddpm", "ddim", "euler", "euler-a", "dpm", "unipc", "dpm-sde", "lcm", "tcd"])
def test_zero_terminal_snr_matches_diffusers(kind, n, feed):
    # sigma_T = 4096 here: diffusers' float32 Euler step cancels ~1e-4 of a 4096-sized sample, so compare
    # step by step from diffusers' own samples instead of along two free-running trajectories.
    config = dict(ZERO_SNR, algorithm_type="sde-dpmsolver++") if kind == "dpm-sde" else ZERO_SNR
    run_trajectory(kind.removesuffix("-sde"), config, n, feed, teacher_forcing=True)


@pytest.mark.parametrize("kind", ["unipc", "dpm"])
def test_zero_terminal_snr_with_karras_sigmas_matches_diffusers_until_its_first_timestep_repeats(kind, feed):
    # unipc-karras, dpmpp-2m-karras. From 21 steps the Karras sigmas near 4096 round to a repeated first timestep (999,
    # 999, ...): diffusers' first step looks its index up by value, takes the second, starts at the second sigma and
    # fails on its last step, so there is no diffusers run to compare with there; ours index steps by count.
    config = dict(ZERO_SNR, use_karras_sigmas=True)
    for n in (1, 7, 20):  # 14-20 repeat later timesteps, which diffusers indexes by count: still equal
        run_trajectory(kind, config, n, feed)
    theirs, ours = make_pair(kind, config)
    theirs.set_timesteps(21)
    assert theirs.timesteps[0] == theirs.timesteps[1] and np.array_equal(ours.set_timesteps(21).timesteps, theirs.timesteps.numpy())
    x = torch.ones((1, 4, 2, 2))
    with pytest.raises((AssertionError, IndexError)):
        for t in theirs.timesteps:
            x = theirs.step(x, t, x).prev_sample


# ---- img2img: with_strength + add_noise ----------------------------------------------------------------
STRENGTH_CASES = [
    (kind, preset) for kind in CLASSES for preset in ("sd1", "linear-defaults")
] + [("dpm", "karras"), ("euler", "karras"), ("lms", "karras"), ("unipc", "karras"), ("heun", "karras"), ("dpm", "sde-karras"), ("dpmsde", "karras")]


@pytest.mark.parametrize("n,strength", [(7, 0.5), (25, 0.8), (10, 1.0)])
@pytest.mark.parametrize("kind,preset", STRENGTH_CASES, ids=[f"{k}-{p}" for k, p in STRENGTH_CASES])
def test_img2img_matches_diffusers(kind, preset, n, strength, feed):
    if preset == "sde-karras":
        config = dict(SD1, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++")
    else:
        config = dict(SD1, use_karras_sigmas=True) if preset == "karras" else PRESETS[preset]
    run_trajectory(kind, config, n, feed, strength=strength)


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_add_noise_at_every_step_matches_diffusers(kind):
    theirs, ours = make_pair(kind, SD1)
    theirs.set_timesteps(20)
    run = ours.set_timesteps(20)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    for i, t in enumerate(theirs.timesteps):
        if hasattr(theirs, "set_begin_index"):
            theirs.set_begin_index(i)  # sigma-indexed schedulers: address the step, not the timestep value
        ref = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t.reshape(1).repeat(2)).numpy()
        np.testing.assert_allclose(run.add_noise(x0, noise, i), ref, rtol=1e-5, atol=1e-6, err_msg=f"step {i}")


# ---- tables ----------------------------------------------------------------------------------------------
TABLE_CONFIGS = {
    **PRESETS,
    "karras": dict(SD1, use_karras_sigmas=True),
    "cosine-karras": dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True),
}


@pytest.mark.parametrize("preset", sorted(TABLE_CONFIGS))
@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_timesteps_sigmas_and_init_sigma_match_diffusers(kind, preset):
    config = TABLE_CONFIGS[preset]
    theirs, ours = make_pair(kind, config)
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=2e-6)
    for n in (1, 2, 3, 4, 5, 7, 10, 14, 15, 16, 25, 33, 50, 77, 100, 1000):
        if n == 1000 and ours.config.use_karras_sigmas:
            continue  # diffusers inverts 1000 sigmas one by one: slow, and nothing new
        if kind == "pndm" and n < 4 and not ours.config.skip_prk_steps:
            continue
        if kind in ("lcm", "tcd") and n > ours.config.original_inference_steps:
            continue  # diffusers and we refuse: the steps are picked from the distillation schedule (tested elsewhere)
        if kind in ("ddim", "ddpm", "pndm") and n == 1000 and ours.config.timestep_spacing == "leading":
            if ours.config.steps_offset:
                continue  # timestep 1000: diffusers indexes past alphas_cumprod, we raise (tested elsewhere)
        theirs.set_timesteps(n)
        run = ours.set_timesteps(n)
        assert_same_timesteps(theirs.timesteps, run.timesteps)
        if hasattr(run, "sigmas"):
            np.testing.assert_allclose(run.sigmas, theirs.sigmas.numpy(), rtol=2e-6, atol=0, err_msg=f"n={n}")
        np.testing.assert_allclose(run.init_noise_sigma, float(theirs.init_noise_sigma), rtol=1e-6)
        assert run.order == theirs.order


# ---- configs written by diffusers ---------------------------------------------------------------------------
@pytest.mark.parametrize("class_name", sorted(CLASSES.values()))
def test_diffusers_defaults_table_matches_diffusers(class_name):
    import dataclasses
    import inspect

    from ldm_rt.runtime.schedulers import DIFFUSERS_DEFAULTS, SchedulerConfig

    signature = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    ours = {f.name for f in dataclasses.fields(SchedulerConfig)}
    expected = {k: p.default for k, p in signature.items() if k in ours}
    assert DIFFUSERS_DEFAULTS[class_name] == expected


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_config_saved_by_diffusers_loads_with_the_same_values(kind, tmp_path):
    config = dict(SD1, prediction_type="v_prediction", timestep_spacing="trailing")
    if kind in ("euler", "dpm", "lms", "unipc", "heun"):
        config["use_karras_sigmas"] = True
    theirs = getattr(diffusers, CLASSES[kind]).from_config(config)
    theirs.save_config(tmp_path)
    from ldm_rt.runtime.schedulers import scheduler_from_diffusers_json

    ours = scheduler_from_diffusers_json(tmp_path / "scheduler_config.json")
    assert type(ours).diffusers_class == CLASSES[kind]
    for key in ours.config.to_dict():
        if key in theirs.config:
            value = getattr(ours.config, key)
            assert (list(value) if isinstance(value, tuple) else value) == theirs.config[key], key


# ---- UniPC where diffusers divides by zero ------------------------------------------------------------------
def test_unipc_bh1_last_step_to_sigma_zero_is_the_data_prediction_where_diffusers_gives_nan(feed):
    theirs, ours = make_pair("unipc", dict(SD1, solver_type="bh1"))
    theirs.set_timesteps(5)
    run = ours.set_timesteps(5)
    x = np.random.default_rng(0).standard_normal((1, 4, 2, 2)).astype(np.float32)
    x_ref = torch.from_numpy(x)
    for i, t in enumerate(theirs.timesteps):
        last = x
        x = run.step(toy_model(x, t), i, x)
        x_ref = theirs.step(torch.from_numpy(toy_model(x_ref.numpy(), t.item())), t, x_ref).prev_sample
        if i < 4:
            assert_close(x_ref.numpy(), x, x_ref.numpy(), f"step {i}")
    assert np.isnan(x_ref.numpy()).all()  # B(h) = h = -inf times a zero residual
    sigma = float(run.sigmas[4])
    alpha = 1 / np.sqrt(sigma**2 + 1)
    eps = toy_model(last, run.timesteps[4]).astype(np.float64)
    np.testing.assert_allclose(x, (last / alpha - sigma * eps), rtol=1e-5)  # x0 of the last model output


def test_unipc_refuses_the_config_whose_last_step_diffusers_divides_by_zero():
    from ldm_rt.runtime.schedulers import SchedulerConfigError

    theirs = diffusers.UniPCMultistepScheduler.from_config(dict(SD1, lower_order_final=False))
    theirs.set_timesteps(5)
    x = torch.ones((1, 4, 2, 2))
    for t in theirs.timesteps:
        x = theirs.step(0.1 * x, t, x).prev_sample
    assert not torch.isfinite(x).any()
    with pytest.raises(SchedulerConfigError, match="lower_order_final=true or final_sigmas_type='sigma_min'"):
        scheduler_from_diffusers_config({"_class_name": "UniPCMultistepScheduler", **SD1, "lower_order_final": False})


# ---- LCM: steps are picked from the distillation schedule ----------------------------------------------------
def test_lcm_refuses_more_steps_than_the_distillation_schedule_as_diffusers_does():
    from ldm_rt.runtime.schedulers import SchedulerConfigError

    theirs, ours = make_pair("lcm", dict(SD1, original_inference_steps=20))
    with pytest.raises(ValueError):
        theirs.set_timesteps(21)
    with pytest.raises(SchedulerConfigError, match="at most 20 steps"):
        ours.set_timesteps(21)
    run = ours.set_timesteps(20)
    with pytest.raises(SchedulerConfigError, match="raise strength or lower the steps"):
        run.with_strength(0.5)  # keeps 10 distillation timesteps for 20 steps
    with pytest.raises(ValueError):
        theirs.set_timesteps(20, strength=0.5)


# ---- DPM++ 2S ancestral: no diffusers class; k-diffusion's sampler is the oracle ------------------------------
def sample_dpmpp_2s_ancestral(model, x, sigmas, noises, eta=1.0):
    """k-diffusion's sample_dpmpp_2s_ancestral (k_diffusion/sampling.py, v0.1.1, MIT; s_noise = 1), transcribed
    in torch with the noise sampler replaced by `noises` (k-diffusion is not a dependency). Returns every x."""

    def get_ancestral_step(sigma_from, sigma_to):
        if not eta:
            return sigma_to, 0.0
        sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
        return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up

    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    out = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            d = (x - denoised) / sigmas[i]
            x = x + d * (sigma_down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = model(x_2, sigma_fn(s))
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noises[i] * sigma_up
        out.append(x)
    return out


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", (1, 4, 25))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_dpmpp_2s_ancestral_matches_k_diffusion_on_euler_ancestrals_sigmas(spacing, n, prediction_type, eta):
    from ldm_rt.runtime.schedulers import make_scheduler
    from ldm_rt.runtime.schedulers.config import SchedulerConfig

    config = dict(SD1, timestep_spacing=spacing, prediction_type=prediction_type)
    theirs = diffusers.EulerAncestralDiscreteScheduler.from_config(config)  # the sigma schedule and t(sigma)
    theirs.set_timesteps(n)
    run = make_scheduler("dpmpp-2s-a", SchedulerConfig.from_dict(config), eta=eta).set_timesteps(n)
    sigmas64 = theirs.sigmas.double()
    log_sigmas = np.log(((1 - theirs.alphas_cumprod) / theirs.alphas_cumprod) ** 0.5).numpy()
    step_t = dict(zip(theirs.sigmas[:-1].tolist(), theirs.timesteps.tolist()))
    calls = []

    def denoiser(x, sigma):  # k-diffusion's CompVis-style wrapper: c_in, t(sigma), D from eps or v
        s = float(sigma)
        t = step_t.get(float(np.float32(s)), float(diffusers.EulerDiscreteScheduler._sigma_to_t(None, np.array([s]), log_sigmas)[0]))
        x_in = (x / (s**2 + 1) ** 0.5).float().numpy()
        calls.append((t, x_in))
        m = torch.from_numpy(toy_model(x_in, t)).double()
        if prediction_type == "epsilon":
            return x - s * m
        return m * (-s / (s**2 + 1) ** 0.5) + x / (s**2 + 1)

    rng = np.random.default_rng(n)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32) * np.float32(run.init_noise_sigma)
    noises = [rng.standard_normal(x.shape).astype(np.float32) for _ in range(n)]
    ref = sample_dpmpp_2s_ancestral(denoiser, torch.from_numpy(x).double(), sigmas64, [torch.from_numpy(z).double() for z in noises], eta)
    assert run.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
    assert len(run.timesteps) == len(calls) == 2 * n - 1
    for i, t in enumerate(run.timesteps):
        x_in = run.scale_model_input(x, i)
        np.testing.assert_allclose(float(t), calls[i][0], rtol=1e-4, err_msg=f"timestep {i}")  # float32 midpoint sigma
        np.testing.assert_allclose(x_in, calls[i][1], rtol=1e-4, atol=1e-4, err_msg=f"model input {i}")
        x = run.step(toy_model(x_in, t), i, x, noise=noises[i // 2] if i % 2 else None)
        if i % 2 or i == len(run.timesteps) - 1:
            assert_close(ref[i // 2].numpy(), x, ref[i // 2].numpy(), f"step {i // 2}")
