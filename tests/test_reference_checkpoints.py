"""load_model on every source layout: a diffusers folder and the original single file made from it must
give the same model; broken files fail with one CheckpointError line naming the file and the keys."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import (  # noqa: F401  (session fixtures)
    make_tiny_single_file,
    single_file_state_dict,
    tiny_sd_v1,
    tiny_sd_v2,
    tiny_ldm_rt_model,
    tiny_single_file_v1,
    tiny_single_file_v2,
)

from ldm_rt.reference.checkpoints import load_model
from ldm_rt.runtime.schedulers import sd_scheduler_config
from ldm_rt.reference.checkpoint_errors import CheckpointError
from ldm_rt.reference.model_folder import save_model_folder
from ldm_rt.reference.torch_backend import torch_pipeline

pytestmark = pytest.mark.usefixtures("torch_one_thread")


SCHEDULER_KEYS = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset", "set_alpha_to_one", "prediction_type")


def assert_same_model(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]
    ca, cb = a.model.config, b.model.config
    assert ca.unet == cb.unet
    assert ca.text_encoder == cb.text_encoder
    # `resolution` is the nominal image size; a single file does not record it.
    assert dataclasses.replace(ca.autoencoder, resolution=0) == dataclasses.replace(cb.autoencoder, resolution=0)
    assert (ca.scale_factor, ca.conditioning) == (cb.scale_factor, cb.conditioning)
    assert {k: a.scheduler_config.get(k) for k in SCHEDULER_KEYS} == {k: b.scheduler_config.get(k) for k in SCHEDULER_KEYS}


def sample(loaded):
    return torch_pipeline(loaded).generate("a photo of a cat", steps=2, height=32, width=32, seed=3).images


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_single_file_equals_diffusers_folder(variant, request):
    folder = request.getfixturevalue(f"tiny_sd_{variant}")
    single = request.getfixturevalue(f"tiny_single_file_{variant}")
    prediction = "v_prediction" if variant == "v2" else None
    from_folder = load_model(folder)
    from_file = load_model(single, tokenizer=folder / "tokenizer", prediction_type=prediction)
    assert_same_model(from_folder, from_file)
    assert from_file.info["variant"] == variant
    if variant == "v2":
        # The OpenCLIP file has one more block than the diffusers text encoder: SD v2 drops the last one.
        assert from_file.model.config.text_encoder.num_hidden_layers == 3
        assert from_file.model.config.unet.num_head_channels == 16 and from_file.model.config.unet.use_linear_in_transformer
        assert from_file.tokenizer.pad_id == 0  # SD v2 pads with "!"
    else:
        assert from_file.model.config.unet.num_heads == 8 and not from_file.model.config.unet.use_linear_in_transformer
    np.testing.assert_array_equal(sample(from_folder), sample(from_file))


def test_ckpt_loads_with_weights_only(tiny_sd_v1, tiny_single_file_v1, tmp_path):
    ckpt = make_tiny_single_file(tiny_sd_v1, tmp_path / "tiny.ckpt", "v1")
    assert_same_model(load_model(ckpt, tokenizer=tiny_sd_v1 / "tokenizer"), load_model(tiny_single_file_v1, tokenizer=tiny_sd_v1 / "tokenizer"))


def test_single_file_defaults_to_sd_scheduler_and_epsilon(tiny_single_file_v1, tiny_sd_v1):
    loaded = load_model(tiny_single_file_v1, tokenizer=tiny_sd_v1 / "tokenizer")
    assert loaded.scheduler_config == sd_scheduler_config()
    assert loaded.scheduler_config["prediction_type"] == "epsilon"


def test_bin_weights_and_ldm_rt_folder_round_trip(tiny_sd_v1, tmp_path):
    folder = tmp_path / "bin"
    shutil.copytree(tiny_sd_v1, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(unet)), folder / "unet" / "diffusion_pytorch_model.bin")
    unet.unlink()
    reference = load_model(tiny_sd_v1)
    assert_same_model(reference, load_model(folder))

    ours = tmp_path / "ldm_rt"
    save_model_folder(ours, reference.model, reference.tokenizer, reference.scheduler_config)
    again = load_model(ours)
    assert_same_model(reference, again)
    assert again.info["source_kind"] == "ldm-rt"


def test_prediction_type_override(tiny_sd_v1):
    assert load_model(tiny_sd_v1, prediction_type="v_prediction").scheduler_config["prediction_type"] == "v_prediction"
    with pytest.raises(CheckpointError, match="prediction_type must be one of"):
        load_model(tiny_sd_v1, prediction_type="x0")


# ---- errors: one line, naming the file and the keys ---------------------------------------------------
def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def write_single(tmp_path: Path, sd: dict, name: str = "broken.safetensors") -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_single_file_needs_a_tokenizer(tiny_single_file_v1):
    with pytest.raises(CheckpointError) as e:
        load_model(tiny_single_file_v1)
    assert "holds no tokenizer" in one_line(e) and "tokenizer=" in one_line(e) and tiny_single_file_v1.name in one_line(e)


def test_truncated_safetensors(tiny_single_file_v1, tiny_sd_v1, tmp_path):
    data = tiny_single_file_v1.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(cut, tokenizer=tiny_sd_v1 / "tokenizer")
    assert "cut.safetensors is not a readable safetensors file" in one_line(e)


def test_corrupt_diffusers_component(tiny_sd_v1, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_sd_v1, folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert "vae/diffusion_pytorch_model.safetensors is not a readable safetensors file" in one_line(e)


@pytest.fixture(scope="module")
def single_sd(tiny_sd_v1):
    return single_file_state_dict(tiny_sd_v1, "v1")


def test_missing_key(single_sd, tiny_sd_v1, tmp_path):
    sd = dict(single_sd)
    del sd["model.diffusion_model.output_blocks.1.0.in_layers.0.bias"]
    with pytest.raises(CheckpointError) as e:
        load_model(write_single(tmp_path, sd), tokenizer=tiny_sd_v1 / "tokenizer")
    message = one_line(e)
    assert "broken.safetensors (UNet" in message and "missing 1: output_blocks.1.0.in_layers.0.bias" in message


def test_misshaped_and_unexpected_keys(single_sd, tiny_sd_v1, tmp_path):
    sd = dict(single_sd)
    sd["first_stage_model.decoder.mid.block_1.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    sd["first_stage_model.decoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        load_model(write_single(tmp_path, sd), tokenizer=tiny_sd_v1 / "tokenizer")
    message = one_line(e)
    assert "(autoencoder" in message
    assert "unexpected 1: decoder.extra.weight" in message
    assert "misshaped 1: decoder.mid.block_1.conv1.weight (64, 64, 1, 1)" in message


def test_key_needed_to_infer_the_architecture(single_sd, tiny_sd_v1, tmp_path):
    sd = {k: v for k, v in single_sd.items() if k != "model.diffusion_model.out.2.weight"}
    with pytest.raises(CheckpointError) as e:
        load_model(write_single(tmp_path, sd), tokenizer=tiny_sd_v1 / "tokenizer")
    assert "key out.2.weight is missing" in one_line(e)


def test_not_a_stable_diffusion_file(tmp_path, tiny_sd_v1):
    path = write_single(tmp_path, {"some.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError) as e:
        load_model(path, tokenizer=tiny_sd_v1 / "tokenizer")
    assert "has no model.diffusion_model.* keys" in one_line(e)


class NotATensor:
    """Pickled by reference: torch.load(weights_only=True) must refuse to import it."""


def test_pickle_with_code_is_refused(tmp_path, tiny_sd_v1):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": NotATensor()}, path)
    with pytest.raises(CheckpointError) as e:
        load_model(path, tokenizer=tiny_sd_v1 / "tokenizer")
    assert "cannot be loaded safely with torch.load(weights_only=True)" in one_line(e)


def test_incomplete_diffusers_folder(tiny_sd_v1, tmp_path):
    folder = tmp_path / "no_unet"
    shutil.copytree(tiny_sd_v1, folder)
    shutil.rmtree(folder / "unet")
    with pytest.raises(CheckpointError, match="has no unet/ folder"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="neither an ldm-rt model folder"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nothing.safetensors")


def test_tokenizer_that_does_not_fit(tiny_single_file_v1, tmp_path):
    from ldm_rt.runtime.tokenizer import PromptTokenizer

    wide = PromptTokenizer.word_level([f"w{i}" for i in range(700)], max_length=77)
    with pytest.raises(CheckpointError, match=r"the tokenizer has \d+ tokens but the text encoder embeds \d+"):
        load_model(tiny_single_file_v1, tokenizer=wide)


# ---- JSON of the wrong shape, and paths that leave the folder: one line, nothing read --------------------
@pytest.mark.parametrize(
    "content, expected",
    [
        ("[]", "holds an array where a JSON object is expected"),
        ('{"format": "ldm-rt-model", "format_version": 1, "config": [], "info": {}}', '"config" and "info" must be JSON objects'),
        ('{"format": "ldm-rt-model", "format_version": 1, "config": {"unet": [["in_channels", 9]]}}', "UNetConfig: expected a JSON object"),
        ('{"format": "ldm-rt-model", "format_version": 1, "config": {}, "info": 3}', '"config" and "info" must be JSON objects'),
    ],
    ids=["top-level-list", "config-list", "nested-list", "info-number"],
)
def test_ldm_rt_model_json_of_the_wrong_shape_is_one_line(tiny_ldm_rt_model, tmp_path, content, expected):
    folder = tmp_path / "model"
    shutil.copytree(tiny_ldm_rt_model, folder)
    (folder / "ldm_rt_model.json").write_text(content)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert expected in one_line(e) and "ldm_rt_model.json" in one_line(e)


@pytest.mark.parametrize("file", ["model_index.json", "vae/config.json", "unet/config.json", "scheduler/scheduler_config.json"])
def test_diffusers_json_holding_a_list_is_one_line(tiny_sd_v1, tmp_path, file):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd_v1, folder)
    (folder / file).write_text("[1, 2]")
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert f"{file} holds an array where a JSON object is expected" in one_line(e)


def _shard_unet(folder: Path, names: tuple[str, str]) -> dict[str, str]:
    """Split the UNet weights into two files named `names` (relative to unet/) with an index, as large
    diffusers checkpoints ship; returns the weight_map."""
    unet = folder / "unet"
    weights = unet / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    weights.unlink()
    keys = sorted(sd)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2 :])
    weight_map = {}
    for name, part in zip(names, halves):
        (unet / name).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: sd[k].contiguous() for k in part}, str(unet / name))
        weight_map.update({k: name for k in part})
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


def test_sharded_weights_load_and_a_symlinked_shard_file_is_fine(tiny_sd_v1, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd_v1, folder)
    _shard_unet(folder, ("part-1.safetensors", "sub/part-2.safetensors"))
    # A Hugging Face cache snapshot links each file to its blob outside the folder: that must keep working.
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (folder / "unet" / "part-1.safetensors").rename(blobs / "abc123")
    (folder / "unet" / "part-1.safetensors").symlink_to(blobs / "abc123")
    assert_same_model(load_model(tiny_sd_v1), load_model(folder))


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "linked/part.safetensors", "a\\b.safetensors"])
def test_weight_map_naming_a_file_outside_the_folder_is_refused(tiny_sd_v1, tmp_path, bad):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd_v1, folder)
    weight_map = _shard_unet(folder, ("part-1.safetensors", "part-2.safetensors"))
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(folder / "unet" / "part-2.safetensors", outside / "part.safetensors")
    shutil.copy(folder / "unet" / "part-2.safetensors", folder / "outside.safetensors")  # what ../ would reach
    (folder / "unet" / "linked").symlink_to(outside, target_is_directory=True)
    index = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: (bad if v == "part-2.safetensors" else v) for k, v in weight_map.items()}}))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    message = one_line(e)
    assert f"weight_map names {bad!r}" in message
    assert ("refusing to read it" in message) or ("not a relative file name" in message and "\\" in bad)


@pytest.mark.parametrize("weight_map", ['["a.safetensors"]', '{"k": 3}', "null"])
def test_weight_map_of_the_wrong_shape_is_one_line(tiny_sd_v1, tmp_path, weight_map):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd_v1, folder)
    _shard_unet(folder, ("part-1.safetensors", "part-2.safetensors"))
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(f'{{"weight_map": {weight_map}}}')
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert "weight_map" in one_line(e)
