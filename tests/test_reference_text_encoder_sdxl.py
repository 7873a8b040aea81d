"""SDXL's two text encoders: loading, the prompt embedding against diffusers' encode_prompt, and the
single-file key map of both embedders (OpenCLIP bigG's fused in_proj and transposed projection)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm_rt.reference.checkpoint_errors import CheckpointError
from ldm_rt.reference.text_encoder_sdxl import (
    SDXL_EMBEDDER_0_PREFIX,
    SDXL_EMBEDDER_1_PREFIX,
    canonical_clip_keys,
    load_sdxl_text_encoder,
    load_state_dict_strict,
    sdxl_prompt_embeds,
    sdxl_text_encoder_2_state_dict_from_single_file,
    sdxl_text_encoder_2_state_dict_to_single_file,
    sdxl_text_encoder_state_dict_from_single_file,
)
from ldm_rt.runtime.tokenizer import PromptTokenizer
from tests.tiny_models import _randomise, tiny_clip_vocab, write_tiny_clip_tokenizer

TOL = 1e-5
MAX_LENGTH = 16  # short sequences keep the test fast; the padding behaviour is the same as at 77
HEADS_2 = 4  # hidden 48 -> 12-wide heads, not OpenCLIP's 64: passed explicitly to the key map
PROMPTS = ["a photo of an astronaut riding a horse", "a red cat!"]


def _configs():
    from transformers import CLIPTextConfig

    vocab, _ = tiny_clip_vocab()
    common = dict(
        vocab_size=len(vocab), max_position_embeddings=MAX_LENGTH, layer_norm_eps=1e-5,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
    )
    first = CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, hidden_act="quick_gelu",
        pad_token_id=vocab["<|endoftext|>"], **common,
    )
    second = CLIPTextConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=HEADS_2, hidden_act="gelu",
        projection_dim=40, pad_token_id=vocab["!"], **common,
    )
    return first, second


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    """A diffusers SDXL folder's conditioning part: tokenizer/ (pads with <|endoftext|>), tokenizer_2/
    (pads with "!"), text_encoder/ (CLIPTextModel), text_encoder_2/ (CLIPTextModelWithProjection)."""
    import json

    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("sdxl")
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        folder = write_tiny_clip_tokenizer(root / name, pad_token=pad)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": MAX_LENGTH}))
    first, second = _configs()
    generator = torch.Generator().manual_seed(0)
    for name, model in (("text_encoder", CLIPTextModel(first)), ("text_encoder_2", CLIPTextModelWithProjection(second))):
        _randomise(model, generator)
        model.save_pretrained(str(root / name))
    return root


@pytest.fixture(scope="module")
def encoders(sdxl_folder):
    return (
        load_sdxl_text_encoder(sdxl_folder / "text_encoder"),
        load_sdxl_text_encoder(sdxl_folder / "text_encoder_2", with_projection=True),
    )


def _ids(folder: Path, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    tok = PromptTokenizer.from_diffusers_folder(folder / "tokenizer")
    tok_2 = PromptTokenizer.from_diffusers_folder(folder / "tokenizer_2")
    return torch.from_numpy(tok(prompts).ids), torch.from_numpy(tok_2(prompts).ids)


def _diffusers_encode_prompt(folder: Path, encoders, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: diffusers' own StableDiffusionXLPipeline.encode_prompt with transformers' CLIPTokenizer
    on the same folders (no UNet/VAE: encode_prompt uses only the tokenizers and the text encoders)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=None,
        text_encoder=encoders[0], text_encoder_2=encoders[1],
        tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2")),
    )
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    return embeds, pooled


def test_tokenizers_pad_with_their_own_pad_token(sdxl_folder):
    vocab, _ = tiny_clip_vocab()
    ids, ids_2 = _ids(sdxl_folder, ["a cat"])
    assert ids[0, -1] == vocab["<|endoftext|>"]
    assert ids_2[0, -1] == vocab["!"] == 0
    # Same tokens up to and including the first end token, different padding after it.
    end = int((ids[0] == vocab["<|endoftext|>"]).nonzero()[0])
    assert torch.equal(ids[0, : end + 1], ids_2[0, : end + 1]) and not torch.equal(ids, ids_2)


def test_prompt_embeds_equal_diffusers_encode_prompt(sdxl_folder, encoders):
    ids, ids_2 = _ids(sdxl_folder, PROMPTS)
    with torch.no_grad():
        embeds, pooled = sdxl_prompt_embeds(*encoders, ids, ids_2)
        ref_embeds, ref_pooled = _diffusers_encode_prompt(sdxl_folder, encoders, PROMPTS)
    assert embeds.shape == (2, MAX_LENGTH, 32 + 48) and pooled.shape == (2, 40)
    assert (embeds - ref_embeds).abs().max() < TOL
    assert (pooled - ref_pooled).abs().max() < TOL


def test_wrong_prompt_or_pad_token_moves_the_output(sdxl_folder, encoders):
    """The oracle can tell: another prompt, or the first tokenizer's pad on the second encoder, moves
    the embedding far beyond TOL (measured max |diff|: wrong prompt 6.8 sequence / 1.9 pooled; swapped pad
    5.3 sequence; the last layer instead of the penultimate 3.3; ours vs diffusers 0.0)."""
    ids, ids_2 = _ids(sdxl_folder, PROMPTS)
    other, other_2 = _ids(sdxl_folder, ["a blue dog", "a red cat"])
    with torch.no_grad():
        embeds, pooled = sdxl_prompt_embeds(*encoders, ids, ids_2)
        wrong_prompt, wrong_prompt_pooled = sdxl_prompt_embeds(*encoders, other, other_2)
        swapped_pad, swapped_pad_pooled = sdxl_prompt_embeds(*encoders, ids, ids)  # eos-padded ids on encoder 2
    assert (embeds - wrong_prompt).abs().max() > 1000 * TOL
    assert (pooled - wrong_prompt_pooled).abs().max() > 1000 * TOL
    # Pad positions follow the prompt's end token (causal mask), so only the padded tail moves.
    assert (embeds[..., 32:] - swapped_pad[..., 32:]).abs().max() > 1000 * TOL
    assert torch.equal(embeds[..., :32], swapped_pad[..., :32])


def test_single_file_round_trip(sdxl_folder, encoders):
    """transformers state dicts -> SDXL single-file keys (OpenCLIP: fused in_proj, x @ P projection)
    -> our key map -> the same outputs."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    first, second = encoders
    single = {SDXL_EMBEDDER_0_PREFIX + k: v for k, v in canonical_clip_keys(first.state_dict()).items()}
    single.update(sdxl_text_encoder_2_state_dict_to_single_file(second))
    single["model.diffusion_model.out.0.weight"] = torch.zeros(4)  # other components are not ours to read
    assert f"{SDXL_EMBEDDER_1_PREFIX}transformer.resblocks.2.attn.in_proj_weight" in single
    assert single[f"{SDXL_EMBEDDER_1_PREFIX}text_projection"].shape == (48, 40)
    # Real SDXL files hold embedder 0 in the 4.x layout, with the text_model. level.
    assert f"{SDXL_EMBEDDER_0_PREFIX}text_model.final_layer_norm.weight" in single

    sd_2, config_2 = sdxl_text_encoder_2_state_dict_from_single_file(single, num_attention_heads=HEADS_2)
    assert (config_2.hidden_size, config_2.num_hidden_layers, config_2.projection_dim) == (48, 3, 40)
    rebuilt_2 = CLIPTextModelWithProjection(config_2).eval()
    load_state_dict_strict(rebuilt_2, sd_2, "SDXL text_encoder_2")
    rebuilt = CLIPTextModel(first.config).eval()
    load_state_dict_strict(rebuilt, sdxl_text_encoder_state_dict_from_single_file(single), "SDXL text_encoder")

    ids, ids_2 = _ids(sdxl_folder, PROMPTS)
    with torch.no_grad():
        embeds, pooled = sdxl_prompt_embeds(first, second, ids, ids_2)
        got, got_pooled = sdxl_prompt_embeds(rebuilt, rebuilt_2, ids, ids_2)
    assert (embeds - got).abs().max() < TOL and (pooled - got_pooled).abs().max() < TOL


