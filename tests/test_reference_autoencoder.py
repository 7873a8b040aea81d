"""Reference autoencoders against diffusers (test-only oracle) with the same random weights, the key map,
the real SD VAE key layout, and an ONNX export smoke test."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from ldm_rt.reference.autoencoder import AutoencoderKL, DiagonalGaussianDistribution, VQModel
from ldm_rt.reference.checkpoint_errors import CheckpointError
from ldm_rt.reference.checkpoints import load_model
from ldm_rt.reference.configs import AutoencoderConfig, ConfigError
from ldm_rt.reference.keymap_autoencoder import (
    autoencoder_config_from_diffusers,
    autoencoder_config_to_diffusers,
    autoencoder_state_dict_from_diffusers,
    autoencoder_state_dict_to_diffusers,
    autoencoder_parameter_shapes,
)
from ldm_rt.reference.model_folder import save_model_folder

TOL = 1e-4


def tiny_config(kind: str = "kl", num_res_blocks: int = 1, attn_resolutions: tuple[int, ...] = ()) -> AutoencoderConfig:
    """SD-shaped (f = 2 here), block_out_channels (32, 64), 4 latent channels."""
    vq = kind == "vq"
    return AutoencoderConfig(
        kind=kind, ch=32, ch_mult=(1, 2), num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
        resolution=32, z_channels=4, embed_dim=3 if vq else 4, n_embed=16 if vq else AutoencoderConfig.n_embed,
    )


def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm affines included), so a misplaced weight cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("embedding.weight"):
                p.copy_(torch.randn(p.shape, generator=g))  # codes spread like the latents they quantise
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def diffusers_pair(config: AutoencoderConfig, seed: int = 0):
    from diffusers import AutoencoderKL as DiffusersKL
    from diffusers import VQModel as DiffusersVQ

    theirs = (DiffusersKL if config.kind == "kl" else DiffusersVQ)(**autoencoder_config_to_diffusers(config)).eval()
    randomise_(theirs, seed)
    ours = (AutoencoderKL if config.kind == "kl" else VQModel)(config).eval()
    ours.load_state_dict(autoencoder_state_dict_from_diffusers(theirs.state_dict(), config), strict=True)
    return ours, theirs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "num_res_blocks, attn_resolutions, sizes",
    [(1, (), [(32, 32), (24, 40)]), (2, (), [(32, 32), (24, 40)]), (1, (16,), [(24, 40)])],
    ids=["lpb1", "lpb2", "attn-in-level"],
)
def test_kl_matches_diffusers(num_res_blocks, attn_resolutions, sizes):
    config = tiny_config("kl", num_res_blocks, attn_resolutions)
    ours, theirs = diffusers_pair(config)
    for batch, size in enumerate(sizes, start=1):
        x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))
        z = torch.randn(batch, 4, size[0] // 2, size[1] // 2, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            moments = ours.encode_moments(x)
            reference = theirs.encode(x).latent_dist.parameters
            assert moments.shape == (batch, 8, size[0] // 2, size[1] // 2)
            assert moments.std() > 0.1  # outputs of order 1: the tolerance means something
            assert max_diff(moments, reference) < TOL
            image = ours.decode(z)
            assert image.shape == (batch, 3, *size)
            assert max_diff(image, theirs.decode(z).sample) < TOL


def test_vq_matches_diffusers():
    config = tiny_config("vq", num_res_blocks=2, attn_resolutions=(16,))
    ours, theirs = diffusers_pair(config)
    x = torch.randn(1, 3, 24, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = ours.encode(x)
        assert max_diff(h, theirs.encode(x).latents) < TOL
        quant, loss, indices = ours.quantize(h)
        ref_quant, ref_loss, (_, _, ref_indices) = theirs.quantize(h)
        assert indices.shape == (1, 12, 20) and len(indices.unique()) > 4  # many codes in use
        assert torch.equal(indices.flatten(), ref_indices.flatten())
        assert max_diff(quant, ref_quant) < TOL and abs(loss.item() - ref_loss.item()) < TOL
        assert max_diff(ours.quantize.lookup(indices), quant) < 1e-6  # straight-through adds rounding only
        image = ours.decode(h)
        assert max_diff(image, theirs.decode(h).sample) < TOL
        assert max_diff(ours.decode(h, force_not_quantize=True), theirs.decode(h, force_not_quantize=True).sample) < TOL
        recon, qloss = ours(x)
        assert torch.equal(recon, image) and qloss.item() == loss.item()


def test_vq_straight_through_and_commitment_loss():
    quantizer = VQModel(tiny_config("vq")).quantize
    h = torch.randn(1, 3, 4, 4, requires_grad=True)
    quant, loss, indices = quantizer(h)
    codes = quantizer.embedding.weight[indices].permute(0, 3, 1, 2)
    assert torch.allclose(quant, codes, atol=1e-6)
    # Legacy weighting: (1 + beta) * mean squared distance in value.
    assert loss.item() == pytest.approx((1 + quantizer.beta) * (codes - h).pow(2).mean().item(), rel=1e-5)
    quant.sum().backward()
    assert torch.equal(h.grad, torch.ones_like(h))  # gradient copied straight through


def test_posterior_sampling_mode_and_kl():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as DiffusersGaussian

    moments = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(4))
    moments[0, 4:, 0, 0] = 100.0  # clamped to logvar 20
    posterior = DiagonalGaussianDistribution(moments)
    assert torch.equal(posterior.mode(), moments[:, :4])
    assert posterior.logvar.max().item() == 20.0
    a = posterior.sample(torch.Generator().manual_seed(7))
    b = posterior.sample(torch.Generator().manual_seed(7))
    c = posterior.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    reference = DiffusersGaussian(moments)
    assert torch.allclose(a, reference.sample(torch.Generator().manual_seed(7)))
    assert torch.allclose(posterior.kl(), reference.kl())
    assert posterior.kl().shape == (2,)


def test_kl_forward_uses_sample_or_mode():
    ours = AutoencoderKL(tiny_config("kl")).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        recon, posterior = ours(x, sample_posterior=False)
        assert torch.equal(recon, ours.decode(posterior.mean))
        sampled, _ = ours(x, generator=torch.Generator().manual_seed(0))
        assert torch.equal(sampled, ours.decode(posterior.sample(torch.Generator().manual_seed(0))))


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_key_map_round_trip(kind):
    config = tiny_config(kind, num_res_blocks=2, attn_resolutions=(16,))
    model = (AutoencoderKL if kind == "kl" else VQModel)(config)
    ours = model.state_dict()
    theirs = autoencoder_state_dict_to_diffusers(ours, config)
    assert theirs["decoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in theirs and "encoder.down_blocks.1.attentions.1.to_out.0.bias" in theirs
    back = autoencoder_state_dict_from_diffusers(theirs, config)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    # decoder.up[1] (lowest resolution) is diffusers' up_blocks[0].
    assert torch.equal(theirs["decoder.up_blocks.0.resnets.0.conv1.weight"], ours["decoder.up.1.block.0.conv1.weight"])


def test_key_map_reads_legacy_and_conv_shaped_attention():
    config = tiny_config("kl")
    ours = AutoencoderKL(config).state_dict()
    theirs = autoencoder_state_dict_to_diffusers(ours, config)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in theirs.items():
        for new, old in renames.items():
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v[:, :, None, None] if k.endswith("query.weight") else v
    back = autoencoder_state_dict_from_diffusers(legacy, config)
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_key_map_errors_name_the_key():
    config = tiny_config("kl")
    theirs = autoencoder_state_dict_to_diffusers(AutoencoderKL(config).state_dict(), config)
    missing = dict(theirs)
    del missing["encoder.conv_in.weight"]
    with pytest.raises(CheckpointError, match=r"missing encoder\.conv_in\.weight"):
        autoencoder_state_dict_from_diffusers(missing, config)
    misshaped = dict(theirs, **{"decoder.conv_out.bias": torch.zeros(4)})
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.bias"):
        autoencoder_state_dict_from_diffusers(misshaped, config)
    extra = dict(theirs, **{"encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected encoder\.extra\.weight"):
        autoencoder_state_dict_from_diffusers(extra, config)
    # A checkpoint of another architecture: the error names keys, not a deep load_state_dict failure.
    with pytest.raises(CheckpointError, match="missing"):
        autoencoder_state_dict_from_diffusers(theirs, dataclasses.replace(config, num_res_blocks=2))
    ours = AutoencoderKL(config).state_dict()
    del ours["quant_conv.bias"]
    with pytest.raises(CheckpointError, match=r"missing quant_conv\.bias"):
        autoencoder_state_dict_to_diffusers(ours, config)


def test_config_from_diffusers():
    sd_vae = {  # stable-diffusion-v1-5 vae/config.json
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
    }
    config = autoencoder_config_from_diffusers(sd_vae)
    assert config == AutoencoderConfig(resolution=512)
    vq = autoencoder_config_from_diffusers({"_class_name": "VQModel", **autoencoder_config_to_diffusers(tiny_config("vq", 2, (16,)))})
    assert vq == tiny_config("vq", 2, (16,))
    assert autoencoder_config_from_diffusers({**sd_vae, "norm_num_groups": 16}).norm_num_groups == 16
    for bad in ({"act_fn": "relu"}, {"norm_num_groups": 48}, {"down_block_types": ["DownBlock2D"] * 4}, {"_class_name": "AutoencoderTiny"}):
        with pytest.raises(ConfigError):
            autoencoder_config_from_diffusers({**sd_vae, **bad})


def test_norm_num_groups_8_from_a_diffusers_folder_matches_diffusers(tiny_sd_v1, tmp_path):
    """A diffusers VAE with 8 GroupNorm groups (widths 24/48, which 32 groups cannot divide), saved with
    save_pretrained into an SD folder and read by our importer, computes what diffusers computes."""
    from diffusers import AutoencoderKL as DiffusersKL

    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd_v1, folder)
    shutil.rmtree(folder / "vae")
    theirs = DiffusersKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(24, 48), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    ).eval()  # fmt: skip
    randomise_(theirs, 8)
    theirs.save_pretrained(folder / "vae", safe_serialization=True)

    loaded = load_model(folder)
    ours = loaded.model.autoencoder
    assert ours.config.norm_num_groups == 8
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        moments = ours.encode_moments(x)
        assert moments.std() > 0.1
        assert max_diff(moments, theirs.encode(x).latent_dist.parameters) < TOL
        assert max_diff(ours.decode(z), theirs.decode(z).sample) < TOL
    # The ldm-rt model folder keeps it (config JSON round trip), and 32 groups cannot take 24 channels.
    save_model_folder(tmp_path / "ours", loaded.model, loaded.tokenizer, loaded.scheduler_config)
    assert load_model(tmp_path / "ours").model.config.autoencoder.norm_num_groups == 8
    with pytest.raises(ConfigError, match=r"ch \(24\) must be a multiple of norm_num_groups \(32\)"):
        dataclasses.replace(ours.config, norm_num_groups=32)
    assert autoencoder_config_to_diffusers(ours.config)["norm_num_groups"] == 8


def test_real_sd_vae_key_layout():
    # The SD v1/v2 VAE has 248 tensors: 108 encoder + quant_conv and 140 decoder + post_quant_conv, as
    # listed key by key in DiffSynth-Studio's from_civitai tables (diffsynth/models/sd_vae_{en,de}coder.py).
    shapes = autoencoder_parameter_shapes(AutoencoderConfig())
    assert len(shapes) == 248
    assert shapes["decoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1)
    assert shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (8, 512, 3, 3)
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in shapes and "encoder.down.3.downsample.conv.weight" not in shapes
    # LDM's vq-f4 first stage: codebook key as in the original VQModel.
    vq_f4 = AutoencoderConfig(kind="vq", ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, n_embed=8192)
    assert autoencoder_parameter_shapes(vq_f4)["quantize.embedding.weight"] == (8192, 3)


def test_onnx_export_dynamic_batch_and_size(tmp_path):
    """Proves exportability only (the export module owns the real export): dynamic batch/H/W, two sizes."""
    import onnxruntime as ort

    model = AutoencoderKL(tiny_config("kl", attn_resolutions=(16,))).eval()
    randomise_(model, 5)

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ae = model

        def forward(self, z):
            return self.ae.decode(z)

    class EncodeMoments(Decode):
        def forward(self, x):
            return self.ae.encode_moments(x)

    cases = [(Decode(), 4, [(2, 6, 10), (1, 12, 8)]), (EncodeMoments(), 3, [(2, 12, 20), (1, 24, 16)])]
    for module, channels, sizes in cases:
        path = tmp_path / f"{type(module).__name__}.onnx"
        torch.onnx.export(
            module, (torch.randn(1, channels, 8, 8),), str(path), input_names=["x"], output_names=["y"], opset_version=17,
            dynamo=False, dynamic_axes={"x": {0: "B", 2: "H", 3: "W"}, "y": {0: "B", 2: "h", 3: "w"}},
        )
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for b, h, w in sizes:
            x = torch.randn(b, channels, h, w)
            got = session.run(None, {"x": x.numpy()})[0]
            with torch.no_grad():
                expected = module(x).numpy()
            assert got.shape == expected.shape
            assert np.abs(got - expected).max() < TOL
