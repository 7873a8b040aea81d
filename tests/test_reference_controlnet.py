"""Reference ControlNet vs diffusers' ControlNetModel, UNet2DConditionModel and StableDiffusionControlNetPipeline
(diffusers is the oracle), on tiny random SD-v1-shaped models whose zero convolutions are non-zero; and the
original single-file layout, cross-checked against diffusers' own converter."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from ldm_rt.reference.checkpoint_errors import CheckpointError
from ldm_rt.reference.configs import HINT_BLOCK_CHANNELS, ConfigError, ControlNetConfig
from ldm_rt.reference.controlnet import ControlNetModel, check_controlnet_fits, residual_layout, sum_residuals
from ldm_rt.reference.keymap_controlnet import (
    ORIGINAL_PREFIX,
    controlnet_config_from_diffusers,
    controlnet_state_dict_from_diffusers,
    infer_controlnet_config,
    load_controlnet,
    original_controlnet_state_dict,
)
from ldm_rt.reference.keymap_unet import load_unet_state_dict, unet_config_from_diffusers, unet_state_dict_from_diffusers
from ldm_rt.reference.unet import UNetInputError, UNetModel
from tiny_models import (
    TINY_CONTEXT_DIM,
    TINY_IMAGE_SIZE,
    controlnet_single_file_state_dict,
    make_tiny_controlnet,
    make_tiny_controlnet_single_file,
)

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
LATENT = TINY_IMAGE_SIZE // 2  # the tiny VAE halves the image once


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def unet_pair(tiny_sd_v1):
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd_v1 / "unet").eval()
    config = unet_config_from_diffusers(json.loads((tiny_sd_v1 / "unet" / "config.json").read_text()))
    ours = UNetModel(config).eval()
    load_unet_state_dict(ours, unet_state_dict_from_diffusers(theirs.state_dict(), config))
    return theirs, ours


@pytest.fixture(scope="module")
def controlnet_pair(tiny_controlnet_v1, unet_pair):
    theirs = diffusers.ControlNetModel.from_pretrained(tiny_controlnet_v1).eval()
    return theirs, load_controlnet(tiny_controlnet_v1, base=unet_pair[1].config)


def _inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, LATENT, LATENT, generator=g)
    context = torch.randn(batch, 7, TINY_CONTEXT_DIM, generator=g)
    image = torch.rand(batch, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g)
    return x, torch.tensor([17, 803][:batch]), context, image


def _max_diff(ours, theirs) -> float:
    (down, mid), (down_ref, mid_ref) = ours, theirs
    assert len(down) == len(down_ref)
    return max(float((a - b).abs().max()) for a, b in zip([*down, mid], [*down_ref, mid_ref]))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("scale,guess_mode", [(1.0, False), (0.6, False), (1.0, True), (0.6, True)])
def test_residuals_match_diffusers(controlnet_pair, scale, guess_mode):
    theirs, ours = controlnet_pair
    x, t, context, image = _inputs()
    with torch.no_grad():
        expected = theirs(x, t, context, image, conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
        got = ours(x, t, context, image, scale, guess_mode)
    assert _max_diff(got, expected) < TOL
    layout = residual_layout(ours.config)
    assert [(r.shape[1], LATENT // r.shape[2]) for r in got[0]] == list(layout.down)
    assert (got[1].shape[1], LATENT // got[1].shape[2]) == layout.mid
    # The zero convolutions are not zero: every residual carries signal the comparison above checks.
    assert min(float(r.abs().mean()) for r in [*got[0], got[1]]) > 0.01


def test_control_image_and_residuals_move_the_prediction(controlnet_pair, unet_pair):
    """The tolerance above means something: another control image moves the residuals and the UNet's eps by
    far more than 1e-4, and the residuals move eps too (measured: 24 % and 50 %)."""
    (_, ours), (_, unet) = controlnet_pair, unet_pair
    x, t, context, image = _inputs()
    other = _inputs(seed=5)[3]
    with torch.no_grad():
        down, mid = ours(x, t, context, image)
        down2, mid2 = ours(x, t, context, other)
        plain = unet(x, t, context)
        eps = unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        eps2 = unet(x, t, context, down_block_additional_residuals=down2, mid_block_additional_residual=mid2)
    assert _relative(mid2, mid) > 0.1
    assert _relative(eps2, eps) > 0.1
    assert _relative(eps, plain) > 0.2


def test_unet_with_residuals_matches_diffusers(controlnet_pair, unet_pair):
    (cn, _), (theirs, ours) = controlnet_pair, unet_pair
    x, t, context, image = _inputs(seed=3)
    with torch.no_grad():
        down, mid = cn(x, t, context, image, conditioning_scale=0.8, return_dict=False)
        expected = theirs(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        got = ours(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        plain = ours(x, t, context)
    assert float((got - expected).abs().max()) < TOL
    assert _relative(got, plain) > 0.2


def _pipeline_step(tiny_sd_v1, controlnets, guess_mode: bool, scale):
    """One denoising step of diffusers' StableDiffusionControlNetPipeline, with the inputs and outputs of its
    ControlNet and UNet calls captured."""
    from PIL import Image

    controlnet = controlnets[0] if len(controlnets) == 1 else controlnets
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd_v1, controlnet=controlnet, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    calls: dict[str, tuple] = {}

    def capture(name):
        def hook(module, args, kwargs, output):
            calls.setdefault(name, (args, kwargs, output))
        return hook

    pipe.unet.register_forward_hook(capture("unet"), with_kwargs=True)
    pipe.controlnet.register_forward_hook(capture("controlnet"), with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray((torch.rand(TINY_IMAGE_SIZE + 8, TINY_IMAGE_SIZE, 3, generator=g) * 255).to(torch.uint8).numpy())
        for _ in controlnets
    ]  # not the output size: the pipeline resizes it
    pipe(
        "a red car", image=images[0] if len(images) == 1 else images, height=TINY_IMAGE_SIZE, width=TINY_IMAGE_SIZE,
        num_inference_steps=2, guidance_scale=7.5, controlnet_conditioning_scale=scale, guess_mode=guess_mode,
        output_type="latent", generator=torch.Generator().manual_seed(1),
    )
    return calls


@pytest.mark.parametrize("guess_mode", [False, True])
def test_one_pipeline_step_matches_diffusers(tiny_sd_v1, tiny_controlnet_v1, unet_pair, guess_mode):
    """ControlNet + UNet as diffusers' pipeline calls them under classifier-free guidance (guess mode: the
    ControlNet sees the conditional half only, the unconditional half gets zero residuals)."""
    theirs = diffusers.ControlNetModel.from_pretrained(tiny_controlnet_v1)
    calls = _pipeline_step(tiny_sd_v1, [theirs], guess_mode, 0.6)
    cn_args, cn_kwargs, _ = calls["controlnet"]
    unet_args, unet_kwargs, unet_out = calls["unet"]
    ours = load_controlnet(tiny_controlnet_v1, base=unet_pair[1].config)
    with torch.no_grad():
        down, mid = ours(
            cn_args[0], cn_args[1], cn_kwargs["encoder_hidden_states"], cn_kwargs["controlnet_cond"],
            cn_kwargs["conditioning_scale"], cn_kwargs["guess_mode"],
        )
        if guess_mode:
            down = [torch.cat([torch.zeros_like(r), r]) for r in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        eps = unet_pair[1](
            unet_args[0], unet_args[1], unet_kwargs["encoder_hidden_states"],
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        )
    assert float((eps - unet_out[0]).abs().max()) < TOL


def test_two_controlnets_sum_as_diffusers(tiny_sd_v1, tiny_controlnet_v1, tiny_controlnet_v1_b, unet_pair):
    """MultiControlNet: each ControlNet at its own scale on its own image, residuals summed."""
    folders = [tiny_controlnet_v1, tiny_controlnet_v1_b]
    calls = _pipeline_step(tiny_sd_v1, [diffusers.ControlNetModel.from_pretrained(f) for f in folders], False, [1.0, 0.6])
    cn_args, cn_kwargs, (down_ref, mid_ref) = calls["controlnet"]
    unet_args, unet_kwargs, unet_out = calls["unet"]
    base = unet_pair[1].config
    with torch.no_grad():
        outputs = [
            load_controlnet(f, base=base)(cn_args[0], cn_args[1], cn_kwargs["encoder_hidden_states"], image, scale)
            for f, image, scale in zip(folders, cn_kwargs["controlnet_cond"], cn_kwargs["conditioning_scale"])
        ]
        down, mid = sum_residuals(outputs)
        eps = unet_pair[1](
            unet_args[0], unet_args[1], unet_kwargs["encoder_hidden_states"],
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        )
    assert _max_diff((down, mid), (down_ref, mid_ref)) < TOL
    assert float((eps - unet_out[0]).abs().max()) < TOL
    assert _relative(outputs[1][1], outputs[0][1]) > 0.5  # two different ControlNets, both in the sum


def test_original_layout_agrees_with_diffusers_converter(tiny_sd_v1, tiny_controlnet_v1, tmp_path):
    """Our map inverted (diffusers -> original) and diffusers' own original -> diffusers converter give back
    the same tensors under the same names, so the single-file test below is not circular."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    assert all(k.startswith(ORIGINAL_PREFIX) for k in controlnet_single_file_state_dict(tiny_controlnet_v1))
    # diffusers' converter hard-codes E(c)'s last convolution at index 14, so it reads only four widths (every
    # real ControlNet's); our map places it after any number of widths (the tiny one's two: index 6).
    folder = make_tiny_controlnet(tmp_path / "four_widths", tiny_sd_v1, seed=2, hint_block_channels=HINT_BLOCK_CHANNELS)
    expected = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    original = controlnet_single_file_state_dict(folder)
    assert "control_model.input_hint_block.14.weight" in original
    converted = convert_controlnet_checkpoint(original, json.loads((folder / "config.json").read_text()))
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_single_file_loads_to_the_same_outputs(tiny_controlnet_v1, controlnet_pair, unet_pair, tmp_path, suffix):
    file = make_tiny_controlnet_single_file(tiny_controlnet_v1, tmp_path / f"control_tiny{suffix}")
    if suffix == ".pth":  # a whole ControlLDM checkpoint: the SD model beside control_model.*, under state_dict
        sd = torch.load(file, weights_only=True)
        sd["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 3, 3)
        torch.save({"state_dict": sd}, file)
    folder_model = controlnet_pair[1]
    single = load_controlnet(file, base=unet_pair[1].config)
    assert single.controlnet_config == folder_model.controlnet_config
    assert infer_controlnet_config(
        original_controlnet_state_dict(controlnet_single_file_state_dict(tiny_controlnet_v1), "x"), where="x"
    ) == folder_model.controlnet_config  # without a base: SD v1's 8 heads, as the tiny v1 UNet has
    x, t, context, image = _inputs(seed=7)
    with torch.no_grad():
        assert _max_diff(single(x, t, context, image, 0.6), folder_model(x, t, context, image, 0.6)) == 0.0


def test_config_round_trips_and_validates():
    config = controlnet_config_from_diffusers(
        dict(_class_name="ControlNetModel", block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32,
             down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], conditioning_embedding_out_channels=[16, 32],
             global_pool_conditions=True)
    )
    assert ControlNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.hint_factor == 2 and config.global_average_pooling
    with pytest.raises(ConfigError, match="hint_block_channels"):
        ControlNetConfig(hint_block_channels=())
    with pytest.raises(ConfigError, match="unknown field"):
        ControlNetConfig.from_dict({"hint_chanels": 3})
    with pytest.raises(ConfigError, match="channel_order"):
        controlnet_config_from_diffusers({"controlnet_conditioning_channel_order": "bgr"})


