"""SDXL's VAE is the famous fp16 overflow (black or NaN images): activations inside its decoder's mid and up blocks
pass 65504 although the decoded image is in [-1, 1]. A tiny VAE built to overflow the same way (weights scaled up
in those blocks, the norm after them bringing the values back) must come out of the fp16 export with exactly those
blocks kept in fp32, recorded in the manifest entry, and a finite fp16 decode close to fp32 (issue 16). When the
stream between blocks overflows (a residual stream, VAE or UNet), the island widens to the module that holds it."""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from ldm_rt.export.build import BuildOptions, _export_component, _Step
from ldm_rt.export.fp16 import half_model
from ldm_rt.reference.configs import AutoencoderConfig, LDMConfig, TextEncoderConfig, UNetConfig
from ldm_rt.reference.export_wrappers import export_wrappers
from ldm_rt.reference.ldm import LatentDiffusion
from ldm_rt.reference.model_folder import LoadedModel
from ldm_rt.runtime.contracts import ModelFacts, ShapeProfile, build_contracts

# The blocks scaled to overflow: the decoder's middle block and the first block of an up level (SDXL's own VAE
# overflows in its mid and up blocks). conv1 x 3e5 puts their inner activations at ~1e5-1e6; norm2 renormalises.
HOT = ("autoencoder.decoder.mid.block_1", "autoencoder.decoder.up.0.block.0")
GAIN = 3e5


def hot_vae_config() -> LDMConfig:
    return LDMConfig(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=4, context_dim=32),
        autoencoder=AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32),
        text_encoder=TextEncoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=8),
        scale_factor=0.13025,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hot_vae():
    torch.manual_seed(0)
    model = LatentDiffusion(hot_vae_config()).eval()
    with torch.no_grad():
        for name in HOT:
            model.get_submodule(name).conv1.weight.mul_(GAIN)
    return LoadedModel(model, None, {})


def test_the_guard_keeps_the_overflowing_decoder_blocks_in_fp32_and_says_so(hot_vae, tmp_path):
    model = hot_vae.model
    contract = build_contracts(facts_of(model), ShapeProfile((1, 1, 1), (32, 32, 32), (32, 32, 32)))["vae_decoder"]
    wrapper = export_wrappers(model)["vae_decoder"]
    latent = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        fp32 = wrapper(latent)
        plain = half_model(wrapper, contract, [])(latent)
    assert torch.isfinite(fp32).all() and float(fp32.abs().max()) < 1e3
    assert not torch.isfinite(plain).all(), "plain fp16 must overflow, or the test shows nothing"

    source = SimpleNamespace(loaded=hot_vae)
    options = BuildOptions(fp16=True, onnx_only=True, progress=False, ort_variant=False)
    entry = _export_component("vae_decoder", source, contract, tmp_path, options, [], [], _Step("vae_decoder", False))
    kept = entry.precisions["fp16"].kept_fp32
    # Exactly the scaled blocks (by their export-wrapper names), nothing else of the decoder.
    assert sorted(kept) == sorted(HOT)
    # The manifest records them (Manifest.to_dict is asdict of these entries) and the fp16 graph passed parity.
    recorded = asdict(entry)["precisions"]["fp16"]
    assert recorded["kept_fp32"] == kept and recorded["parity"]["passed"]
    with torch.no_grad():
        fixed = half_model(wrapper, contract, kept)(latent)
    assert torch.isfinite(fixed).all()
    assert float((fixed - fp32).abs().max()) <= contract.tolerance["fp16"].bound(fp32.numpy())


def test_a_residual_stream_past_fp16_keeps_the_block_that_holds_it_in_fp32(tmp_path):
    """Not one block's inner activations but the stream between blocks: the middle block's last convolution x 3e5
    makes every activation after it ~1e5 (each later block adds its residual to it) until norm_out brings it back.
    Keeping that block alone in fp32 cannot help (its output is cast back to fp16 and overflows there), so the
    guard widens the island to the nearest called module that holds the whole stretch: here the decoder."""
    torch.manual_seed(0)
    model = LatentDiffusion(hot_vae_config()).eval()
    with torch.no_grad():
        model.get_submodule("autoencoder.decoder.mid.block_1").conv2.weight.mul_(GAIN)
    contract = build_contracts(facts_of(model), ShapeProfile((1, 1, 1), (32, 32, 32), (32, 32, 32)))["vae_decoder"]
    wrapper = export_wrappers(model)["vae_decoder"]
    latent = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        fp32 = wrapper(latent)
        stream = model.autoencoder.decoder.mid(model.autoencoder.decoder.conv_in(model.autoencoder.post_quant_conv(latent)))
        one_block = half_model(wrapper, contract, ["autoencoder.decoder.mid.block_1"])(latent)
    assert torch.isfinite(fp32).all() and float(stream.abs().max()) > 65504  # the stream itself leaves fp16's range
    assert not torch.isfinite(one_block).all(), "an island around the hot block alone must not be enough"
    source = SimpleNamespace(loaded=LoadedModel(model, None, {}))
    options = BuildOptions(fp16=True, onnx_only=True, progress=False, ort_variant=False)
    entry = _export_component("vae_decoder", source, contract, tmp_path, options, [], [], _Step("vae_decoder", False))
    assert entry.precisions["fp16"].kept_fp32 == ["autoencoder.decoder"] and entry.precisions["fp16"].parity["passed"]


