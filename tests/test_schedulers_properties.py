"""Properties every scheduler satisfies (no oracle needed): timestep order and count, an exact model
leads back to x0, explicit randomness, independent runs, errors on misuse."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ldm_rt.runtime.schedulers import (
    SCHEDULERS,
    SchedulerConfig,
    SchedulerConfigError,
    SchedulerStepError,
    make_scheduler,
)
from ldm_rt.runtime.schedulers.config import train_sigmas

NAMES = sorted(SCHEDULERS)
VARIANTS = {name: (name, {}) for name in NAMES} | {"ddim-eta": ("ddim", {"eta": 0.7}), "dpmpp-2s-eta-0": ("dpmpp-2s-a", {"eta": 0.0}),
                                                   "dpmpp-2s-a-eta-0.5": ("dpmpp-2s-a", {"eta": 0.5}), "tcd-gamma-0.6": ("tcd", {"gamma": 0.6})}
STOCHASTIC = ("ddpm", "euler-a", "ddim-eta", "dpmpp-2m-sde", "dpmpp-2m-sde-karras", "lcm", "tcd", "dpmpp-2s-a", "dpmpp-2s-a-eta-0.5",
              "tcd-gamma-0.6", "dpmpp-sde", "dpmpp-sde-karras")
MULTISTEP = ("dpmpp-2m", "dpmpp-2m-karras", "dpmpp-2m-sde", "dpmpp-2m-sde-karras", "pndm", "lms", "lms-karras", "unipc", "unipc-karras",
             "heun", "heun-karras")
SHAPE = (2, 4, 8, 8)


def make(variant: str, config: SchedulerConfig | None = None):
    name, options = VARIANTS[variant]
    return make_scheduler(name, config or SchedulerConfig(), **options)


def toy_model(x, t):
    return (0.1 * x * np.cos(float(t) / 100) + 0.05 * np.sin(x)).astype(np.float32)


def sample(run, x, *, seed=None, noises=None, model=toy_model):
    """The whole loop; returns every intermediate sample."""
    rng = None if seed is None else np.random.default_rng(seed)
    out = []
    for i, t in enumerate(run.timesteps):
        noise = None if noises is None else noises[i]
        x = run.step(model(run.scale_model_input(x, i), t), i, x, generator=rng, noise=noise)
        out.append(x)
    return out


def oracle_model(scheduler, x0, prediction_type):
    """The exact denoiser for data x0: eps (or v) that makes x_in = sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
    sigmas = train_sigmas(scheduler.alphas_cumprod).astype(np.float64)

    def model(x_in, t):
        # fractional t (Karras sigmas): log sigma interpolated, as the schedulers read t back from sigma (sigma_to_t)
        sigma = np.exp(np.interp(float(t), np.arange(len(sigmas)), np.log(sigmas)))
        a = 1 / (1 + sigma**2)
        eps = (x_in - np.sqrt(a) * x0) / np.sqrt(1 - a)
        if prediction_type == "epsilon":
            return eps.astype(np.float32)
        return (np.sqrt(a) * eps - np.sqrt(1 - a) * x0).astype(np.float32)  # v

    return model


