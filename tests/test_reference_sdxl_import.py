"""SDXL import: diffusers base / refiner / Turbo folders and sgm single files load into our reference model,
which equals diffusers per component (UNet with text_embeds and time_ids, both text encoders as
`encode_prompt` returns them, VAE); the single file gives the very weights of the folder, and diffusers' own
single-file converters read our sgm fixture to the folder's weights too (so the fixture is not our key maps
inverted onto themselves). Bad input is one CheckpointError line naming what is wrong."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import (  # noqa: F401  (session fixtures)
    TINY_SDXL_POOLED,
    make_tiny_sdxl_single_file,
    sdxl_single_file_state_dict,
    tiny_sdxl_base,
    tiny_sdxl_refiner,
    tiny_sdxl_turbo,
)

from ldm_rt.reference.checkpoint_errors import CheckpointError
from ldm_rt.reference.checkpoints import SDXL_SCALE_FACTOR, load_model
from ldm_rt.reference.configs import ConfigError, LDMConfig, TextEncoderConfig
from ldm_rt.reference.model_folder import load_model_folder, save_model_folder
from ldm_rt.reference.text_encoder_sdxl import PENULTIMATE, SDXL_EMBEDDER_1_PREFIX
from ldm_rt.runtime.tokenizer import PromptTokenizer

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
PROMPTS = ["a photo of an astronaut riding a horse", "a red cat!"]  # "!" is tokenizer_2's pad token


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module", params=["base", "refiner"])
def variant(request, tiny_sdxl_base, tiny_sdxl_refiner, tmp_path_factory):
    """(name, diffusers folder, single file, our model loaded from the folder)."""
    folder = tiny_sdxl_base if request.param == "base" else tiny_sdxl_refiner
    single = make_tiny_sdxl_single_file(folder, tmp_path_factory.mktemp(f"xl_single_{request.param}") / "model.safetensors")
    return request.param, folder, single, load_model(folder)


def _tokenizer_args(folder: Path, name: str) -> dict[str, Path]:
    args = {"tokenizer_2": folder / "tokenizer_2"}
    if name == "base":
        args["tokenizer"] = folder / "tokenizer"
    return args


def _added_inputs(n_ids: int, context_dim: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = [32.0, 24.0, 0.0, 8.0, 32.0, 32.0] if n_ids == 6 else [32.0, 24.0, 0.0, 8.0, 6.0]
    return {
        "x": torch.randn(2, 4, 16, 16, generator=g),
        "t": torch.tensor([17, 803]),
        "context": torch.randn(2, 77, context_dim, generator=g),
        "text_embeds": torch.randn(2, TINY_SDXL_POOLED, generator=g),
        "time_ids": torch.tensor([ids, ids]),
    }


def test_folder_reads_sdxl_facts(variant):
    name, folder, _, loaded = variant
    config = loaded.model.config
    refiner = name == "refiner"
    assert config.time_ids == (5 if refiner else 6) and config.requires_aesthetics_score == refiner
    assert config.force_zeros_for_empty_prompt == (not refiner)  # as model_index.json says
    assert config.scale_factor == SDXL_SCALE_FACTOR and config.text_encoder_2.hidden_states_index == PENULTIMATE
    assert (config.text_encoder is None) == refiner and (loaded.tokenizer is None) == refiner
    assert loaded.tokenizer_2.pad_id == 0 and (refiner or loaded.tokenizer.pad_id == loaded.tokenizer.eos_id)
    facts = loaded.facts()
    assert (facts.time_ids, facts.pooled_dim, facts.text_encoder_2_dim, facts.context_length) == (config.time_ids, 16, 48, 77)
    assert facts.has_text_encoder == (not refiner) and facts.context_dim == (48 if refiner else 80)


@torch.no_grad()
def test_unet_equals_diffusers_and_time_ids_matter(variant):
    name, folder, _, loaded = variant
    theirs = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    ours = loaded.model.unet
    i = _added_inputs(loaded.model.config.time_ids, ours.config.context_dim)

    def run_theirs(i):
        added = {"text_embeds": i["text_embeds"], "time_ids": i["time_ids"]}
        return theirs(i["x"], i["t"], encoder_hidden_states=i["context"], added_cond_kwargs=added).sample

    expected = run_theirs(i)
    torch.testing.assert_close(ours(i["x"], i["t"], i["context"], text_embeds=i["text_embeds"], time_ids=i["time_ids"]), expected, atol=TOL, rtol=0)
    # One time id off by one moved the output by 0.10-0.19 (max) on these models, over 1000 x TOL: the
    # oracle tells a wrong micro-conditioning from the right one.
    for k in range(i["time_ids"].shape[1]):
        wrong = dict(i, time_ids=i["time_ids"] + torch.nn.functional.one_hot(torch.tensor(k), i["time_ids"].shape[1]))
        assert (run_theirs(wrong) - expected).abs().max() > 300 * TOL


def _diffusers_pipeline(name: str, folder: Path):
    cls = diffusers.StableDiffusionXLPipeline if name == "base" else diffusers.StableDiffusionXLImg2ImgPipeline
    return cls.from_pretrained(str(folder))


@torch.no_grad()
def test_prompt_embeddings_equal_diffusers_encode_prompt(variant):
    name, folder, _, loaded = variant
    pipe = _diffusers_pipeline(name, folder)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    ids_2 = torch.from_numpy(loaded.tokenizer_2(PROMPTS).ids)
    assert ids_2.tolist() == pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    ids = None if name == "refiner" else torch.from_numpy(loaded.tokenizer(PROMPTS).ids)
    context, text_embeds = loaded.model.encode_text(ids, ids_2)
    assert context.shape == (2, 77, 48 if name == "refiner" else 80) and text_embeds.shape == (2, TINY_SDXL_POOLED)
    torch.testing.assert_close(context, embeds, atol=TOL, rtol=0)
    torch.testing.assert_close(text_embeds, pooled, atol=TOL, rtol=0)
    # Padding the second encoder's ids with the first's pad moves both outputs: the pad token is seen.
    wrong = torch.where(ids_2 == loaded.tokenizer_2.pad_id, torch.tensor(loaded.tokenizer_2.eos_id), ids_2)
    wrong_context, _ = loaded.model.encode_text(ids, wrong)
    assert (wrong_context - context).abs().max() > 100 * TOL


@torch.no_grad()
def test_vae_equals_diffusers(variant):
    _, folder, _, loaded = variant
    vae = diffusers.AutoencoderKL.from_pretrained(str(folder / "vae")).eval()
    assert vae.config.scaling_factor == loaded.model.scale_factor
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 16, 16, generator=g)
    torch.testing.assert_close(loaded.model.decode_latent(z), vae.decode(z / vae.config.scaling_factor).sample, atol=TOL, rtol=0)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    expected = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    torch.testing.assert_close(loaded.model.encode_image(x), expected, atol=TOL, rtol=0)


def test_single_file_loads_the_folders_weights(variant):
    name, folder, single, loaded = variant
    from_file = load_model(single, **_tokenizer_args(folder, name))
    assert from_file.info["variant"] == ("sdxl-refiner" if name == "refiner" else "sdxl")
    a, b = loaded.model.config, from_file.model.config
    assert (b.time_ids, b.scale_factor, b.force_zeros_for_empty_prompt) == (a.time_ids, a.scale_factor, a.force_zeros_for_empty_prompt)
    assert b.text_encoder_2 == a.text_encoder_2 and b.text_encoder == a.text_encoder
    assert b.unet.addition_time_embed_dim == a.unet.addition_time_embed_dim
    for part in ("unet", "autoencoder", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(from_file.model, part), getattr(loaded.model, part)
        if theirs is None:
            assert ours is None
            continue
        sd, expected = ours.state_dict(), theirs.state_dict()
        assert sorted(sd) == sorted(expected) and all(torch.equal(sd[k], expected[k]) for k in sd), part
    # Same weights, and the configs build the same networks (heads, depth, groups): same outputs.
    i = _added_inputs(a.time_ids, a.unet.context_dim)
    with torch.no_grad():
        args = (i["x"], i["t"], i["context"])
        extra = {"text_embeds": i["text_embeds"], "time_ids": i["time_ids"]}
        assert torch.equal(from_file.model.unet(*args, **extra), loaded.model.unet(*args, **extra))


def test_diffusers_own_single_file_converters_agree_with_the_fixture(variant):
    """Not circular: diffusers' from_single_file conversion functions read our sgm fixture to the weights
    diffusers saved in the folder, key for key."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextModelWithProjection

    name, folder, single, _ = variant
    sd = load_file(str(single))

    def same(converted, component, file="diffusion_pytorch_model.safetensors"):
        expected = load_file(str(folder / component / file))
        assert sorted(converted) == sorted(expected), component
        assert all(torch.equal(converted[k], expected[k]) for k in expected), component

    same(convert_ldm_unet_checkpoint(dict(sd), json.loads((folder / "unet" / "config.json").read_text())), "unet")
    same(convert_ldm_vae_checkpoint(dict(sd), json.loads((folder / "vae" / "config.json").read_text())), "vae")
    prefix = "conditioner.embedders.0.model." if name == "refiner" else SDXL_EMBEDDER_1_PREFIX
    text_model = CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2"))
    same(convert_open_clip_checkpoint(text_model, dict(sd), prefix=prefix), "text_encoder_2", "model.safetensors")
    if name == "base":
        same(convert_ldm_clip_checkpoint(dict(sd), remove_prefix="conditioner.embedders.0.transformer."), "text_encoder", "model.safetensors")