def _foreign_controlnet(folder: Path, **changes) -> Path:
    """A ControlNet for another base model: the tiny v1 layout with `changes`."""
    config = dict(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=TINY_CONTEXT_DIM, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), conditioning_embedding_out_channels=(16, 32),
    )
    diffusers.ControlNetModel(**{**config, **changes}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(cross_attention_dim=48), "cross-attends to 48-wide text embeddings but the UNet to 32"),
        (dict(layers_per_block=2), "gives 6 residuals .* but the UNet's skip connections are 4"),
        (dict(block_out_channels=(32, 96)), r"\[32, 32, 32, 96\] channels .* \[32, 32, 32, 64\]"),
    ],
)
def test_controlnet_for_another_base_is_refused(unet_pair, tmp_path, changes, message):
    folder = _foreign_controlnet(tmp_path / "foreign", **changes)
    with pytest.raises(CheckpointError, match=message) as e:
        load_controlnet(folder, base=unet_pair[1].config)
    assert "\n" not in str(e.value) and "another base model" in str(e.value)
    # The same ControlNet as an original single file: the inferred config is refused the same way.
    original = {ORIGINAL_PREFIX + k: v for k, v in controlnet_state_dict_from_diffusers(
        diffusers.ControlNetModel.from_pretrained(folder).state_dict(),
        controlnet_config_from_diffusers(json.loads((folder / "config.json").read_text())),
    ).items()}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_controlnet(tmp_path / "foreign.safetensors", base=unet_pair[1].config)
    with pytest.raises(ConfigError, match="another base model"):
        check_controlnet_fits(controlnet_config_from_diffusers(json.loads((folder / "config.json").read_text())), unet_pair[1].config)