# ---- timesteps --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 2, 10, 50, 500])
@pytest.mark.parametrize("name", NAMES)
def test_timesteps_decrease_and_count(name, n, spacing):
    if name in ("lcm", "tcd") and n > 50:
        with pytest.raises(SchedulerConfigError, match="more than original_inference_steps=50"):
            make_scheduler(name, SchedulerConfig(timestep_spacing=spacing)).set_timesteps(n)
        return
    run = make_scheduler(name, SchedulerConfig(timestep_spacing=spacing)).set_timesteps(n)
    t = np.asarray(run.timesteps, dtype=np.float64)
    assert run.timesteps.dtype in (np.int64, np.float32)
    assert t.min() >= 0 and t.max() <= 999
    assert len(run) == len(run.timesteps)
    # dpmpp-2s-a: a midpoint's t(sigma) (log-sigma interpolation) may pass the next step's t by float rounding
    assert np.all(np.diff(t) <= (1e-3 if name == "dpmpp-2s-a" else 0))
    if hasattr(run, "sigmas"):
        assert len(run.sigmas) == len(t) + 1 and run.sigmas[-1] == 0
        assert np.all(np.diff(run.sigmas[::run.order]) < 0)  # heun: [s0, s1, s1, s2, s2, ..., 0]
    if name in ("heun", "heun-karras"):
        # two model calls per step: every timestep after the first twice, 2n - 1 entries
        assert len(t) == 2 * n - 1 and run.order == 2
        assert np.array_equal(t[1::2], t[2::2]) and np.all(np.diff(t[::2]) < 0)
        assert np.array_equal(run.sigmas[1:-1:2], run.sigmas[2::2])
    elif name == "dpmpp-2s-a":
        # a midpoint call between steps: 2n - 1 entries; at eta = 1 the midpoint sigma is the next step's
        assert len(t) == 2 * n - 1 and run.order == 2 and np.all(np.diff(t[::2]) < 0)
        np.testing.assert_allclose(run.sigmas[1:-1:2], run.sigmas[2::2][: n - 1], rtol=1e-5)
    elif name.startswith("dpmpp-sde"):
        # Heun's sigma table; the second call of each step is at the log-midpoint, between the step's timesteps
        assert len(t) == 2 * n - 1 and run.order == 2 and np.all(np.diff(t[::2]) < 0)
        assert np.array_equal(run.sigmas[1:-1:2], run.sigmas[2::2])
        assert np.all((run.midpoints < run.sigmas[0:-2:2]) & (run.midpoints > run.sigmas[1:-1:2]))
    elif name == "pndm":
        # PLMS re-evaluates its second timestep once (a two-evaluation first step): n + 1 entries.
        assert len(t) == (n + 1 if n > 1 else 1)
        assert np.sum(np.diff(t) == 0) == (1 if n > 1 else 0)
    else:
        assert len(t) == n
        if not (name.startswith(("dpmpp", "unipc")) and name.endswith("-karras")):  # diffusers rounds these Karras timesteps: the tail repeats 0, 1, ...
            assert np.all(np.diff(t) < 0)


def test_pndm_runge_kutta_warmup_timesteps():
    run = make_scheduler("pndm", SchedulerConfig(skip_prk_steps=False)).set_timesteps(10)
    # 3 Runge-Kutta steps of 4 evaluations over the last 4 timesteps' span, then PLMS on the rest
    assert len(run.prk_timesteps) == 12 and len(run.timesteps) == 12 + 10 - 3
    assert np.all(np.diff(run.timesteps) <= 0)


# ---- an exact model denoises ---------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 5, 50])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_oracle_model_recovers_x0(variant, n, prediction_type):
    # set_alpha_to_one: DDIM/PNDM end at alpha_bar = 1 (else at alpha_bar_0, 3 % noise left by design).
    scheduler = make(variant, SchedulerConfig(set_alpha_to_one=True, prediction_type=prediction_type))
    rng = np.random.default_rng(0)
    x0 = np.tanh(rng.standard_normal(SHAPE)).astype(np.float32)
    run = scheduler.set_timesteps(n)
    x = run.init_noise_sigma * rng.standard_normal(SHAPE).astype(np.float32)
    x = sample(run, x, seed=1, model=oracle_model(scheduler, x0, prediction_type))[-1]
    tol = 2e-5
    if (variant, prediction_type) == ("pndm", "v_prediction"):
        # PLMS combines v predictions of different timesteps before converting them to eps (as diffusers
        # does); v is not constant along the trajectory, so the combination is exact only as n grows.
        tol = {1: 2e-5, 5: 0.1, 50: 2e-3}[n]
    if variant.startswith("tcd"):
        # TCD's last step ends at timestep 0 (alpha_bar_0 < 1, as diffusers): sqrt(1 - alpha_bar_0) ~ 3 % noise left.
        tol = 0.15
    assert np.abs(x - x0).max() < tol


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
def test_unipc_of_every_order_and_b_h_recovers_x0_with_the_oracle_model(order, solver_type):
    # UniPC's corrector and predictor extrapolate the data predictions: all equal x0 here, so every
    # divided difference vanishes and each step lands exactly on the oracle's trajectory.
    scheduler = make_scheduler("unipc", SchedulerConfig(solver_order=order, solver_type=solver_type, prediction_type="v_prediction"))
    assert scheduler.config.solver_order == order and scheduler.config.solver_type == solver_type
    rng = np.random.default_rng(0)
    x0 = np.tanh(rng.standard_normal(SHAPE)).astype(np.float32)
    run = scheduler.set_timesteps(8)
    assert run.tables()["step_orders"] == [min(order, k + 1, 8 - k) for k in range(8)]
    x = sample(run, rng.standard_normal(SHAPE).astype(np.float32), model=oracle_model(scheduler, x0, "v_prediction"))[-1]
    assert np.abs(x - x0).max() < 2e-5