def test_model_folder_round_trip(variant, tmp_path):
    name, _, _, loaded = variant
    save_model_folder(tmp_path / "m", loaded.model, loaded.tokenizer, loaded.scheduler_config, tokenizer_2=loaded.tokenizer_2)
    assert (tmp_path / "m" / "tokenizer_2.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file() == (name == "base")
    back = load_model_folder(tmp_path / "m")
    assert back.model.config == loaded.model.config and back.facts() == loaded.facts()
    assert back.tokenizer_2.to_str() == loaded.tokenizer_2.to_str()
    sd, expected = back.model.state_dict(), loaded.model.state_dict()
    assert sorted(sd) == sorted(expected) and all(torch.equal(sd[k], expected[k]) for k in sd)
    (tmp_path / "m" / "tokenizer_2.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer_2.json is missing"):
        load_model_folder(tmp_path / "m")


def test_turbo_folder_loads_with_its_scheduler(tiny_sdxl_turbo):
    loaded = load_model(tiny_sdxl_turbo)
    assert loaded.model.config.time_ids == 6 and loaded.model.config.force_zeros_for_empty_prompt
    assert loaded.scheduler_config["_class_name"] == "EulerAncestralDiscreteScheduler"
    assert loaded.scheduler_config["timestep_spacing"] == "trailing"


# ---- bad input ------------------------------------------------------------------------------------
def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _one_line_error(path, match: str, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_model(path, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_sdxl_unet_with_one_encoder_folder_is_refused(tiny_sdxl_base, tmp_path):
    folder = _copy(tiny_sdxl_base, tmp_path)
    shutil.rmtree(folder / "text_encoder_2")
    shutil.rmtree(folder / "tokenizer_2")
    message = _one_line_error(folder, "no text_encoder_2")
    assert "model_index.json" in message and "tokenizer_2/" in message


def test_refiner_unet_with_base_encoders_is_refused(tiny_sdxl_base, tiny_sdxl_refiner, tmp_path):
    folder = _copy(tiny_sdxl_base, tmp_path)
    shutil.rmtree(folder / "unet")
    shutil.copytree(tiny_sdxl_refiner / "unet", folder / "unet")
    _one_line_error(folder, r"cross-attends to 48 channels but the text encoders give 80 \(32 \+ 48\).*refiner UNet only text_encoder_2")


def test_base_unet_in_refiner_folder_is_refused(tiny_sdxl_base, tiny_sdxl_refiner, tmp_path):
    folder = _copy(tiny_sdxl_refiner, tmp_path)
    shutil.rmtree(folder / "unet")
    shutil.copytree(tiny_sdxl_base / "unet", folder / "unet")
    _one_line_error(folder, r"requires_aesthetics_score is true but the UNet is a base's \(6 time ids\); the folder mixes")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "requires_aesthetics_score"}))
    _one_line_error(folder, r"cross-attends to 80 channels but the text encoders give 48 \(text_encoder_2 alone")


