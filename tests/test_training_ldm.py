"""LDM trainer: it learns, resumes exactly, writes a loadable model folder, and two DDP processes agree."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm_rt.reference.autoencoder import AutoencoderKL
from ldm_rt.reference.configs import AutoencoderConfig, LDMConfig
from ldm_rt.reference.ldm import LatentDiffusion
from ldm_rt.reference.text_encoder import TextEncoder
from ldm_rt.reference.unet import UNetModel
from ldm_rt.reference.model_folder import load_model_folder
from ldm_rt.runtime.schedulers.registry import scheduler_from_diffusers_config, scheduler_from_diffusers_json
from ldm_rt.training.autoencoder_folder import build_autoencoder, load_autoencoder, save_autoencoder
from ldm_rt.training.config_loading import TrainConfigError, load_config, read_json, to_dict
from ldm_rt.training.data_shapes import ShapesDataset, vocabulary
from ldm_rt.training.datasets import DataConfig, get_batch, make_dataset
from ldm_rt.training.train_autoencoder import AutoencoderTrainConfig
from ldm_rt.training import latent_cache
from ldm_rt.training.latent_cache import first_stage_output
from ldm_rt.training.optim import TrainingDiverged
from ldm_rt.training.train_ldm import LDMTrainConfig, estimate_scale_factor, main, make_tokenizer, train

# 32x32 shapes through a random f=2 autoencoder -> 16x16x4 latents; a ~0.3 M-parameter UNet.
TINY = {
    "unet": {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [2],
             "num_heads": -1, "num_head_channels": 32, "context_dim": 32},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    "data": {"resolution": 32},
    "batch_size": 4,
    "threads": 1,
    "warmup_steps": 2,
    "log_every": 1,
    "sample_every": 1000,
    "sample_prompts": ["a red circle", "a large blue square on the left"],
    "sample_steps": 2,
    "scale_batches": 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def ae_folder(tmp_path_factory):
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(kind="kl", ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32))
    path = tmp_path_factory.mktemp("ae") / "autoencoder"
    save_autoencoder(path, ae, {"step": 0})
    return path


def tiny(ae_folder, **overrides) -> LDMTrainConfig:
    return load_config(LDMTrainConfig, {**TINY, "ae": str(ae_folder)}, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_the_model_folder_loads(tmp_path, ae_folder):
    out = tmp_path / "run"
    train(tiny(ae_folder, steps=40, lr=3e-3, sample_every=40), out)
    curve = losses(out)
    assert np.mean(curve[-8:]) < 0.7 * np.mean(curve[:4]), curve

    loaded = load_model_folder(out / "model")
    config = loaded.model.config
    assert config.text_encoder.vocab_size == loaded.tokenizer.vocab_size
    ids = torch.from_numpy(loaded.tokenizer(["a red circle"]).ids)
    assert loaded.model.encode_text(ids).shape == (1, loaded.tokenizer.max_length, 32)
    # The estimated scale factor makes the first latents unit-variance, as SD's 0.18215 does.
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert config.scale_factor == pytest.approx(state["ldm_config"]["scale_factor"])
    scheduler = scheduler_from_diffusers_json(out / "model" / "scheduler_config.json")
    assert scheduler.config.prediction_type == "epsilon" and len(scheduler.alphas_cumprod) == 1000
    assert (out / "samples" / "step_0000040.png").is_file()
    # The folder holds the EMA weights, which differ from the last raw weights.
    raw = load_file(str(out / "checkpoint" / "state.safetensors"))
    ema_unet = loaded.model.unet.state_dict()
    assert not torch.equal(ema_unet["out.2.weight"], raw["ldm/unet.out.2.weight"])


def test_scale_factor_is_one_over_latent_std(ae_folder):
    ae, _ = load_autoencoder(ae_folder)
    dataset = make_dataset(DataConfig(resolution=32))
    scale = estimate_scale_factor(ae, dataset, batches=2, batch_size=4, device=torch.device("cpu"), seed=0)
    with torch.no_grad():  # latents as the LDM trains on them: posterior samples, here with other noise
        z = ae.encode(get_batch(dataset, range(8)).images).sample(torch.Generator().manual_seed(1))
    assert scale * z.std().item() == pytest.approx(1.0, rel=0.05)


def test_resume_continues_exactly(tmp_path, ae_folder):
    train(tiny(ae_folder, steps=4), tmp_path / "straight")
    train(tiny(ae_folder, steps=2), tmp_path / "resumed")
    train(tiny(ae_folder, steps=4), tmp_path / "resumed", resume=True)
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("ema/") for k in a) and any(k.startswith("opt/") for k in a)
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) <= 1e-6


def _state(run):
    return load_file(str(run / "checkpoint" / "state.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_latent_cache_encodes_each_image_once_and_resumes_exactly(tmp_path, ae_folder, monkeypatch):
    encoded = []

    def counting(ae, images):
        encoded.append(len(images))
        return first_stage_output(ae, images)

    monkeypatch.setattr(latent_cache, "first_stage_output", counting)
    # 8 cached items = 2 steps of 4: steps 3 and 4 reread steps 1 and 2's encodings.
    train(tiny(ae_folder, steps=4, latent_cache=8), tmp_path / "straight")
    assert encoded == [4, 4]
    # The first pass is the uncached computation, so a cached run starts exactly like an uncached one.
    train(tiny(ae_folder, steps=2), tmp_path / "uncached")
    train(tiny(ae_folder, steps=2, latent_cache=8), tmp_path / "cached")
    assert _max_diff(_state(tmp_path / "uncached"), _state(tmp_path / "cached")) == 0
    # Resuming mid-way through the second pass starts with an empty cache and must not notice.
    train(tiny(ae_folder, steps=3, latent_cache=8), tmp_path / "resumed")
    train(tiny(ae_folder, steps=4, latent_cache=8), tmp_path / "resumed", resume=True)
    assert _max_diff(_state(tmp_path / "straight"), _state(tmp_path / "resumed")) <= 1e-6
    # And the second pass really does revisit the data: a longer uncached run sees new images instead.
    train(tiny(ae_folder, steps=4), tmp_path / "unlimited")
    assert _max_diff(_state(tmp_path / "straight"), _state(tmp_path / "unlimited")) > 1e-4


def test_class_conditioning_with_v_prediction(tmp_path, ae_folder):
    config = tiny(
        ae_folder, steps=2, conditioning="class", sample_every=2,
        **{"unet.num_classes": ShapesDataset.num_classes + 1, "unet.context_dim": None, "scheduler.prediction_type": "v_prediction"},
    )  # fmt: skip
    result = train(config, tmp_path / "run")
    loaded = load_model_folder(tmp_path / "run" / "model")
    assert loaded.model.text_encoder is None and loaded.tokenizer is None
    assert loaded.model.config.unet.num_classes == 19 and loaded.scheduler_config["prediction_type"] == "v_prediction"
    assert np.isfinite(result.metrics["loss"])


def test_frozen_text_encoder_from_a_model_folder_stays_fixed(tmp_path, ae_folder):
    train(tiny(ae_folder, steps=1), tmp_path / "first")
    result = train(tiny(ae_folder, steps=2, lr=1e-2, text_encoder_from=str(tmp_path / "first" / "model")), tmp_path / "second")
    before = load_model_folder(tmp_path / "first" / "model").model.text_encoder.state_dict()
    after = result.modules["ldm"].text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def fine_tune(init, **overrides) -> LDMTrainConfig:
    zero_snr_v = {"scheduler.prediction_type": "v_prediction", "scheduler.rescale_betas_zero_snr": True, "scheduler.timestep_spacing": "trailing"}
    settings = {**zero_snr_v, "init_from": str(init), **overrides}
    return load_config(LDMTrainConfig, TINY, [f"{k}={json.dumps(v)}" for k, v in settings.items()])


def test_fine_tuning_starts_from_the_folder_and_resumes_without_it(tmp_path, ae_folder):
    train(tiny(ae_folder, steps=2, lr=1e-2), tmp_path / "first")
    init = tmp_path / "first" / "model"
    start = load_model_folder(init)

    # A negligible learning rate: after one step every weight is still the folder's, objective and all new.
    train(fine_tune(init, steps=1, lr=1e-12), tmp_path / "still")
    still = load_model_folder(tmp_path / "still" / "model")
    for name in ("unet", "text_encoder", "autoencoder"):
        before, after = getattr(start.model, name).state_dict(), getattr(still.model, name).state_dict()
        assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6, name
    assert still.model.config == start.model.config and still.tokenizer.to_str() == start.tokenizer.to_str()
    assert still.scheduler_config["prediction_type"] == "v_prediction" and still.scheduler_config["rescale_betas_zero_snr"]
    assert still.info["init_from"]["path"] == str(init) and still.info["init_from"]["info"]["step"] == 2

    # Resuming takes weights and tokenizer from the checkpoint, so it is exact even once the folder is gone.
    train(fine_tune(init, steps=4), tmp_path / "straight")
    train(fine_tune(init, steps=2), tmp_path / "resumed")
    init.rename(tmp_path / "moved")
    train(fine_tune(init, steps=4), tmp_path / "resumed", resume=True)
    assert _max_diff(_state(tmp_path / "straight"), _state(tmp_path / "resumed")) <= 1e-6
    assert _max_diff(_state(tmp_path / "straight"), _state(tmp_path / "still")) > 1e-4  # it did train
    assert load_model_folder(tmp_path / "resumed" / "model").info["init_from"]["info"]["step"] == 2

    (tmp_path / "moved").rename(init)
    with pytest.raises(TrainConfigError, match=r"unet.num_res_blocks 2 vs 1"):
        train(fine_tune(init, steps=1, **{"unet.num_res_blocks": 2}), tmp_path / "mismatch")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"conditioning": "class"}, "unet.num_classes"),
        ({"unet.context_dim": 64}, "context_dim"),
        ({"scheduler.beta_schedule": "cubic"}, "beta_schedule"),
        ({"cond_drop_prob": 1.5}, "cond_drop_prob"),
        ({"latent_cache": 6}, "multiple of batch_size"),
        ({"init_from": "some/model"}, "init_from brings its own autoencoder"),
    ],
)
def test_bad_ldm_config_is_rejected(ae_folder, overrides, message):
    with pytest.raises(TrainConfigError, match=message):
        tiny(ae_folder, **overrides)


def test_a_diverging_run_stops_naming_the_step_and_writes_nothing(tmp_path, ae_folder):
    with pytest.raises(TrainingDiverged, match=r"^step \d+: (loss|grad_norm) is (nan|inf)"):
        train(tiny(ae_folder, steps=6, lr=1e30, warmup_steps=0), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint").exists() and not (tmp_path / "run" / "model").exists()


def test_cli_without_autoencoder_is_one_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ae" in err and "\n" not in err


def test_two_ddp_processes_end_with_identical_weights(tmp_path, ae_folder):
    config = tiny(ae_folder, steps=3, batch_size=2)
    (tmp_path / "config.json").write_text(json.dumps(to_dict(config)))
    worker = tmp_path / "worker.py"
    # A hung collective must fail this test with the stacks of both ranks, not time out silently: each worker
    # dumps its threads and exits well before the test's own limit.
    worker.write_text(textwrap.dedent(f"""
        import faulthandler, os, json
        faulthandler.dump_traceback_later(200, exit=True)
        from safetensors.torch import save_file
        from ldm_rt.training.config_loading import load_config
        from ldm_rt.training.train_ldm import LDMTrainConfig, train
        config = load_config(LDMTrainConfig, json.load(open({str(tmp_path / "config.json")!r})))
        result = train(config, {str(tmp_path / "run")!r})
        state = {{k: v.contiguous() for k, v in result.modules["ldm"].state_dict().items()}}
        save_file(state, {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.safetensors")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    # --standalone: torchrun binds its own free rendezvous port (no pick-then-release race with other processes).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    log = tmp_path / "torchrun.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the agent and both workers: nothing left running after the test
            proc.wait()
            returncode = "timeout"
    assert returncode == 0, f"torchrun: {returncode}\n" + log.read_text(errors="replace")[-6000:]
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # Each rank trained on its own shard, so agreement is DDP's doing; and the weights did move.
    torch.manual_seed(config.seed)
    ldm_config = LDMConfig.from_dict(json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["ldm_config"])
    initial = LatentDiffusion(ldm_config).state_dict()
    assert not torch.equal(initial["unet.out.2.weight"], rank0["unet.out.2.weight"])


def test_default_configs_load_and_fit_the_size_budget():
    """The shipped model: ~3 M parameters in all, so fp32 weights plus fp32 and fp16 ONNX copies stay under 50 MB."""
    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    ae_config = load_config(AutoencoderTrainConfig, read_json(configs / "default_autoencoder.json"))
    ldm_config = load_config(LDMTrainConfig, read_json(configs / "default_ldm.json"))
    tokenizer = make_tokenizer(ldm_config)
    assert tokenizer.vocab_size == len(vocabulary()) + 4
    text_config = dataclasses.replace(ldm_config.text_encoder, vocab_size=tokenizer.vocab_size)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    sizes = {
        "autoencoder": count(build_autoencoder(ae_config.model)),
        "unet": count(UNetModel(ldm_config.unet)),
        "text_encoder": count(TextEncoder(text_config)),
    }
    assert sizes["autoencoder"] <= 1.0e6 and sizes["unet"] <= 2.5e6 and sizes["text_encoder"] <= 0.5e6, sizes
    assert sum(sizes.values()) * (4 + 4 + 2) < 50e6  # bytes: fp32 weights, fp32 ONNX, fp16 ONNX


def test_the_zero_snr_stage_fine_tunes_the_same_architecture():
    """Stage 2 of the default model (Lin et al. 2024): v-prediction on a zero-terminal-SNR schedule, from the
    stage-1 model folder, so its architecture must be stage 1's."""
    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    stage1 = load_config(LDMTrainConfig, read_json(configs / "default_ldm.json"))
    stage2 = load_config(LDMTrainConfig, read_json(configs / "default_ldm_zero_snr.json"), ["init_from=RUN/model"])
    assert (stage2.unet, stage2.text_encoder, stage2.data) == (stage1.unet, stage1.text_encoder, stage1.data)
    schedule = scheduler_from_diffusers_config(stage2.scheduler)
    assert schedule.alphas_cumprod[-1] == 0.0 and stage2.scheduler["prediction_type"] == "v_prediction"