def test_unipc_warns_below_the_steps_measured_sound_on_a_zero_terminal_snr_schedule():
    assert make_scheduler("unipc", SchedulerConfig(rescale_betas_zero_snr=True)).fewest_sound_steps == 12
    assert make_scheduler("unipc", SchedulerConfig()).fewest_sound_steps == 0
    # unipc-karras: DPM++ 2M Karras's bound (the same Karras sigmas from sigma_T = 4096; measured clean from 35, unipc.py)
    assert make_scheduler("unipc-karras", SchedulerConfig(rescale_betas_zero_snr=True)).fewest_sound_steps == 40
    assert make_scheduler("unipc-karras", SchedulerConfig()).fewest_sound_steps == 0



@pytest.mark.parametrize("name, fewest", [("euler-karras", 15), ("dpmpp-2m-sde", 15), ("dpmpp-2m-sde-karras", 40), ("euler", 0), ("dpmpp-2s-a", 15), ("tcd", 20)])
def test_karras_and_sde_warn_below_the_steps_measured_sound_on_a_zero_terminal_snr_schedule(name, fewest):
    assert make_scheduler(name, SchedulerConfig(rescale_betas_zero_snr=True)).fewest_sound_steps == fewest
    assert make_scheduler(name, SchedulerConfig()).fewest_sound_steps == 0


ZERO_SNR = SchedulerConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction", set_alpha_to_one=True)


@pytest.mark.parametrize("n", [1, 5, 50])
@pytest.mark.parametrize("name", [n for n in NAMES if n.removesuffix("-karras") not in ("pndm", "lms", "heun", "dpmpp-sde")])
def test_every_scheduler_but_pndm_lms_and_heun_samples_a_zero_terminal_snr_schedule(name, n):
    """The shipped default model's kind of schedule (Lin et al. 2024): x_T is pure noise, v-prediction."""
    scheduler = make_scheduler(name, ZERO_SNR)
    rng = np.random.default_rng(0)
    x0 = np.tanh(rng.standard_normal(SHAPE)).astype(np.float32)
    run = scheduler.set_timesteps(n)
    x = run.init_noise_sigma * rng.standard_normal(SHAPE).astype(np.float32)
    with np.errstate(divide="ignore"):  # the oracle's sigma_T is inf where alpha_bar_T = 0 (ddim, ddpm)
        model = oracle_model(scheduler, x0, "v_prediction")
    x = sample(run, x, seed=1, model=model)[-1]
    # tcd ends at timestep 0, not at alpha_bar = 1 (as diffusers): ~3 % noise left.
    assert np.abs(x - x0).max() < (0.15 if name == "tcd" else 1e-5)


