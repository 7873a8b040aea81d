"""SchedulerConfig: diffusers scheduler_config.json in, validated values, JSON round trip; the registry."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import pytest

from ldm_rt.runtime.schedulers import (
    DIFFUSERS_SCHEDULERS,
    SCHEDULERS,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    SchedulerConfig,
    SchedulerConfigError,
    make_scheduler,
    scheduler_from_diffusers_json,
    sd_scheduler_config,
)

# Stable Diffusion v1.5's scheduler_config.json as published.
SD15_JSON = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def test_defaults_are_stable_diffusion_v1():
    c = SchedulerConfig()
    assert (c.beta_schedule, c.beta_start, c.beta_end, c.steps_offset) == ("scaled_linear", 0.00085, 0.012, 1)
    assert SchedulerConfig.from_dict(SD15_JSON) == c


def test_from_json_ignores_private_and_unknown_keys(tmp_path, caplog):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**SD15_JSON, "prediction_type": "v_prediction", "some_future_option": 3}))
    with caplog.at_level(logging.DEBUG, logger="ldm_rt.runtime.schedulers.config"):
        config = SchedulerConfig.from_json(path)
    assert config.prediction_type == "v_prediction"
    assert "some_future_option" in caplog.text
    assert "_class_name" not in caplog.text and "_diffusers_version" not in caplog.text


def test_round_trip_through_json():
    config = SchedulerConfig(
        trained_betas=tuple(np.linspace(1e-4, 0.02, 10).tolist()),
        num_train_timesteps=10,
        use_karras_sigmas=True,
        sigma_min=0.1,
    )
    again = SchedulerConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and isinstance(again.trained_betas, tuple)
    assert math.isinf(SchedulerConfig.from_dict(json.loads(json.dumps(SchedulerConfig().to_dict()))).lambda_min_clipped)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"beta_schedule": "cubic"}, "beta_schedule"),
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"timestep_spacing": "random"}, "timestep_spacing"),
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
        ({"num_train_timesteps": "1000"}, "wrong type"),
        ({"clip_sample": "no"}, "wrong type"),
        ({"beta_start": 0.5, "beta_end": 0.1}, "beta_start"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"solver_order": 4}, "solver_order"),
        ({"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),  # deprecated in diffusers; its ++ form is supported
        ({"interpolation_type": "log_linear"}, "interpolation_type"),
        ({"final_sigmas_type": "one"}, "final_sigmas_type"),
        ({"variance_type": "fixed_large_log"}, "variance_type"),
        ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ({"timestep_type": "continuous"}, "timestep_type"),
        ({"sigma_min": -1.0}, "sigma_min"),
        ({"solver_type": "bh3"}, "solver_type"),
        ({"predict_x0": False}, "predict_x0"),
        ({"disable_corrector": [-1]}, "disable_corrector"),
        ({"disable_corrector": [0.5]}, "wrong type"),
    ],
)
def test_bad_values_raise_one_line_error(bad, match):
    with pytest.raises(SchedulerConfigError) as e:
        SchedulerConfig.from_dict({**SD15_JSON, **bad})
    message = str(e.value)
    assert match in message and "\n" not in message


def test_neutral_values_of_unsupported_options_are_accepted():
    neutral = {"use_exponential_sigmas": False, "use_beta_sigmas": None, "timestep_type": "discrete"}
    config = SchedulerConfig.from_dict(neutral)
    assert config == SchedulerConfig()


def test_unreadable_json_raises(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text("{not json")
    for load in (SchedulerConfig.from_json, scheduler_from_diffusers_json):
        with pytest.raises(SchedulerConfigError, match="cannot read"):
            load(path)
    with pytest.raises(SchedulerConfigError, match="cannot read"):
        SchedulerConfig.from_json(tmp_path / "missing.json")
    path.write_text("[1, 2]")  # both readers refuse a non-object the same way, naming the file
    for load in (SchedulerConfig.from_json, scheduler_from_diffusers_json):
        with pytest.raises(SchedulerConfigError, match=r"scheduler_config.json holds an array where a JSON object is expected"):
            load(path)


# ---- registry ------------------------------------------------------------------------------------------------
def test_registry_names_and_diffusers_classes():
    assert set(SCHEDULERS) == {
        "ddpm", "ddim", "euler", "euler-karras", "euler-a", "dpmpp-2m", "dpmpp-2m-karras", "dpmpp-2m-sde",
        "dpmpp-2m-sde-karras", "pndm", "lms", "lms-karras", "unipc", "unipc-karras", "heun", "heun-karras", "lcm", "tcd", "dpmpp-2s-a",
        "dpmpp-sde", "dpmpp-sde-karras",
    }  # fmt: skip
    for name in SCHEDULERS:
        scheduler = make_scheduler(name)
        assert scheduler.name == name
        if name == "dpmpp-2s-a":  # no diffusers class: k-diffusion's sampler is its reference
            assert scheduler.diffusers_class == "" and type(scheduler) not in DIFFUSERS_SCHEDULERS.values()
            continue
        assert DIFFUSERS_SCHEDULERS[scheduler.diffusers_class] is type(scheduler)
    assert len(DIFFUSERS_SCHEDULERS) == 12


def test_dpmpp_names_fix_order_and_karras():
    karras_config = SchedulerConfig(use_karras_sigmas=True, solver_order=3)
    plain = make_scheduler("dpmpp-2m", karras_config)
    assert plain.config.solver_order == 2 and not plain.config.use_karras_sigmas
    karras = make_scheduler("dpmpp-2m-karras")
    assert karras.config.use_karras_sigmas and karras.name == "dpmpp-2m-karras"
    assert DPMSolverMultistepScheduler(karras_config).name == "dpmpp-3m-karras"
    # The SDE names fix the algorithm too; the ODE names undo an SDE model config (as they undo Karras).
    sde_config = SchedulerConfig(algorithm_type="sde-dpmsolver++", solver_order=3)
    assert make_scheduler("dpmpp-2m", sde_config).config.algorithm_type == "dpmsolver++"
    sde = make_scheduler("dpmpp-2m-sde-karras")
    assert sde.config.algorithm_type == "sde-dpmsolver++" and sde.config.use_karras_sigmas and sde.is_stochastic
    assert DPMSolverMultistepScheduler(sde_config).name == "dpmpp-3m-sde"


def test_euler_names_fix_karras():
    assert not make_scheduler("euler", SchedulerConfig(use_karras_sigmas=True)).config.use_karras_sigmas
    karras = make_scheduler("euler-karras")
    assert karras.config.use_karras_sigmas and karras.name == "euler-karras"
    ramp = karras.set_timesteps(6).sigmas[:-1].astype(np.float64) ** (1 / 7)  # Karras et al. eq. 5: linear in sigma^(1/rho)
    assert np.allclose(np.diff(ramp), np.diff(ramp)[0], rtol=1e-4)


def test_scheduler_from_diffusers_json(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD15_JSON))
    scheduler = scheduler_from_diffusers_json(path)
    assert isinstance(scheduler, PNDMScheduler) and scheduler.config == SchedulerConfig()
    # A key the file omits takes the diffusers class's default, not SD's: DDIM clips x0 by default.
    path.write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    ddim = scheduler_from_diffusers_json(path, eta=0.5)
    assert ddim.config.clip_sample and ddim.config.set_alpha_to_one and ddim.config.beta_schedule == "linear"
    assert ddim.eta == 0.5
    path.write_text(json.dumps({"_class_name": "UniPCMultistepScheduler"}))
    unipc = scheduler_from_diffusers_json(path)
    assert unipc.name == "unipc" and unipc.config.solver_type == "bh2" and unipc.config.timestep_spacing == "linspace"
    path.write_text(json.dumps({"_class_name": "KDPM2DiscreteScheduler"}))
    with pytest.raises(SchedulerConfigError, match="unsupported diffusers scheduler class"):
        scheduler_from_diffusers_json(path)


def test_scheduler_holds_only_config_and_tables():
    scheduler = make_scheduler("dpmpp-2m")
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vars(scheduler).items()}
    run = scheduler.set_timesteps(10)
    x = np.zeros((1, 4, 8, 8), np.float32)
    for i in range(len(run)):
        x = run.step(x + 0.1, i, x)
    after = vars(scheduler)
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert np.array_equal(v, after[k]) if isinstance(v, np.ndarray) else v == after[k]
    assert dataclasses.is_dataclass(scheduler.config)


def test_sd_scheduler_config_is_the_published_one_and_a_fresh_dict_each_time():
    # One owner for SD's scheduler_config.json: what reference, training, tests and benchmarks write.
    ours = sd_scheduler_config()
    assert SchedulerConfig.from_dict(ours) == SchedulerConfig.from_dict(SD15_JSON) == SchedulerConfig()
    assert ours["_class_name"] == "PNDMScheduler"
    ours["beta_end"] = 0.5
    assert sd_scheduler_config()["beta_end"] == 0.012  # a caller's change does not leak into the next one
    assert sd_scheduler_config(_class_name="DDIMScheduler", prediction_type="v_prediction")["prediction_type"] == "v_prediction"


def test_dpm_and_unipc_read_each_others_solver_type_as_their_default():
    # as diffusers' constructors do, so one config swaps between them (from_config)
    assert make_scheduler("dpmpp-2m", SchedulerConfig(solver_type="bh1")).config.solver_type == "midpoint"
    assert make_scheduler("unipc", SchedulerConfig(solver_type="heun")).config.solver_type == "bh2"
    assert make_scheduler("unipc", SchedulerConfig(solver_type="bh1")).config.solver_type == "bh1"
    assert make_scheduler("dpmpp-2m", SchedulerConfig(solver_type="heun")).config.solver_type == "heun"
