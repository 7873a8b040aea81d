"""The language-neutral sampler spec (runtime/sampler_spec.py) and its golden vectors (tests/golden/)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_runtime_fixtures import synthetic

from ldm_rt.runtime.artifacts import Artifacts
from ldm_rt.runtime.contracts import ModelFacts, ShapeProfile, build_contracts
from ldm_rt.runtime.manifest import GUIDANCE, FileEntry, Manifest
from ldm_rt.runtime.pipeline import Pipeline
from ldm_rt.runtime.sampler_spec import (
    MODEL_OUTPUT_FORMULA,
    VECTOR_CONFIGS,
    VECTOR_SHAPE,
    SamplerSpecError,
    main,
    sampler_spec,
    vector_model_output,
)
from ldm_rt.runtime.schedulers import SCHEDULERS, SchedulerConfig, make_scheduler

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / "tests" / "golden" / "sampler_vectors.json"
DOC = REPO / "docs" / "sampler_spec.md"


@pytest.fixture(scope="module")
def vectors():
    return json.loads(VECTORS.read_text())


def assert_same(new, old, where="vectors", rtol=1e-6, atol=1e-6):
    """Equal structure, equal ints/strings/None; floats within rtol/atol (libm may differ in the last ulp)."""
    if isinstance(old, dict):
        assert isinstance(new, dict) and sorted(new) == sorted(old), where
        for k in old:
            assert_same(new[k], old[k], f"{where}.{k}", rtol, atol)
    elif isinstance(old, list) and old and all(isinstance(v, float) for v in old):
        np.testing.assert_allclose(np.float32(new), np.float32(old), rtol=rtol, atol=atol, err_msg=where)
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), where
        for k, (a, b) in enumerate(zip(new, old)):
            assert_same(a, b, f"{where}[{k}]", rtol, atol)
    elif isinstance(old, float):
        np.testing.assert_allclose(np.float32(new), np.float32(old), rtol=rtol, atol=atol, err_msg=where)
    else:
        assert new == old, where


def test_committed_vectors_are_what_the_command_writes(tmp_path, vectors):
    out = tmp_path / "vectors.json"
    subprocess.run([sys.executable, "-m", "ldm_rt.runtime.sampler_spec", "--write-vectors", str(out)], check=True, capture_output=True)
    assert_same(json.loads(out.read_text()), vectors)
    assert VECTORS.stat().st_size < 1_000_000
    # Every scheduler is pinned for both configs, at two step counts on SD v1's.
    cases = {(c["config"], c["scheduler"], c["steps"]) for c in vectors["cases"]}
    assert {(s, n) for cfg, s, n in cases if cfg == "sd-v1"} == {(s, n) for s in SCHEDULERS for n in (4, 20)}
    assert {s for cfg, s, _ in cases if cfg == "v-prediction"} == set(SCHEDULERS)
    assert vectors["model_output"] == MODEL_OUTPUT_FORMULA


def vector_pipeline(config: SchedulerConfig) -> Pipeline:
    """A Pipeline over in-memory artifacts whose UNet is the vectors' closed-form model (no text encoder,
    4x4 pixels -> the vectors' 2x2 latents) and whose decoder is a stub: only the loop is exercised."""
    b, c, h, w = VECTOR_SHAPE
    facts = ModelFacts(
        latent_channels=c, latent_factor=2, unet_factor=1, unet_in_channels=c, unet_out_channels=c, context_length=None,
        context_dim=None, vocab_size=None, num_classes=None, autoencoder_kind="kl", scale_factor=1.0,
    )
    profile = ShapeProfile.static(b, 2 * h, 2 * w)
    contracts = build_contracts(facts, profile)
    manifest = Manifest(facts, profile, {}, None, FileEntry("scheduler_config.json", "", 0), {}, {})

    class FormulaUNet:
        contract = contracts["unet"]

        def run(self, feeds):
            self.contract.check_inputs(feeds)
            return {"out_sample": vector_model_output(feeds["sample"], feeds["timestep"])}

    class StubDecoder:
        contract = contracts["vae_decoder"]

        def run(self, feeds):
            n, _, lh, lw = feeds["latent"].shape
            return {"image": np.zeros((n, 3, 2 * lh, 2 * lw), np.float32)}

    artifacts = Artifacts(Path("."), manifest, None, config, "vectors")
    return Pipeline.from_artifacts(artifacts, {"unet": FormulaUNet(), "vae_decoder": StubDecoder()}, "formula", "fp32")


