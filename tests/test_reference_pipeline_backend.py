"""The torch backend (reference/torch_backend.py) and the export wrappers: contract I/O, the same numbers
as the modules they wrap, opening from an artifacts manifest, and torch_pipeline: the runtime's loop over them
(its parity with diffusers is tests/test_reference_pipeline.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_sd_v1, tiny_single_file_v1  # noqa: F401  (session fixtures)

from ldm_rt.reference.checkpoints import load_model
from ldm_rt.reference.torch_backend import TorchComponent, open_components, torch_components, torch_pipeline
from ldm_rt.runtime.backends.base import BackendError
from ldm_rt.runtime.contracts import ContractError, ShapeProfile, build_contracts
from ldm_rt.runtime.manifest import ComponentEntry, FileEntry, Manifest

SIZES = {"batch": 2, "unet_batch": 2, "text_batch": 2, "latent_height": 16, "latent_width": 12}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def loaded(tiny_sd_v1):
    return load_model(tiny_sd_v1)


def test_components_compute_the_wrapped_modules(loaded):
    components = torch_components(loaded)
    assert sorted(components) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    rng = np.random.default_rng(0)
    feeds = {name: c.contract.sample_inputs(SIZES, rng, vocab_size=loaded.tokenizer.vocab_size) for name, c in components.items()}
    outs = {name: c.run(feeds[name]) for name, c in components.items()}
    model = loaded.model
    t = {name: {k: torch.from_numpy(v) for k, v in f.items()} for name, f in feeds.items()}
    with torch.inference_mode():
        expected = {
            "text_encoder": model.text_encoder(t["text_encoder"]["input_ids"]),
            "unet": model.unet(t["unet"]["sample"], t["unet"]["timestep"], t["unet"]["encoder_hidden_states"]),
            "vae_decoder": model.autoencoder.decode(t["vae_decoder"]["latent"] / model.scale_factor),
            "vae_encoder": model.autoencoder.encode_moments(t["vae_encoder"]["image"]),
        }
    for name, c in components.items():
        (out_name,) = outs[name]
        assert out_name == c.contract.outputs[0].name
        got = outs[name][out_name]
        assert got.dtype == np.float32
        assert got.shape == c.contract.outputs[0].resolve(SIZES)
        np.testing.assert_array_equal(got, expected[name].numpy())
    assert outs["vae_encoder"]["latent_parameters"].shape[1] == 8  # mean and logvar, unscaled


def test_contract_is_enforced(loaded):
    unet = torch_components(loaded)["unet"]
    feeds = unet.contract.sample_inputs(SIZES, np.random.default_rng(0))
    with pytest.raises(ContractError, match="dtype float64 != float32"):
        unet.run({**feeds, "sample": feeds["sample"].astype(np.float64)})
    with pytest.raises(ContractError, match="inputs"):
        unet.run({"sample": feeds["sample"]})


def test_fp16_weights_keep_float32_io(tiny_sd_v1, loaded):
    half = torch_components(load_model(tiny_sd_v1, dtype=torch.float16))["vae_decoder"]
    full = torch_components(loaded)["vae_decoder"]
    feeds = full.contract.sample_inputs(SIZES, np.random.default_rng(1))
    a, b = half.run(feeds)["image"], full.run(feeds)["image"]
    assert a.dtype == np.float32 and np.all(np.isfinite(a))
    bound = full.contract.tolerance["fp16"].bound(b)
    assert 0 < np.max(np.abs(a - b)) <= bound


def write_artifacts(root, loaded, source, profile=ShapeProfile(batch=(1, 1, 2), height=(32, 32, 64), width=(32, 32, 64))):
    """A minimal artifacts folder for the torch backend: manifest, tokenizer.json, scheduler config (no ONNX)."""
    root.mkdir(parents=True, exist_ok=True)
    loaded.tokenizer.save(root / "tokenizer.json")
    (root / "scheduler_config.json").write_text(json.dumps(loaded.scheduler_config))
    facts = loaded.facts()
    contracts = build_contracts(facts, profile)
    manifest = Manifest(
        facts=facts,
        profile=profile,
        components={name: ComponentEntry(c, {}) for name, c in contracts.items()},
        tokenizer=FileEntry.of(root, "tokenizer.json"),
        scheduler=FileEntry.of(root, "scheduler_config.json"),
        source={"kind": "test", "path": str(source)},
        tools={},
    )
    manifest.write(root)
    return Manifest.read(root)


@pytest.mark.parametrize("source", ["folder", "single_file"])
def test_open_components_from_manifest(source, loaded, tiny_sd_v1, tiny_single_file_v1, tmp_path):
    path = tiny_sd_v1 if source == "folder" else tiny_single_file_v1  # a single file's tokenizer comes from the artifacts
    manifest = write_artifacts(tmp_path / "artifacts", loaded, path)
    components = open_components(tmp_path / "artifacts", manifest, "fp32")
    feeds = components["unet"].contract.sample_inputs({"unet_batch": 2, "latent_height": 16, "latent_width": 16}, np.random.default_rng(2))
    expected = torch_components(loaded)["unet"].run(feeds)["out_sample"]
    np.testing.assert_array_equal(components["unet"].run(feeds)["out_sample"], expected)
    small = {**feeds, "sample": feeds["sample"][:, :, :8, :8]}  # 16 px: below the artifacts' profile
    with pytest.raises(ContractError, match="outside the artifacts' range"):
        components["unet"].run(small)


def test_open_components_refuses_a_stale_or_missing_source(loaded, tiny_sd_v1, tmp_path):
    manifest = write_artifacts(tmp_path / "a", loaded, tiny_sd_v1)
    manifest.facts = type(manifest.facts)(**{**manifest.facts.__dict__, "scale_factor": 0.5})
    with pytest.raises(BackendError, match="no longer matches the artifacts"):
        open_components(tmp_path / "a", manifest, "fp32")
    manifest = write_artifacts(tmp_path / "b", loaded, tmp_path / "gone")
    with pytest.raises(BackendError, match="is not there any more"):
        open_components(tmp_path / "b", manifest, "fp32")
    with pytest.raises(BackendError, match="precision must be one of"):
        open_components(tmp_path / "b", manifest, "int8")


def test_entry_point_finds_the_torch_backend():
    from ldm_rt.runtime.backends.base import backend_factory

    try:
        factory = backend_factory("torch")
    except BackendError as e:
        pytest.fail(
            f"{e}: pyproject.toml needs [project.entry-points.\"ldm_rt.backends\"] "
            'torch = "ldm_rt.reference.torch_backend:open_components" (then pip install -e . again)'
        )
    assert factory is open_components


def test_torch_pipeline_is_the_runtime_loop_over_the_reference_networks(loaded, tiny_sd_v1, tmp_path):
    """Built from a model in memory or from an artifacts manifest (--backend torch), the same loop gives the
    same image; the in-memory one takes any size the model divides, by default its nominal resolution."""
    from ldm_rt.runtime.pipeline import Pipeline

    pipe = torch_pipeline(loaded)
    assert type(pipe) is Pipeline and pipe.backend == "torch" and pipe.precision == "fp32"
    assert all(type(c) is TorchComponent for c in pipe.components.values())
    assert pipe.profile.height[1] == loaded.model.config.autoencoder.resolution and pipe.profile.batch == (1, 1, 64)
    write_artifacts(tmp_path / "artifacts", loaded, tiny_sd_v1)
    args = dict(prompt=["a red car", "a photo of a cat"], negative_prompt="blurry", steps=3, seed=3, height=32, width=32, scheduler="euler-a")
    a, b = pipe.generate(**args), Pipeline.load(tmp_path / "artifacts", backend="torch").generate(**args)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.params["model_hash"] == ""  # torch_pipeline does not hash weights; the artifacts' manifest does
    assert pipe.generate(**{**args, "height": 48, "width": 40}).images.shape == (2, 48, 40, 3)
    with pytest.raises(TypeError, match="apply to a path"):
        torch_pipeline(loaded, dtype=torch.float16)