class _Payload:
    """Stands for anything a pickle may carry besides tensors (a reduce gadget would run code on load)."""

    def __init__(self):
        self.weights = {"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}


def test_unsafe_pickle_and_broken_files_are_refused(tiny_controlnet_v1, tmp_path):
    unsafe = tmp_path / "control_unsafe.pth"
    with unsafe.open("wb") as f:
        pickle.dump(_Payload(), f, protocol=2)
    with pytest.raises(CheckpointError, match=r"weights_only=True.*convert it to safetensors"):
        load_controlnet(unsafe)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_controlnet_v1 / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_controlnet_v1 / "diffusion_pytorch_model.safetensors"))
    del sd["controlnet_mid_block.weight"]
    save_file(sd, str(broken / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing controlnet_mid_block.weight \[64, 64, 1, 1\]"):
        load_controlnet(broken)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_controlnet(broken)
    with pytest.raises(CheckpointError, match="without its config"):
        load_controlnet(broken / "diffusion_pytorch_model.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="is not a ControlNet"):
        load_controlnet(tmp_path / "other.safetensors")


def test_bad_inputs_name_the_problem(controlnet_pair, unet_pair):
    (_, ours), (_, unet) = controlnet_pair, unet_pair
    x, t, context, image = _inputs()
    with pytest.raises(UNetInputError, match=r"control_image must be \(B, 3, 32, 32\).*resize"):
        ours(x, t, context, image[:, :, :16])
    down, mid = ours(x, t, context, image)
    with pytest.raises(UNetInputError, match="both"):
        unet(x, t, context, down_block_additional_residuals=down)
    with pytest.raises(UNetInputError, match="one tensor per input block"):
        unet(x, t, context, down_block_additional_residuals=down[:-1], mid_block_additional_residual=mid)


def test_encoder_is_the_unets_own(unet_pair, controlnet_pair):
    """The ControlNet's copy has exactly the UNet's encoder keys and shapes (the same classes, built by
    UNetModel(encoder_only=True)), so a ControlNet initialised from a UNet loads its encoder unrenamed."""
    (_, unet), (_, ours) = unet_pair, controlnet_pair
    encoder = {k: v.shape for k, v in unet.state_dict().items() if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    copy = {k: v.shape for k, v in ours.state_dict().items() if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    assert copy == encoder
    assert isinstance(ours, ControlNetModel) and not hasattr(ours, "output_blocks")


def test_sdxl_controlnet_matches_diffusers(tmp_path):
    """SDXL's ControlNet (diffusers' layout, and the same weights as an original file): the encoder copy takes
    the pooled text embeds and time ids as the SDXL UNet does; a change of time ids moves the residuals."""
    from safetensors.torch import save_file
    from tiny_models import _randomise, _tiny_sdxl_unet_config

    unet = diffusers.UNet2DConditionModel(**_tiny_sdxl_unet_config(refiner=False))
    theirs = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    _randomise(theirs, torch.Generator().manual_seed(3))
    theirs.save_pretrained(tmp_path / "controlnet_xl")
    theirs = diffusers.ControlNetModel.from_pretrained(tmp_path / "controlnet_xl").eval()
    base = unet_config_from_diffusers(dict(unet.config))
    ours = load_controlnet(tmp_path / "controlnet_xl", base=base)
    save_file(controlnet_single_file_state_dict(tmp_path / "controlnet_xl"), str(tmp_path / "controlnet_xl.safetensors"))
    single = load_controlnet(tmp_path / "controlnet_xl.safetensors", base=base)
    assert single.controlnet_config == ours.controlnet_config
    g = torch.Generator().manual_seed(4)
    x, image = torch.randn(2, 4, LATENT, LATENT, generator=g), torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g)
    context, text_embeds = torch.randn(2, 7, base.context_dim, generator=g), torch.randn(2, 16, generator=g)
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32], [64, 48, 8, 0, 32, 32]])
    t = torch.tensor([17, 803])
    with torch.no_grad():
        expected = theirs(
            x, t, context, image, 0.6, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False
        )
        got = ours(x, t, context, image, 0.6, text_embeds=text_embeds, time_ids=time_ids)
        assert _max_diff(single(x, t, context, image, 0.6, text_embeds=text_embeds, time_ids=time_ids), got) == 0.0
        moved = ours(x, t, context, image, 0.6, text_embeds=text_embeds, time_ids=time_ids * 2)
    assert _max_diff(got, expected) < TOL
    assert _relative(moved[1], got[1]) > 0.05


def test_sd_v2_single_file_takes_heads_from_the_base(tmp_path):
    """An original file does not show the attention heads: `base` supplies them (SD v2's fixed head width and
    linear projections here); without it the file is read with SD v1's 8 heads at this context width."""
    from safetensors.torch import save_file
    from tiny_models import _diffusers_unet_config, _randomise

    unet = diffusers.UNet2DConditionModel(**_diffusers_unet_config("v2"))
    theirs = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    _randomise(theirs, torch.Generator().manual_seed(5))
    theirs.save_pretrained(tmp_path / "controlnet_v2")
    theirs = diffusers.ControlNetModel.from_pretrained(tmp_path / "controlnet_v2").eval()
    file = tmp_path / "control_v2.safetensors"
    save_file(controlnet_single_file_state_dict(tmp_path / "controlnet_v2"), str(file))
    base = unet_config_from_diffusers(dict(unet.config))
    x, t, context, image = _inputs(seed=9)
    with torch.no_grad():
        expected = theirs(x, t, context, image, 0.6, return_dict=False)
        with_base = load_controlnet(file, base=base)
        assert with_base.controlnet_config == load_controlnet(tmp_path / "controlnet_v2").controlnet_config
        assert _max_diff(with_base(x, t, context, image, 0.6), expected) < TOL
        assert _max_diff(load_controlnet(file)(x, t, context, image, 0.6), expected) > 100 * TOL
