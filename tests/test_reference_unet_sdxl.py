"""SDXL-family UNets (text_time added conditioning, per-level depth and heads) vs diffusers' UNet2DConditionModel.

Tiny random-weight models built by diffusers, saved in its folder layout, read back through our UNet import
path (config.json -> unet_config_from_diffusers, weights -> unet_state_dict_from_diffusers), compared output
for output; full-size SDXL base and refiner key maps checked against diffusers' own modules on the meta device.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_reference_unet_parity import TOL, _randomise

from ldm_rt.reference.checkpoints import read_state_dict
from ldm_rt.reference.configs import ConfigError, LDMConfig, UNetConfig
from ldm_rt.reference.keymap_unet import (
    load_unet_state_dict,
    unet_config_from_diffusers,
    unet_key_map,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)
from ldm_rt.reference.model_folder import read_json_object
from ldm_rt.reference.unet import UNetInputError, UNetModel

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

POOLED = 16
TIME_DIM = 8
# SDXL base in miniature: no attention at the first level, Linear projections, fixed head width (16), one
# transformer block at level 1 and two at level 2 and in the middle, 6 time ids. 8 GroupNorm groups: with
# one channel per group (32 groups of 32 channels) every norm after a ResBlock's time-embedding add would
# cancel that per-channel constant exactly, and the time ids and pooled embeds would barely reach the output.
TINY_XL = dict(
    block_out_channels=(32, 64, 128),
    norm_num_groups=8,
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8),  # diffusers reads this as heads per level: 64 / 4 = 128 / 8 = 16 wide
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
)
# The refiner in miniature: attention only at the middle levels, 5 time ids (sizes, crop, aesthetic score),
# and head counts that fix neither the count nor the width (16, 8 and 16 wide): one count per level.
TINY_REFINER = dict(
    TINY_XL,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 2, 8, 4),
    transformer_layers_per_block=2,
    projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM,
)
# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 (architecture keys).
SDXL_BASE = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "class_embed_type": None,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_REFINER = dict(
    SDXL_BASE,
    attention_head_dim=[6, 12, 24, 24],
    block_out_channels=[384, 768, 1536, 1536],
    cross_attention_dim=1280,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    projection_class_embeddings_input_dim=2560,
    transformer_layers_per_block=4,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)


def _load_folder(folder) -> UNetModel:
    """Our UNet from a diffusers unet/ folder, as load_diffusers_folder reads its unet/ component."""
    config = unet_config_from_diffusers(read_json_object(folder / "config.json"))
    model = UNetModel(config).eval()
    sd = read_state_dict(folder / "diffusion_pytorch_model.safetensors")
    load_unet_state_dict(model, unet_state_dict_from_diffusers(sd, config))
    return model


@pytest.fixture(scope="module", params=["base", "refiner"])
def xl_pair(request, tmp_path_factory) -> tuple[torch.nn.Module, UNetModel, int]:
    cfg, n_ids = (TINY_XL, 6) if request.param == "base" else (TINY_REFINER, 5)
    theirs = diffusers.UNet2DConditionModel(**cfg).eval()
    _randomise(theirs, seed=7)
    folder = tmp_path_factory.mktemp(f"sdxl_{request.param}") / "unet"
    theirs.save_pretrained(folder)  # safetensors by default
    return theirs, _load_folder(folder), n_ids


def _xl_inputs(b: int, n_ids: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Realistic micro-conditioning: original size, crop top-left, target size (or aesthetic score).
    ids = [1024.0, 768.0, 0.0, 64.0, 1024.0, 1024.0] if n_ids == 6 else [1024.0, 768.0, 0.0, 64.0, 6.0]
    return {
        "x": torch.randn(b, 4, 16, 24, generator=g),
        "t": torch.tensor([17, 803][:b]),
        "context": torch.randn(b, 7, 32, generator=g),
        "text_embeds": torch.randn(b, POOLED, generator=g),
        "time_ids": torch.tensor([ids] * b),
    }


def _theirs(model, i: dict[str, torch.Tensor]) -> torch.Tensor:
    added = {"text_embeds": i["text_embeds"], "time_ids": i["time_ids"]}
    return model(i["x"], i["t"], encoder_hidden_states=i["context"], added_cond_kwargs=added).sample


def _ours(model: UNetModel, i: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(i["x"], i["t"], i["context"], text_embeds=i["text_embeds"], time_ids=i["time_ids"])


@torch.no_grad()
def test_sdxl_shaped_matches_diffusers_and_its_condition_matters(xl_pair):
    theirs, ours, n_ids = xl_pair
    c = ours.config
    assert c.adm_in_channels == POOLED + n_ids * TIME_DIM and c.addition_time_embed_dim == TIME_DIM
    i = _xl_inputs(2, n_ids)
    expected = _theirs(theirs, i)
    got = _ours(ours, i)
    assert got.shape == (2, 4, 16, 24)
    assert expected.abs().mean() > 0.1  # outputs of order 1, so the tolerance means something
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)

    # The oracle tells a wrong condition from the right one, far beyond the tolerance: one time id off by
    # one (an original height of 1025 for 1024: measured max |diff| 0.098 base, 0.091 refiner, ~900 x TOL),
    # the pooled embedding of the other prompt (0.52, 0.59), the other prompt's context.
    wrong_id = dict(i, time_ids=i["time_ids"] + torch.nn.functional.one_hot(torch.tensor(0), n_ids))
    wrong_pooled = dict(i, text_embeds=i["text_embeds"].flip(0))
    for wrong in (wrong_id, wrong_pooled, dict(i, context=i["context"].flip(0))):
        assert (_theirs(theirs, wrong) - expected).abs().max() > 300 * TOL
        torch.testing.assert_close(_ours(ours, wrong), _theirs(theirs, wrong), atol=TOL, rtol=0)


def test_tiny_configs_read_as_intended(xl_pair):
    theirs, ours, n_ids = xl_pair
    c = ours.config
    if n_ids == 6:
        assert c.attention_resolutions == (4, 2) and c.num_head_channels == 16 and c.transformer_depth == (1, 1, 2)
        depths = [len(ours.input_blocks[i][1].transformer_blocks) for i in (4, 5, 7, 8)]
        assert depths == [1, 1, 2, 2] and len(ours.middle_block[1].transformer_blocks) == 2
        assert [len(b) for b in ours.input_blocks[1:3]] == [1, 1]  # no transformer at the first level
    else:
        assert c.attention_resolutions == (4, 2) and c.num_heads == (2, 2, 8, 4) and c.num_head_channels == -1
        assert [ours.input_blocks[i][1].transformer_blocks[0].attn1.heads for i in (4, 7)] == [2, 8]
        assert ours.middle_block[1].transformer_blocks[0].attn1.heads == 4
    assert c.use_linear_in_transformer and ours.label_emb[0][0].in_features == c.adm_in_channels


def test_key_map_round_trip_and_exact_diffusers_keys(xl_pair):
    theirs, ours, _ = xl_pair
    sd = ours.state_dict()
    mapped = unet_state_dict_to_diffusers(sd, ours.config)
    assert sorted(mapped) == sorted(theirs.state_dict())
    assert unet_key_map(ours.config)["label_emb.0.2.bias"] == "add_embedding.linear_2.bias"
    back = unet_state_dict_from_diffusers(mapped, ours.config)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)


def test_sdxl_configs_read_as_sgm_describes_them():
    base = unet_config_from_diffusers(SDXL_BASE)
    # sgm's sd_xl_base.yaml: model_channels 320, channel_mult [1, 2, 4], attention_resolutions [4, 2],
    # num_head_channels 64, transformer_depth [0, 2, 10] (level 0 has none), context_dim 2048, adm 2816.
    assert (base.model_channels, base.channel_mult, base.attention_resolutions) == (320, (1, 2, 4), (4, 2))
    assert (base.num_heads, base.num_head_channels, base.transformer_depth) == (-1, 64, (1, 2, 10))
    assert (base.context_dim, base.adm_in_channels, base.addition_time_embed_dim) == (2048, 2816, 256)
    assert base.use_linear_in_transformer and not base.upcast_attention and base.num_classes is None
    refiner = unet_config_from_diffusers(SDXL_REFINER)
    assert (refiner.model_channels, refiner.channel_mult, refiner.attention_resolutions) == (384, (1, 2, 4, 4), (4, 2))
    assert (refiner.num_head_channels, refiner.transformer_depth, refiner.adm_in_channels) == (64, 4, 2560)
    assert UNetConfig.from_dict(base.to_dict()) == base  # per-level tuples survive JSON


@pytest.mark.parametrize("cfg, tensors, params", [
    (SDXL_BASE, 1680, 2_567_463_684),  # "2.6B" UNet (SDXL report, Tab. 1)
    (SDXL_REFINER, 1220, 2_259_526_660),
])  # fmt: skip
def test_full_size_key_map_covers_diffusers_exactly(cfg, tensors, params):
    config = unet_config_from_diffusers(cfg)
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        ours = UNetModel(config).state_dict()
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    key_map = unet_key_map(config)
    assert len(ours) == len(their_shapes) == tensors
    assert sorted(key_map.values()) == sorted(their_shapes)
    assert all(tuple(ours[k].shape) == their_shapes[d] for k, d in key_map.items())
    assert sum(v.numel() for v in ours.values()) == params
    assert tuple(ours["label_emb.0.0.weight"].shape) == (4 * config.model_channels, config.adm_in_channels)
    assert "input_blocks.1.1.proj_in.weight" not in ours  # no attention at the first level


def test_added_condition_inputs_are_checked(xl_pair):
    _, ours, n_ids = xl_pair
    i = _xl_inputs(2, n_ids)
    with pytest.raises(UNetInputError, match="pass text_embeds"):
        ours(i["x"], i["t"], i["context"])
    with pytest.raises(UNetInputError, match="pass text_embeds"):
        ours(i["x"], i["t"], i["context"], text_embeds=i["text_embeds"])
    with pytest.raises(UNetInputError, match=r"P \+ N \* 8"):
        ours(i["x"], i["t"], i["context"], text_embeds=i["text_embeds"], time_ids=i["time_ids"][:, :4])
    with pytest.raises(UNetInputError, match="B = 2"):
        ours(i["x"], i["t"], i["context"], text_embeds=i["text_embeds"][:1], time_ids=i["time_ids"][:1])
    sd = UNetModel(UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), context_dim=32))
    with pytest.raises(UNetInputError, match="adm_in_channels is None"):
        sd(torch.randn(1, 4, 8, 8), 5, torch.randn(1, 3, 32), time_ids=torch.zeros(1, 6))


@pytest.mark.parametrize("fields, named", [
    ({"num_classes": 10, "adm_in_channels": 64}, "set one of them"),
    ({"transformer_depth": (1, 2, 3)}, "one value per level"),
    ({"num_heads": (2, 0)}, "per-level num_heads"),
    ({"transformer_depth": (1, 0)}, "transformer_depth"),
])  # fmt: skip
def test_invalid_sdxl_fields_are_named(fields, named):
    with pytest.raises(ConfigError, match=named):
        UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), **fields)


def test_sdxl_unet_with_one_text_encoder_is_refused():
    # A whole model with SD's one encoder cannot feed this UNet (no pooled embeds, half the context): the
    # config says the second encoder is missing instead of failing on the first encoder's width (768 vs 2048).
    unet = unet_config_from_diffusers(SDXL_BASE)
    with pytest.raises(ConfigError, match="SDXL's added conditioning .* no text_encoder_2"):
        LDMConfig(unet=unet)


def test_added_conditioning_traces_to_onnx_with_dynamic_batch(xl_pair, tmp_path):
    # What the export contract will need: text_embeds and time_ids as graph inputs, any batch size.
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    _, ours, n_ids = xl_pair
    i = _xl_inputs(1, n_ids)
    names = ["x", "t", "context", "text_embeds", "time_ids"]
    path = tmp_path / "unet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and TracerWarnings from torch internals
        torch.onnx.export(
            ours, (i["x"], i["t"].float(), i["context"], None, i["text_embeds"], i["time_ids"]), str(path),
            dynamo=False, opset_version=17, input_names=names, output_names=["eps"],
            dynamic_axes={**{n: {0: "B"} for n in names}, "eps": {0: "B"}},
        )  # fmt: skip
    i = _xl_inputs(2, n_ids, seed=3)
    i["time_ids"][1, 0] = 512.0  # per-sample micro-conditioning
    with torch.no_grad():
        expected = _ours(ours, i).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {n: i[n].float().numpy() for n in names})
    assert abs(got - expected).max() < TOL
