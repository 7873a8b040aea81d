"""Autoencoder trainer: it learns, resumes exactly, refuses bad configs in one line; perceptual loss off/on."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_rt.training.autoencoder_folder import build_autoencoder, load_autoencoder
from ldm_rt.training.config_loading import TrainConfigError, load_config
from ldm_rt.training.discriminator import NLayerDiscriminator
from ldm_rt.training.losses_autoencoder import adaptive_weight, hinge_d_loss
from ldm_rt.training.perceptual import PerceptualWeightsError, VGGPerceptualLoss, vgg16_features
from ldm_rt.training.datasets import make_dataset
from ldm_rt.training.train_autoencoder import AutoencoderTrainConfig, evaluate, main, psnr, train

# A ~0.3 M-parameter f=2 autoencoder on 32x32 shapes: big enough to learn in a few steps, fast on 2 cores.
TINY = {
    "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "resolution": 32},
    "data": {"resolution": 32},
    "disc_channels": 8,
    "disc_layers": 2,
    "batch_size": 4,
    "threads": 1,  # tiny convolutions: a second thread only waits on a loaded 2-core machine
    "warmup_steps": 2,
    "eval_images": 8,
    "log_every": 1,
}


def tiny(**overrides) -> AutoencoderTrainConfig:
    sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return load_config(AutoencoderTrainConfig, TINY, sets)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_raises_heldout_psnr_and_writes_the_autoencoder(tmp_path):
    config = tiny(steps=30, lr=2e-3, eval_every=30)
    torch.manual_seed(config.seed)  # the trainer builds the autoencoder first after seeding: same initial weights
    initial = build_autoencoder(config.model)
    heldout = make_dataset(config.data, "heldout")
    before = evaluate(initial, heldout, config.eval_images, torch.device("cpu"), 4)
    result = train(config, tmp_path / "run")
    assert result.metrics["heldout_psnr"] > before + 1.5, (before, result.metrics)
    ae, info = load_autoencoder(tmp_path / "run" / "autoencoder")
    assert info["step"] == 30 and evaluate(ae, heldout, config.eval_images, torch.device("cpu"), 4) == pytest.approx(info["heldout_psnr"], abs=1e-4)
    assert (tmp_path / "run" / "samples" / "step_0000030.png").is_file()


def test_resume_continues_exactly(tmp_path):
    # The discriminator switches on at step 2, so its weights, optimizer and batch-norm state are covered too.
    settings = dict(lr=1e-3, **{"loss.disc_start": 2})
    train(tiny(steps=6, **settings), tmp_path / "straight")
    train(tiny(steps=3, **settings), tmp_path / "resumed")
    halfway = load_file(str(tmp_path / "resumed" / "checkpoint" / "state.safetensors"))
    train(tiny(steps=6, **settings), tmp_path / "resumed", resume=True)
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("opt_disc/") for k in a)
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6
    assert not torch.equal(a["model/ae.decoder.conv_out.weight"], halfway["model/ae.decoder.conv_out.weight"])
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())["step"] == 6


def test_new_run_refuses_a_folder_with_a_checkpoint(tmp_path):
    train(tiny(steps=1), tmp_path / "run")
    with pytest.raises(TrainConfigError, match="--resume"):
        train(tiny(steps=1), tmp_path / "run")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "nonsense=1"], "unknown config key nonsense"),
        (["--set", "model.ch=30"], "multiple of norm_num_groups"),
        (["--set", "lr=fast"], "lr: 'fast' is not a float"),
        (["--set", "data.kind=folder", "--set", "data.path=/nonexistent/images"], "/nonexistent/images does not exist"),
        (["--set", "loss.rec_loss=l3"], "loss.rec_loss"),
        (["--set", "steps"], "key=value"),
    ],
)
def test_bad_config_is_one_line_and_nonzero_exit(tmp_path, capsys, args, message):
    code = main(["--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("ldm-rt-train-autoencoder: error: ") and "\n" not in err and message in err, err


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.json"), "--out", str(tmp_path / "run")]) == 2
    assert "nope.json is missing; pass an existing JSON object file as --config" in capsys.readouterr().err


def _random_vgg_file(path, drop: str | None = None):
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # a full torchvision state dict has these; ignored
    if drop:
        del state[drop]
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_perceptual_loss_reads_torchvision_layout_from_a_local_file(tmp_path, suffix):
    loss = VGGPerceptualLoss.from_file(_random_vgg_file(tmp_path / f"vgg{suffix}"))
    assert not any(p.requires_grad for p in loss.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    same, different = loss(x, x), loss(x, y)
    assert same.shape == (2,) and torch.allclose(same, torch.zeros(2), atol=1e-6)
    assert (different > 0).all()
    different.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_perceptual_weights_missing_a_key_name_it(tmp_path):
    path = _random_vgg_file(tmp_path / "vgg.safetensors", drop="features.10.weight")
    with pytest.raises(PerceptualWeightsError, match="features.10.weight"):
        VGGPerceptualLoss.from_file(path)


def test_perceptual_off_is_logged_once_and_on_raises_the_loss(tmp_path, caplog):
    caplog.set_level("INFO", logger="ldm_rt")
    train(tiny(steps=1), tmp_path / "off")
    assert sum("perceptual loss off" in r.message for r in caplog.records) == 1
    vgg = _random_vgg_file(tmp_path / "vgg.safetensors")
    train(tiny(steps=1, perceptual_weights=str(vgg)), tmp_path / "on")
    off, on = read_metrics(tmp_path / "off")[0], read_metrics(tmp_path / "on")[0]
    # Same seed, same data, same initial weights: the only difference is the perceptual term.
    assert on["rec"] > off["rec"] + 1e-3


def test_hinge_loss_and_adaptive_weight():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    w = torch.ones(3, requires_grad=True)
    weight = adaptive_weight((4 * w).sum(), (2 * w).sum(), w, disc_weight=0.5)
    assert weight.item() == pytest.approx(0.5 * 2, rel=1e-3)  # ||grad nll|| / ||grad g|| = 2


def test_patchgan_output_is_a_map_of_patch_logits():
    d = NLayerDiscriminator(3, ndf=8, n_layers=3)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_psnr_of_known_error():
    x = torch.zeros(1, 3, 8, 8)
    assert psnr(x + 0.2, x).item() == pytest.approx(20.0, abs=1e-4)  # error 0.1 on [0, 1]: 20 dB