@pytest.mark.parametrize(
    "name, reason",
    [("pndm", "sqrt(alpha_bar_T)"), ("lms", "unstable across the zero-SNR noise range"), ("heun", "no rescale_betas_zero_snr"),
     ("dpmpp-sde", "no rescale_betas_zero_snr"), ("dpmpp-sde-karras", "no rescale_betas_zero_snr"),
     ("heun-karras", "no rescale_betas_zero_snr"), ("lms-karras", "unstable across the zero-SNR noise range")],
)
def test_pndm_lms_and_heun_refuse_a_zero_terminal_snr_schedule_with_the_reason(name, reason):
    with pytest.raises(SchedulerConfigError) as e:
        make_scheduler(name, ZERO_SNR)
    assert reason in one_line(e) and "set it to false" not in one_line(e)  # the model's schedule is not the user's to change


# ---- randomness ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_seed_same_result_and_explicit_randomness(variant):
    scheduler = make(variant)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    a = sample(scheduler.set_timesteps(8), x, seed=3)
    b = sample(scheduler.set_timesteps(8), x, seed=3)
    c = sample(scheduler.set_timesteps(8), x, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert scheduler.is_stochastic == (variant in STOCHASTIC)
    if variant in STOCHASTIC:
        assert not np.allclose(a[-1], c[-1])
        with pytest.raises(SchedulerStepError, match="stochastic"):
            sample(scheduler.set_timesteps(8), x)  # no generator, no noise
        # a noise array is the other explicit source, and it is what the step consumes
        noises = [np.random.default_rng(i).standard_normal(SHAPE).astype(np.float32) for i in range(15)]  # 2s-a: 15 calls
        d = sample(scheduler.set_timesteps(8), x, noises=noises)
        e = sample(scheduler.set_timesteps(8), x, noises=[z * 2 for z in noises])
        first = 1 if variant.startswith("dpmpp-2s-a") else 0  # its first entry is a midpoint call, which draws none
        assert not np.allclose(d[first], e[first])
    else:
        assert all(np.array_equal(p, q) for p, q in zip(a, c))
        assert all(np.array_equal(p, q) for p, q in zip(a, sample(scheduler.set_timesteps(8), x)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_interleaved_runs_equal_sequential_runs(variant):
    scheduler = make(variant)
    rng = np.random.default_rng(0)
    xa, xb = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    noises = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(19)]  # PNDM: 11 steps, Heun: 19
    expected_a = sample(scheduler.set_timesteps(10), xa, noises=noises)
    expected_b = sample(scheduler.set_timesteps(10).with_strength(0.6), xb, noises=noises)
    run_a, run_b = scheduler.set_timesteps(10), scheduler.set_timesteps(10).with_strength(0.6)
    for i in range(len(run_a)):
        xa = run_a.step(toy_model(run_a.scale_model_input(xa, i), run_a.timesteps[i]), i, xa, noise=noises[i])
        if i < len(run_b):
            xb = run_b.step(toy_model(run_b.scale_model_input(xb, i), run_b.timesteps[i]), i, xb, noise=noises[i])
        np.testing.assert_array_equal(xa, expected_a[i])
    np.testing.assert_array_equal(xb, expected_b[-1])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_run_reuse_restarts_at_step_zero_and_dtypes(variant):
    scheduler = make(variant)
    run = scheduler.set_timesteps(6)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    first = sample(run, x, seed=0)
    assert all(s.dtype == np.float32 for s in first)
    assert run.scale_model_input(x.astype(np.float64), 0).dtype == np.float32
    again = sample(run, x, seed=0)  # step 0 clears the multistep history
    assert all(np.array_equal(p, q) for p, q in zip(first, again))


def test_scheduler_tables_are_immutable():
    scheduler = make_scheduler("euler")
    run = scheduler.set_timesteps(10)
    for array in (scheduler.betas, scheduler.alphas_cumprod, run.timesteps, run.sigmas):
        with pytest.raises(ValueError):
            array[0] = 0
    with pytest.raises(AttributeError):
        scheduler.config.beta_end = 0.5  # frozen dataclass


# ---- img2img ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_with_strength_keeps_the_last_steps(name):
    if name == "lcm":
        pytest.skip("lcm rebuilds its schedule for the strength: test_lcm_img2img_rebuilds_the_schedule_for_the_strength")
    run = make_scheduler(name).set_timesteps(20)
    part = run.with_strength(0.3)
    assert part.begin_index == 14 * run.order  # heun: two entries per step
    np.testing.assert_array_equal(part.timesteps, run.timesteps[14 * run.order :])
    assert run.with_strength(1.0).begin_index == 0
    x0 = np.zeros(SHAPE, np.float32)
    noise = np.ones(SHAPE, np.float32)
    # the noise level of add_noise decreases along the run
    levels = [float(part.add_noise(x0, noise, i).max()) for i in range(len(part))]
    assert np.all(np.diff(levels[:: run.order]) < 0)


# ---- tables for native ports -------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_tables_are_json_and_complete(name):
    run = make_scheduler(name).set_timesteps(12).with_strength(0.5)
    tables = json.loads(json.dumps(run.tables(), allow_nan=False))  # strict JSON for native ports
    assert tables["scheduler"] == name
    assert SchedulerConfig.from_dict(tables["config"]) == run.config
    assert tables["timesteps"] == run.timesteps.tolist()
    assert tables["begin_index"] == run.begin_index == len(tables["all_timesteps"]) - len(tables["timesteps"])
    assert len(tables["alphas_cumprod"]) == run.config.num_train_timesteps
    if "sigmas" in tables:
        assert len(tables["sigmas"]) == len(tables["all_timesteps"]) + 1
    if name.startswith("dpmpp-2m") or name.startswith("dpmpp-3m") or name == "unipc":
        assert tables["step_orders"][0] == 1 and set(tables["step_orders"]) <= {1, 2}


# ---- misuse ------------------------------------------------------------------------------------------------
def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize("name", NAMES)
def test_step_index_out_of_range(name):
    run = make_scheduler(name).set_timesteps(5)
    x = np.zeros(SHAPE, np.float32)
    for bad in (len(run), -1):
        with pytest.raises(SchedulerStepError) as e:
            run.step(x, bad, x, generator=np.random.default_rng(0))
        assert "out of range" in one_line(e)
    with pytest.raises(SchedulerStepError):
        run.add_noise(x, x, len(run))
    with pytest.raises(SchedulerStepError):
        run.scale_model_input(x, 1.0)


@pytest.mark.parametrize("name", MULTISTEP)
def test_multistep_runs_must_step_in_order(name):
    run = make_scheduler(name).set_timesteps(10)
    x = np.zeros(SHAPE, np.float32)
    run.step(x, 0, x, noise=x)  # noise: the SDE solvers draw some
    with pytest.raises(SchedulerStepError) as e:
        run.step(x, 2, x, noise=x)
    assert "in order" in one_line(e)


def test_step_argument_errors():
    run = make_scheduler("euler-a").set_timesteps(5)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(SchedulerStepError, match="not both"):
        run.step(x, 0, x, generator=np.random.default_rng(0), noise=x)
    with pytest.raises(SchedulerStepError, match="noise has shape"):
        run.step(x, 0, x, noise=x[:1])
    with pytest.raises(SchedulerStepError, match="model_output has shape"):
        run.step(x[:, :2], 0, x, noise=x)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: make_scheduler("kdpm2"), "valid names are"),
        (lambda: make_scheduler("euler").set_timesteps(0), "num_inference_steps"),
        (lambda: make_scheduler("euler").set_timesteps(1001), "num_inference_steps"),
        (lambda: make_scheduler("ddim").set_timesteps(1000), "training range"),  # leading + steps_offset 1
        (lambda: make_scheduler("ddim", eta=-1), "eta"),
        (lambda: make_scheduler("euler", eta=0.5), "does not take options"),
        (lambda: make_scheduler("pndm", SchedulerConfig(skip_prk_steps=False)).set_timesteps(3), ">= 4"),
        (lambda: make_scheduler("euler-a", SchedulerConfig(prediction_type="sample")), "prediction_type"),
        (lambda: make_scheduler("pndm", SchedulerConfig(rescale_betas_zero_snr=True)), "rescale_betas_zero_snr"),
        (lambda: make_scheduler("euler").set_timesteps(10).with_strength(0.0), "strength"),
        (lambda: make_scheduler("euler").set_timesteps(10).with_strength(1.5), "strength"),
        (lambda: make_scheduler("euler").set_timesteps(10).with_strength(0.05), "no denoising step"),
    ],
)
def test_misuse_raises_one_line_error(call, match):
    with pytest.raises(SchedulerConfigError) as e:
        call()
    assert match in one_line(e)