def test_aesthetics_flag_must_match_the_unet(tiny_sdxl_refiner, tmp_path):
    folder = _copy(tiny_sdxl_refiner, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": False}))
    _one_line_error(folder, "requires_aesthetics_score is false but the UNet is a refiner's")
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": "yes"}))
    _one_line_error(folder, "force_zeros_for_empty_prompt must be true or false")


@pytest.mark.parametrize("damage, named", [
    (lambda sd: sd.pop("model.diffusion_model.label_emb.0.2.weight"), "UNet, prefix model.diffusion_model.* missing 1: label_emb.0.2.weight"),
    (lambda sd: sd.pop(SDXL_EMBEDDER_1_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"), "missing 1 key.*resblocks.1.attn.in_proj_weight"),
    (lambda sd: sd.__setitem__("model.diffusion_model.label_emb.0.2.bias", torch.zeros(3)), r"misshaped 1: label_emb.0.2.bias \(3,\) != \(256,\)"),
    (lambda sd: sd.__setitem__("conditioner.embedders.0.transformer.text_model.extra.weight", torch.zeros(1)), "text encoder, prefix conditioner.embedders.0.transformer.* unexpected 1: text_model.extra.weight"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(SDXL_EMBEDDER_1_PREFIX)], "needs both text encoders"),
])  # fmt: skip
def test_damaged_single_file_names_the_keys(tiny_sdxl_base, tmp_path, damage, named):
    sd = sdxl_single_file_state_dict(tiny_sdxl_base)
    damage(sd)
    save_file(sd, str(tmp_path / "x.safetensors"))
    _one_line_error(tmp_path / "x.safetensors", named, **_tokenizer_args(tiny_sdxl_base, "base"))


def test_single_file_tokenizers_are_required_and_truncation_is_caught(variant, tmp_path):
    name, folder, single, _ = variant
    kind = "SDXL refiner" if name == "refiner" else "SDXL base"
    _one_line_error(single, f"is an {kind} checkpoint and holds no tokenizer", tokenizer=folder / "tokenizer_2")
    if name == "refiner":
        _one_line_error(single, "pass tokenizer_2= alone", **_tokenizer_args(folder, name), tokenizer=folder / "tokenizer_2")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(single.read_bytes()[: single.stat().st_size // 2])
    _one_line_error(truncated, "not a readable safetensors file", **_tokenizer_args(folder, name))


def test_tokenizers_of_different_lengths_are_refused(tiny_sdxl_base):
    loaded = load_model(tiny_sdxl_base)
    folder = tiny_sdxl_base / "tokenizer"
    short = PromptTokenizer.from_clip_files(folder / "vocab.json", folder / "merges.txt", max_length=16)
    with pytest.raises(CheckpointError, match="tokenizer pads to 16 tokens but tokenizer_2 to 77"):
        dataclasses.replace(loaded, tokenizer=short).facts()


def test_ldm_config_checks_sdxl_conditioning(tiny_sdxl_base):
    config = load_model_folder_config(tiny_sdxl_base)
    with pytest.raises(ConfigError, match="only SDXL UNets use a second text encoder"):
        LDMConfig(unet=dataclasses.replace(config.unet, adm_in_channels=None), text_encoder=config.text_encoder,
                  text_encoder_2=config.text_encoder_2)  # fmt: skip
    with pytest.raises(ConfigError, match=r"must be text_encoder_2.projection_dim \(17\) \+ n"):
        dataclasses.replace(config, text_encoder_2=dataclasses.replace(config.text_encoder_2, projection_dim=17))
    refiner_ids = dataclasses.replace(config.unet, adm_in_channels=TINY_SDXL_POOLED + 5 * 8)
    with pytest.raises(ConfigError, match="SDXL refiner's .* drop text_encoder"):
        dataclasses.replace(config, unet=refiner_ids)
    assert LDMConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="hidden_states_index=-5 is not a layer"):
        TextEncoderConfig(num_hidden_layers=3, hidden_states_index=-5)


def load_model_folder_config(folder: Path) -> LDMConfig:
    return load_model(folder).model.config


def test_end_token_padding_for_tokenizer_2_warns(variant, caplog):
    name, folder, single, _ = variant
    args = _tokenizer_args(folder, name)
    tokenizer_2 = PromptTokenizer.from_clip_files(folder / "tokenizer_2" / "vocab.json", folder / "tokenizer_2" / "merges.txt")
    with caplog.at_level("WARNING", logger="ldm_rt.reference.checkpoints"):
        load_model(single, **{**args, "tokenizer_2": tokenizer_2})  # CLIP's files, padded with <|endoftext|>
    assert 'tokenizer_2 pads with its end token; SDXL\'s tokenizer_2 pads with "!"' in caplog.text


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_full_size_sdxl_single_file_layout_infers_sdxl(name):
    """Stability's real layouts, built on the meta device (no weights): sgm UNet keys of SDXL's diffusers
    config, CLIP ViT-L under embedders.0.transformer and OpenCLIP bigG under embedders.1.model (the refiner:
    bigG alone under embedders.0.model), SD's VAE. The inferred config is SDXL's (sgm sd_xl_base.yaml /
    sd_xl_refiner.yaml)."""
    from test_reference_unet_sdxl import SDXL_BASE, SDXL_REFINER
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ldm_rt.reference.autoencoder import AutoencoderKL
    from ldm_rt.reference.checkpoints import sdxl_single_file_config, split_sdxl_single_file
    from ldm_rt.reference.configs import AutoencoderConfig
    from ldm_rt.reference.keymap_unet import unet_config_from_diffusers
    from ldm_rt.reference.text_encoder import TextEncoder
    from ldm_rt.reference.text_encoder_sdxl import sdxl_text_encoder_2_state_dict_to_single_file
    from ldm_rt.reference.unet import UNetModel

    refiner = name == "refiner"
    unet = unet_config_from_diffusers(SDXL_REFINER if refiner else SDXL_BASE)
    big_g = CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        projection_dim=1280, hidden_act="gelu",
    )  # fmt: skip
    with torch.device("meta"):
        sd = {"model.diffusion_model." + k: v for k, v in UNetModel(unet).state_dict().items()}
        vae = AutoencoderKL(AutoencoderConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2))
        sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
        prefix = "conditioner.embedders.0.model." if refiner else SDXL_EMBEDDER_1_PREFIX
        sd.update(sdxl_text_encoder_2_state_dict_to_single_file(CLIPTextModelWithProjection(big_g), prefix))
        if not refiner:
            vit_l = TextEncoder(TextEncoderConfig())  # CLIP ViT-L/14: 768 wide, 12 layers, quick_gelu
            sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in vit_l.state_dict().items()})
    config, _ = sdxl_single_file_config(split_sdxl_single_file(sd, name), name)
    u = config.unet
    assert (u.model_channels, u.channel_mult, u.attention_resolutions) == (unet.model_channels, unet.channel_mult, (2, 4))
    assert (u.num_head_channels, u.use_linear_in_transformer, u.upcast_attention) == (64, True, False)
    assert (u.adm_in_channels, u.addition_time_embed_dim) == ((2560, 256) if refiner else (2816, 256))
    assert u.transformer_depth == (4 if refiner else (1, 2, 10)) and u.context_dim == (1280 if refiner else 2048)
    assert config.time_ids == (5 if refiner else 6) and config.scale_factor == SDXL_SCALE_FACTOR
    te2 = config.text_encoder_2
    assert (te2.hidden_size, te2.num_attention_heads, te2.num_hidden_layers, te2.projection_dim, te2.hidden_act) == (1280, 20, 32, 1280, "gelu")
    if not refiner:
        te = config.text_encoder
        assert (te.hidden_size, te.num_attention_heads, te.num_hidden_layers, te.hidden_act) == (768, 12, 12, "quick_gelu")
        assert te.hidden_states_index == te2.hidden_states_index == PENULTIMATE


def test_tokenizer_2_that_does_not_fit_is_refused(tiny_sdxl_refiner):
    wide = PromptTokenizer.word_level([f"w{i}" for i in range(700)], max_length=77)
    _one_line_error(tiny_sdxl_refiner, r"the tokenizer_2 has 704 tokens but text_encoder_2 embeds 642", tokenizer_2=wide)