def test_a_unet_residual_stream_past_fp16_widens_the_island_level_by_level():
    """The same in a UNet: a ResBlock's last convolution x 3e5 puts the stream past fp16 from there on (the skip
    connections carry it to the output blocks) until the output norm. The search keeps the block, then the level
    that holds it, then the UNet, the first that leaves the island finite; its fp16 variant then passes the bound."""
    from ldm_rt.export.fp16 import find_fp32_islands
    from ldm_rt.export.parity import reference_cases, sample_sets

    torch.manual_seed(0)
    model = LatentDiffusion(hot_vae_config()).eval()
    with torch.no_grad():
        model.get_submodule("unet.input_blocks.1.0").out_layers[3].weight.mul_(GAIN)
    contract = build_contracts(facts_of(model), ShapeProfile((1, 1, 1), (32, 32, 32), (32, 32, 32)))["unet"]
    wrapper = export_wrappers(model)["unet"]
    cases = reference_cases(wrapper, contract, sample_sets(contract))
    inputs = [torch.from_numpy(cases[0].inputs[t.name]) for t in contract.inputs]
    with torch.no_grad():
        one_block = half_model(wrapper, contract, ["unet.input_blocks.1.0"])(*inputs)
    assert not torch.isfinite(one_block).all(), "an island around the hot block alone must not be enough"
    search = find_fp32_islands(wrapper, contract, cases)
    assert search.kept_fp32 == ["unet"] and search.parity.passed


def facts_of(model: LatentDiffusion) -> ModelFacts:
    c = model.config
    return ModelFacts(
        latent_channels=c.latent_channels, latent_factor=c.latent_factor, unet_factor=c.unet.downsampling_factor,
        unet_in_channels=c.unet.in_channels, unet_out_channels=c.unet.out_channels, context_length=8, context_dim=32,
        vocab_size=64, num_classes=None, autoencoder_kind="kl", scale_factor=float(c.scale_factor),
    )  # fmt: skip


def test_a_component_with_two_outputs_goes_through_parity_and_the_fp16_search(tmp_path):
    """text_encoder_2 returns (penultimate layer, projected pooled): reference cases, the fp16 island search, the
    fp16 export and the ONNX parity check all compare both outputs, each against its own bound."""
    from ldm_rt.export.fp16 import find_fp32_islands
    from ldm_rt.export.onnx_export import export_component
    from ldm_rt.export.parity import check_onnx, reference_cases, sample_sets
    from ldm_rt.reference.export_wrappers import TextEncoder2Export
    from ldm_rt.reference.text_encoder import TextEncoderWithProjection

    torch.manual_seed(0)
    config = TextEncoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               max_position_embeddings=8, hidden_act="gelu", projection_dim=16, hidden_states_index=-2)  # fmt: skip
    wrapper = TextEncoder2Export(TextEncoderWithProjection(config).eval()).eval()
    facts = ModelFacts(4, 8, 4, 4, 4, 8, 32, 64, None, "kl", 0.13, has_text_encoder=False, text_encoder_2_dim=32, pooled_dim=16, time_ids=5)
    contract = build_contracts(facts, ShapeProfile((1, 1, 2), (32, 32, 32), (32, 32, 32)))["text_encoder_2"]
    cases = reference_cases(wrapper, contract, sample_sets(contract))
    assert all(c.reference.shape[1:] == (8, 32) and c.others[0].shape[1:] == (16,) for c in cases)
    search = find_fp32_islands(wrapper, contract, cases)
    assert search.parity.passed
    for precision, module in (("fp32", wrapper), ("fp16", half_model(wrapper, contract, search.kept_fp32))):
        path = tmp_path / f"te2_{precision}.onnx"
        export_component(module, contract, path)
        result = check_onnx(path, contract, precision, cases)
        assert result.passed, result
    # A wrong second output fails the check: parity reads it.
    broken = [type(c)(c.inputs, c.reference, (c.others[0] + 1.0,)) for c in cases]
    assert not check_onnx(tmp_path / "te2_fp32.onnx", contract, "fp32", broken).passed