# ---- LCM ------------------------------------------------------------------------------------------------------
def test_lcm_picks_its_steps_from_the_distillation_schedule():
    run = make_scheduler("lcm").set_timesteps(4)
    assert run.timesteps.tolist() == [999, 759, 499, 259]  # k = 1000 // 50 = 20: t = 20 j - 1, j = 50, 38, 25, 13
    assert run.tables()["all_c_skip"][0] == pytest.approx(0.25 / (9990**2 + 0.25))
    late = make_scheduler("lcm", SchedulerConfig(original_inference_steps=10)).set_timesteps(10)
    assert late.timesteps.tolist() == list(range(999, 0, -100))


def test_lcm_img2img_rebuilds_the_schedule_for_the_strength():
    # as LatentConsistencyModelImg2ImgPipeline: the first int(50 * 0.5) distillation timesteps, all 4 steps over
    # them (LCMScheduler.set_timesteps(strength=); the pipeline skips none)
    part = make_scheduler("lcm").set_timesteps(4).with_strength(0.5)
    assert part.all_timesteps.tolist() == part.timesteps.tolist() == [499, 379, 259, 139]
    assert part.begin_index == 0


def test_lcm_last_step_returns_the_consistency_estimate_without_noise():
    run = make_scheduler("lcm").set_timesteps(3)
    x = np.ones(SHAPE, np.float32)
    out = sample(run, x, noises=[np.zeros(SHAPE, np.float32)] * 2 + [None])  # no noise needed at the last step
    assert np.all(np.isfinite(out[-1]))