@pytest.mark.parametrize("config_name", list(VECTOR_CONFIGS))
def test_the_runtime_loop_reproduces_the_vectors(vectors, config_name):
    pipe = vector_pipeline(VECTOR_CONFIGS[config_name])
    b, c, h, w = VECTOR_SHAPE
    cases = [case for case in vectors["cases"] if case["config"] == config_name]
    assert cases
    for case in cases:
        samples = []
        result = pipe.generate(
            "", steps=case["steps"], scheduler=case["scheduler"], seed=vectors["seed"], height=2 * h, width=2 * w,
            callback=lambda i, n, t, x: samples.append(x.copy()),
        )
        where = f"{config_name} {case['scheduler']} {case['steps']} steps"
        assert len(samples) == len(case["loop"]) == len(result.timings["unet"]), where  # one timing per UNet call
        if case["scheduler"] == "heun":
            assert len(result.timings["unet"]) == 2 * case["steps"] - 1, where  # two calls per step but the last
        for i, (x, step) in enumerate(zip(samples, case["loop"])):
            np.testing.assert_allclose(x.ravel(), np.float32(step["sample"]), rtol=1e-6, atol=1e-6, err_msg=f"{where}, step {i}")
        np.testing.assert_allclose(result.latents.ravel(), np.float32(case["final"]), rtol=1e-6, atol=1e-6, err_msg=where)


def test_vectors_replay_with_the_recorded_noise_and_no_generator(vectors):
    """What a port does: start from initial_noise, evaluate the formula, step with the recorded noise."""
    for case in vectors["cases"]:
        run = make_scheduler(case["scheduler"], VECTOR_CONFIGS[case["config"]]).set_timesteps(case["steps"])
        x = np.float32(case["initial_noise"]).reshape(VECTOR_SHAPE) * np.float32(case["init_noise_sigma"])
        for i, step in enumerate(case["loop"]):
            x_in = run.scale_model_input(x, i)
            np.testing.assert_allclose(x_in.ravel(), np.float32(step["model_input"]), rtol=1e-6, atol=1e-6)
            m = vector_model_output(x_in, np.float32(step["t"]))
            noise = None if step["noise"] is None else np.float32(step["noise"]).reshape(VECTOR_SHAPE)
            x = run.step(m, i, x, noise=noise)  # raises if the scheduler wants noise where the vector has none
        np.testing.assert_allclose(x.ravel(), np.float32(case["final"]), rtol=1e-6, atol=1e-6, err_msg=case["scheduler"])


def test_spec_tables_are_the_schedulers_own_exactly():
    config = SchedulerConfig()
    spec = sampler_spec(config, step_counts=(7,))
    json.dumps(spec, allow_nan=False)  # strict JSON: a native parser must accept it
    assert np.array_equal(np.float32(spec["alphas_cumprod"]), make_scheduler("ddim", config).alphas_cumprod)
    for name in SCHEDULERS:
        run = make_scheduler(name, config).set_timesteps(7)
        entry = spec["schedulers"][name]["runs"]["7"]
        assert np.array_equal(np.asarray(entry["timesteps"], dtype=run.timesteps.dtype), run.timesteps), name
        assert np.float32(entry["init_noise_sigma"]) == np.float32(run.init_noise_sigma), name
        if hasattr(run, "sigmas"):
            assert np.array_equal(np.float32(entry["sigmas"]), run.sigmas), name
    s = spec["schedulers"]
    assert s["ddim"]["runs"]["7"]["noise_steps"] == [] and s["ddim"]["eta"] == 0.0
    assert s["euler-a"]["runs"]["7"]["noise_steps"] == list(range(6))  # the last step (sigma 0) draws none
    assert s["ddpm"]["runs"]["7"]["noise_steps"] == list(range(7))  # steps_offset 1: t never reaches 0
    assert s["dpmpp-2m-karras"]["config_overrides"] == {"use_karras_sigmas": True}
    assert s["dpmpp-2m-sde-karras"]["config_overrides"] == {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}
    assert s["dpmpp-2m-sde"]["stochastic"] and s["dpmpp-2m-sde"]["runs"]["7"]["noise_steps"] == list(range(6))  # tail sigma 0: none
    assert s["euler-karras"]["config_overrides"] == {"use_karras_sigmas": True} and not s["euler-karras"]["stochastic"]
    orders = s["dpmpp-2m"]["runs"]["7"]["step_orders"]
    assert orders[0] == 1 and orders[-1] == 1 and set(orders[1:-1]) == {2}
    # LMS: the Lagrange basis sums to 1, so each step's coefficients integrate to sigma_{i+1} - sigma_i.
    lms = s["lms"]["runs"]["7"]
    for i, coeffs in enumerate(lms["lms_coefficients"]):
        assert sum(coeffs) == pytest.approx(np.float64(np.float32(lms["sigmas"][i + 1])) - np.float64(np.float32(lms["sigmas"][i])), rel=1e-9)


