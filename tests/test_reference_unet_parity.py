"""Reference UNet vs diffusers' UNet2DConditionModel with the same random weights (diffusers is the oracle)."""

from __future__ import annotations

import pytest
import torch

from ldm_rt.reference.attention import CrossAttention
from ldm_rt.reference.configs import UNetConfig
from ldm_rt.reference.keymap_unet import (
    load_unet_state_dict,
    unet_config_from_diffusers,
    unet_state_dict_from_diffusers,
)
from ldm_rt.reference.unet import UNetInputError, UNetModel, timestep_embedding

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("torch_one_thread")

# SD v1 in miniature: fixed head count, 1x1-conv projections, attention only at the first level.
TINY_V1 = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,  # diffusers reads this as the number of heads
    cross_attention_dim=32,
)
# SD v2 in miniature: fixed head width (32/2 = 64/4 = 16), Linear projections, attention at both levels.
TINY_V2 = dict(
    TINY_V1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    upcast_attention=True,
)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere, so any mis-mapped tensor or wrong op shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
            # Make cross-attention to the context matter for the output.
            if "attn2.to_v" in name or "attn2.to_out" in name:
                p.mul_(4.0)


def _pair(cfg: dict, seed: int = 0) -> tuple[torch.nn.Module, UNetModel]:
    theirs = diffusers.UNet2DConditionModel(**cfg).eval()
    _randomise(theirs, seed)
    config = unet_config_from_diffusers(dict(theirs.config))
    ours = UNetModel(config).eval()
    load_unet_state_dict(ours, unet_state_dict_from_diffusers(theirs.state_dict(), config))
    return theirs, ours


def _inputs(b: int, c: int, h: int, w: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    t = torch.tensor([17, 803][:b] + [1] * max(0, b - 2))
    context = torch.randn(b, 7, 32, generator=g)
    return x, t, context


@pytest.fixture(scope="module")
def v1_pair() -> tuple[torch.nn.Module, UNetModel]:
    return _pair(TINY_V1)


@torch.no_grad()
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_sd_v1_shaped_matches_diffusers(v1_pair, size):
    theirs, ours = v1_pair
    assert ours.config.num_heads == 8 and ours.config.attention_resolutions == (1,)
    x, t, context = _inputs(2, 4, *size)
    expected = theirs(x, t, encoder_hidden_states=context).sample
    got = ours(x, t, context)
    assert got.shape == (2, 4, *size)
    assert expected.abs().mean() > 0.1  # outputs of order 1, so the tolerance means something
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)

    # The context must visibly steer the output, far beyond the tolerance.
    other = ours(x, t, torch.randn_like(context))
    assert (other - got).abs().max() > 1000 * TOL


@torch.no_grad()
def test_sd_v2_shaped_matches_diffusers():
    theirs, ours = _pair(TINY_V2, seed=2)
    assert ours.config.num_head_channels == 16 and ours.config.use_linear_in_transformer
    x, t, context = _inputs(2, 4, 8, 12)
    expected = theirs(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(ours(x, t, context), expected, atol=TOL, rtol=0)
    assert (ours(x, t, context.flip(1) * 2) - expected).abs().max() > 1000 * TOL


@torch.no_grad()
def test_fewer_norm_groups_match_diffusers():
    # The default model's narrow UNet uses 8 groups; a mis-threaded group count changes every GroupNorm.
    theirs, ours = _pair(dict(TINY_V1, norm_num_groups=8), seed=5)
    assert ours.config.norm_num_groups == 8
    assert all(m.num_groups == 8 for m in ours.modules() if isinstance(m, torch.nn.GroupNorm))
    x, t, context = _inputs(2, 4, 8, 8)
    torch.testing.assert_close(ours(x, t, context), theirs(x, t, encoder_hidden_states=context).sample, atol=TOL, rtol=0)


@torch.no_grad()
def test_class_conditional_matches_diffusers():
    theirs, ours = _pair(dict(TINY_V1, num_class_embeds=10), seed=3)
    x, t, context = _inputs(2, 4, 8, 8)
    y = torch.tensor([3, 9])
    expected = theirs(x, t, encoder_hidden_states=context, class_labels=y).sample
    got = ours(x, t, context, y=y)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    assert (ours(x, t, context, y=torch.tensor([4, 0])) - got).abs().max() > 1000 * TOL


@torch.no_grad()
def test_inpainting_nine_channels_matches_diffusers():
    theirs, ours = _pair(dict(TINY_V1, in_channels=9), seed=4)
    assert ours.input_blocks[0][0].weight.shape == (32, 9, 3, 3)
    x, t, context = _inputs(2, 9, 8, 8)
    expected = theirs(x, t, encoder_hidden_states=context).sample
    got = ours(x, t, context)
    assert got.shape == (2, 4, 8, 8)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = 10000 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(emb[:, :4], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, 4:], torch.sin(t[:, None] * freqs))
    assert timestep_embedding(t, 9).shape == (3, 9)
    from diffusers.models.embeddings import get_timestep_embedding

    expected = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 320), expected)