def test_key_map_equals_diffusers_single_file_conversion(encoders):
    """An independent check of the synthesized layout and of our map: diffusers' own
    convert_open_clip_checkpoint reads the same file into the same tensors (logit_scale, which real files
    carry, is ignored by both)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    single = sdxl_text_encoder_2_state_dict_to_single_file(encoders[1])
    single[f"{SDXL_EMBEDDER_1_PREFIX}logit_scale"] = torch.tensor(4.6)
    ours, _ = sdxl_text_encoder_2_state_dict_from_single_file(single, num_attention_heads=HEADS_2)
    theirs = canonical_clip_keys(convert_open_clip_checkpoint(encoders[1], single, prefix=SDXL_EMBEDDER_1_PREFIX))
    theirs.pop("text_model.embeddings.position_ids", None)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_single_file_projection_not_transposed_would_be_caught(encoders):
    """A projection stored the HF way round (proj, width) is refused by shape, naming the key."""
    single = sdxl_text_encoder_2_state_dict_to_single_file(encoders[1])
    key = f"{SDXL_EMBEDDER_1_PREFIX}text_projection"
    single[key] = single[key].T.contiguous()
    with pytest.raises(CheckpointError, match="text_projection"):
        sdxl_text_encoder_2_state_dict_from_single_file(single, num_attention_heads=HEADS_2)


@pytest.mark.parametrize(
    "damage, named",
    [
        ("drop_projection", "text_projection"),
        ("drop_ln_2", "resblocks.1.ln_2.weight"),
        ("extra", "resblocks.0.attn.surprise"),
        ("misshape", "layer_norm1"),
        ("none", SDXL_EMBEDDER_1_PREFIX),
    ],
)
def test_single_file_errors_name_the_keys(encoders, damage, named):
    single = sdxl_text_encoder_2_state_dict_to_single_file(encoders[1])
    p = SDXL_EMBEDDER_1_PREFIX
    if damage == "drop_projection":
        del single[f"{p}text_projection"]
    elif damage == "drop_ln_2":
        del single[f"{p}transformer.resblocks.1.ln_2.weight"]
    elif damage == "extra":
        single[f"{p}transformer.resblocks.0.attn.surprise"] = torch.zeros(1)
    elif damage == "misshape":
        single[f"{p}transformer.resblocks.0.ln_1.weight"] = torch.zeros(47)
    else:
        single = {k.replace(p, "cond_stage_model.model."): v for k, v in single.items()}
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        sdxl_text_encoder_2_state_dict_from_single_file(single, num_attention_heads=HEADS_2)


def test_embedder_0_errors(encoders):
    with pytest.raises(CheckpointError, match="conditioner.embedders.0"):
        sdxl_text_encoder_state_dict_from_single_file({"cond_stage_model.transformer.x": torch.zeros(1)})
    from transformers import CLIPTextModel

    sd = {SDXL_EMBEDDER_0_PREFIX + k: v for k, v in canonical_clip_keys(encoders[0].state_dict()).items()}
    del sd[f"{SDXL_EMBEDDER_0_PREFIX}text_model.final_layer_norm.bias"]
    with pytest.raises(CheckpointError, match="final_layer_norm.bias"):
        load_state_dict_strict(CLIPTextModel(encoders[0].config), sdxl_text_encoder_state_dict_from_single_file(sd), "SDXL text_encoder")


def test_missing_folder_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_sdxl_text_encoder(tmp_path / "nope")