def test_zero_snr_configs_mark_unsupported_schedulers_and_own_tables():
    config = dataclasses.replace(SchedulerConfig(), rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    spec = sampler_spec(config, step_counts=(5,))
    assert "unsupported" in spec["schedulers"]["pndm"] and "rescale_betas_zero_snr" in spec["schedulers"]["pndm"]["unsupported"]
    assert "no rescale_betas_zero_snr" in spec["schedulers"]["heun"]["unsupported"]
    assert spec["schedulers"]["unipc"]["runs"]["5"]["sigmas"][0] == pytest.approx(4096)  # the 2**-24 floor, as diffusers
    assert spec["alphas_cumprod"][-1] == 0.0 and np.float32(spec["schedulers"]["euler"]["alphas_cumprod"][-1]) == np.float32(2.0**-24)
    # Default step counts stop at num_train_timesteps; a run the runtime refuses is marked, not fatal.
    with np.errstate(divide="ignore", invalid="ignore"):  # 20 of 20 steps repeat sigmas: degenerate on purpose
        short = sampler_spec(SchedulerConfig(num_train_timesteps=20))
    assert list(short["schedulers"]["ddim"]["runs"]) == ["10", "20"]
    assert "outside the training range" in short["schedulers"]["ddim"]["runs"]["20"]["unsupported"]
    with pytest.raises(SamplerSpecError, match="step_counts"):
        sampler_spec(config, step_counts=(0,))
    with pytest.raises(SamplerSpecError, match="unknown schedulers"):
        sampler_spec(config, schedulers=("kdpm2",))


def test_spec_of_an_artifacts_folder_states_the_model_side(tmp_path_factory, tmp_path):
    root, _ = synthetic(tmp_path_factory)
    manifest = Manifest.read(root)
    out = tmp_path / "spec.json"
    assert main(["--model", str(root), "--steps", "25", "--out", str(out)]) == 0
    spec = json.loads(out.read_text())
    model = spec["model"]
    assert model["tokenizer"] == {"file": "tokenizer.json", "sha256": manifest.tokenizer.sha256, "max_length": manifest.facts.context_length}
    assert (model["latent_channels"], model["latent_factor"], model["scale_factor"]) == (4, 2, 0.5)
    assert model["components"] == json.loads(json.dumps({n: e.contract.to_dict() for n, e in manifest.components.items()}))
    assert spec["guidance"] == GUIDANCE
    assert list(spec["schedulers"]["ddim"]["runs"]) == ["25"]
    # The manifest carries it through a write/read (export stores it there).
    manifest.sampler_spec = spec
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path).sampler_spec == spec
    assert main(["--model", str(tmp_path / "missing")]) == 2


def test_the_doc_covers_every_scheduler_name():
    text = DOC.read_text()
    for name in SCHEDULERS:
        assert f"`{name}`" in text, name
    assert "PCG64" in text and "ziggurat" in text


def test_lms_coefficients_come_from_the_run_tables_hook_and_follow_a_strength_start():
    # Issue 15: LMS states its coefficients through SchedulerRun.tables() like every scheduler's own tables,
    # so a spec (or a port) replays exactly what _step uses, also for a run started part-way (img2img).
    from ldm_rt.runtime.schedulers import make_scheduler
    from ldm_rt.runtime.schedulers.lms import LMS_ORDER, lms_coefficient

    run = make_scheduler("lms", SchedulerConfig()).set_timesteps(8)
    tables = run.tables()["all_lms_coefficients"]
    assert [len(c) for c in tables] == [min(g + 1, LMS_ORDER) for g in range(8)]
    assert tables[5][2] == lms_coefficient(run.sigmas, LMS_ORDER, 5, 2)
    late = run.with_strength(0.5)
    assert late.begin_index > 0 and late.tables()["all_lms_coefficients"] == tables
    spec = sampler_spec(SchedulerConfig(), step_counts=(8,), schedulers=("lms",))
    assert spec["schedulers"]["lms"]["runs"]["8"]["lms_coefficients"] == tables