# ---- TCD ------------------------------------------------------------------------------------------------------
def test_tcd_gamma_sets_the_intermediate_timestep_and_the_noise():
    from ldm_rt.runtime.sampler_spec import noise_steps

    for gamma, intermediate in ((0.0, [759, 499, 259, 0]), (0.3, [531, 349, 181, 0]), (1.0, [0, 0, 0, 0])):
        run = make_scheduler("tcd", gamma=gamma).set_timesteps(4)
        assert run.timesteps.tolist() == [999, 759, 499, 259]  # LCM's: picked from the distillation schedule
        assert run.tables()["all_intermediate_timesteps"] == intermediate
        assert noise_steps(run) == ([] if gamma == 0 else [0, 1, 2])
    with pytest.raises(SchedulerConfigError, match="gamma must be a number in"):
        make_scheduler("tcd", gamma=1.5)


def test_tcd_at_gamma_0_is_ddim_on_the_same_timesteps():
    # s = t_next: the intermediate step is the whole DDIM step (Song et al. eq. 12 with eta 0), ending at t = 0.
    config = SchedulerConfig(set_alpha_to_one=False)
    tcd = make_scheduler("tcd", config, gamma=0.0).set_timesteps(4)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    ours = sample(tcd, x)[-1]
    ac = tcd.scheduler.alphas_cumprod.astype(np.float64)
    y = x.astype(np.float64)
    for t, t_next in zip([999, 759, 499, 259], [759, 499, 259, 0]):
        eps = toy_model(y.astype(np.float32), t).astype(np.float64)
        x0 = (y - np.sqrt(1 - ac[t]) * eps) / np.sqrt(ac[t])
        y = np.sqrt(ac[t_next]) * x0 + np.sqrt(1 - ac[t_next]) * eps
    np.testing.assert_allclose(ours, y, rtol=1e-5, atol=1e-5)