@pytest.fixture(scope="module")
def small_unet(v1_pair) -> UNetModel:
    return v1_pair[1]


@torch.no_grad()
def test_scalar_timestep_broadcasts_to_batch(small_unet):
    x, _, context = _inputs(2, 4, 8, 8)
    expected = small_unet(x, torch.tensor([250, 250]), context)
    torch.testing.assert_close(small_unet(x, torch.tensor(250), context), expected)
    torch.testing.assert_close(small_unet(x, 250.0, context), expected)
    torch.testing.assert_close(small_unet(x, torch.tensor([250.0]), context), expected)
    assert (small_unet(x, torch.tensor(251), context) - expected).abs().max() > 10 * TOL


def test_inputs_that_do_not_fit_the_config_are_rejected(small_unet):
    x, t, context = _inputs(2, 4, 8, 8)
    with pytest.raises(UNetInputError, match="context"):
        small_unet(x, t)
    with pytest.raises(UNetInputError, match="num_classes is None"):
        small_unet(x, t, context, y=torch.tensor([1, 2]))
    with pytest.raises(UNetInputError, match="multiples of 2"):
        small_unet(torch.randn(2, 4, 8, 7), t, context)
    with pytest.raises(UNetInputError, match=r"\(B, 4, H, W\)"):
        small_unet(torch.randn(2, 3, 8, 8), t, context)
    with pytest.raises(UNetInputError, match=r"\(B, T, 32\)"):
        small_unet(x, t, torch.randn(2, 7, 16))
    with pytest.raises(UNetInputError, match="timesteps"):
        small_unet(x, torch.tensor([1, 2, 3]), context)
    class_unet = UNetModel(unet_config_from_diffusers(dict(TINY_V1, num_class_embeds=3)))
    with pytest.raises(UNetInputError, match="class labels"):
        class_unet(x, t, context)


@torch.no_grad()
def test_upcast_attention_keeps_half_precision_io():
    torch.manual_seed(0)
    attn = CrossAttention(64, 32, heads=2, dim_head=32, upcast=True)
    x, context = torch.randn(1, 16, 64), torch.randn(1, 8, 32)
    expected = attn(x, context)
    got = attn.half()(x.half(), context.half())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=0)


@torch.no_grad()
def test_model_without_context_self_attends():
    config = UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=4,
        context_dim=None, num_classes=4,
    )
    model = UNetModel(config).eval()
    attn2 = model.middle_block[1].transformer_blocks[0].attn2
    assert attn2.to_k.weight.shape == (64, 64)  # keys come from the features themselves
    x = torch.randn(2, 4, 8, 8)
    assert model(x, torch.tensor([5, 6]), y=torch.tensor([0, 3])).shape == (2, 4, 8, 8)
    with pytest.raises(UNetInputError, match="context_dim is None"):
        model(x, torch.tensor([5, 6]), torch.randn(2, 3, 64), y=torch.tensor([0, 3]))
