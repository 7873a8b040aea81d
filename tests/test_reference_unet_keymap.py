"""UNet key layout (original SD), the diffusers <-> ours key map and config map, and loud checkpoint errors."""

from __future__ import annotations

import pytest
import torch

from ldm_rt.reference.checkpoint_errors import CheckpointError
from ldm_rt.reference.configs import ConfigError, UNetConfig
from ldm_rt.reference.keymap_unet import (
    load_unet_state_dict,
    unet_config_from_diffusers,
    unet_key_map,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)
from ldm_rt.reference.unet import UNetModel

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
# unet/config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 (architecture keys).
SD15_DIFFUSERS = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": _DOWN,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": _UP,
}
SD21_DIFFUSERS = dict(
    SD15_DIFFUSERS,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    dual_cross_attention=False,
    num_class_embeds=None,
    only_cross_attention=False,
    sample_size=96,
    use_linear_projection=True,
    upcast_attention=True,
)
SD2_CONFIG = UNetConfig(
    num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True, upcast_attention=True
)
TINY = UNetConfig(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=2, context_dim=16,
    num_classes=5,
)


def test_config_from_real_sd_configs():
    assert unet_config_from_diffusers(SD15_DIFFUSERS) == UNetConfig()
    assert unet_config_from_diffusers(SD21_DIFFUSERS) == SD2_CONFIG
    inpaint = unet_config_from_diffusers(dict(SD15_DIFFUSERS, in_channels=9))
    assert inpaint.in_channels == 9


@pytest.mark.parametrize(
    "change, named",
    [
        ({"addition_embed_type": "text"}, "addition_embed_type"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"norm_num_groups": 7}, "norm_num_groups"),
        ({"_class_name": "UNet2DModel"}, "_class_name"),
        ({"transformer_layers_per_block": [1, 2, 10]}, "transformer_layers_per_block"),  # one per block
        ({"transformer_layers_per_block": [1, 0, 1, 1]}, "transformer_depth"),  # no blocks where attention is
        ({"addition_embed_type": "text_time", "addition_time_embed_dim": 256}, "projection_class_embeddings"),
        ({"cross_attention_dim": [768, 1024, 768, 768]}, "cross_attention_dim"),
        ({"down_block_types": ["AttnDownBlock2D"] + _DOWN[1:]}, "AttnDownBlock2D"),
        ({"up_block_types": list(reversed(_UP))}, "mirror"),
        ({"attention_head_dim": [5, 10, 20, 30]}, "attention_head_dim"),  # 30 heads do not divide 1280
    ],
)
def test_unsupported_diffusers_options_are_named(change, named):
    with pytest.raises(ConfigError, match=named):
        unet_config_from_diffusers(dict(SD15_DIFFUSERS, **change))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_key_layout_matches_real_sd(version):
    config = UNetConfig() if version == "v1" else SD2_CONFIG
    with torch.device("meta"):
        sd = UNetModel(config).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    # The SD v1 UNet has 686 tensors (SD v2 too: only proj_in/out and the context width differ). Our count
    # is checked independently against diffusers' UNet2DConditionModel below.
    assert len(shapes) == 686
    proj = (320, 320, 1, 1) if version == "v1" else (320, 320)
    ctx = 768 if version == "v1" else 1024
    assert shapes["input_blocks.1.1.proj_in.weight"] == proj
    assert shapes["output_blocks.11.1.proj_out.weight"] == proj
    assert shapes["output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["time_embed.0.weight"] == (1280, 320)
    assert shapes["out.2.weight"] == (4, 320, 3, 3)
    assert shapes["input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert shapes["input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes["input_blocks.4.0.skip_connection.weight"] == (640, 320, 1, 1)
    assert shapes["middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, ctx)
    assert shapes["input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"] == (2560, 320)
    assert shapes["output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["output_blocks.8.2.conv.weight"] == (640, 640, 3, 3)
    assert "output_blocks.2.2.conv.weight" not in shapes  # the deepest level has no transformer
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" not in shapes
    params = sum(v.numel() for v in sd.values())
    assert params == (859_520_964 if version == "v1" else 865_910_724)  # "860M UNet" (SD v1 model card)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_key_map_covers_diffusers_exactly(version):
    diffusers = pytest.importorskip("diffusers")
    cfg = SD15_DIFFUSERS if version == "v1" else SD21_DIFFUSERS
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert len(their_shapes) == 686
    config = unet_config_from_diffusers(cfg)
    key_map = unet_key_map(config)
    assert sorted(key_map.values()) == sorted(their_shapes)
    with torch.device("meta"):
        ours = UNetModel(config).state_dict()
    assert all(tuple(ours[k].shape) == their_shapes[d] for k, d in key_map.items())
    assert key_map["input_blocks.4.0.skip_connection.weight"] == "down_blocks.1.resnets.0.conv_shortcut.weight"
    assert key_map["output_blocks.2.1.conv.weight"] == "up_blocks.0.upsamplers.0.conv.weight"
    assert key_map["output_blocks.5.2.conv.bias"] == "up_blocks.1.upsamplers.0.conv.bias"
    assert key_map["middle_block.2.emb_layers.1.weight"] == "mid_block.resnets.1.time_emb_proj.weight"
    assert key_map["input_blocks.9.0.op.weight"] == "down_blocks.2.downsamplers.0.conv.weight"


def _tiny_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return UNetModel(TINY).state_dict()


def test_round_trip_through_diffusers_keys_is_identity():
    sd = _tiny_state_dict()
    theirs = unet_state_dict_to_diffusers(sd, TINY)
    assert "class_embedding.weight" in theirs and "down_blocks.1.attentions.0.proj_in.weight" in theirs
    back = unet_state_dict_from_diffusers(theirs, TINY)
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)


def test_conversion_names_missing_extra_and_misshaped_keys():
    theirs = unet_state_dict_to_diffusers(_tiny_state_dict(), TINY)
    missing = dict(theirs)
    del missing["up_blocks.0.upsamplers.0.conv.weight"]
    with pytest.raises(CheckpointError, match=r"missing up_blocks\.0\.upsamplers\.0\.conv\.weight \[64, 64, 3, 3\]"):
        unet_state_dict_from_diffusers(missing, TINY)
    extra = dict(theirs, **{"down_blocks.0.attentions.0.proj_in.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected down_blocks\.0\.attentions\.0\.proj_in\.weight \[3\]"):
        unet_state_dict_from_diffusers(extra, TINY)
    bad = dict(theirs, **{"conv_out.weight": torch.zeros(4, 64, 3, 3)})
    mismatch = r"shape of conv_out\.weight: checkpoint \[4, 64, 3, 3\], model \[4, 32, 3, 3\]"
    with pytest.raises(CheckpointError, match=mismatch):
        unet_state_dict_from_diffusers(bad, TINY)
    ours = _tiny_state_dict()
    del ours["label_emb.weight"]
    with pytest.raises(CheckpointError, match=r"missing label_emb\.weight \[5, 128\]"):
        unet_state_dict_to_diffusers(ours, TINY)


def test_load_checks_keys_shapes_and_says_what_to_do():
    model = UNetModel(TINY)
    sd = {k: v.clone() + 1 for k, v in _tiny_state_dict().items()}
    load_unet_state_dict(model, sd)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)

    prefixed = {"model.diffusion_model." + k: v for k, v in sd.items()}
    with pytest.raises(CheckpointError, match="strip the 'model.diffusion_model.' prefix"):
        load_unet_state_dict(model, prefixed)
    with pytest.raises(CheckpointError, match="unet_state_dict_from_diffusers"):
        load_unet_state_dict(model, unet_state_dict_to_diffusers(sd, TINY))
    with pytest.raises(CheckpointError, match=r"\.\.\. and \d+ more"):  # long lists are cut at 10 keys
        load_unet_state_dict(model, {})
    with pytest.raises(CheckpointError, match=r"shape of out\.2\.weight"):
        load_unet_state_dict(model, dict(sd, **{"out.2.weight": torch.zeros(4, 32, 1, 1)}))
