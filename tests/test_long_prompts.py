"""Prompts longer than the text encoder's 77 tokens (`build_engines.py --prompt-chunks N`): each prompt is split into
chunks of 75 tokens, each encoded with its own start and end token, and the chunks' states are concatenated on the
token axis (A1111's and compel's long prompts). The oracle: diffusers' StableDiffusionPipeline given those
concatenated embeddings as `prompt_embeds`, from its own tokenizer and text encoder."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_runtime_fixtures import EXPORT_PROFILE, exported, one_line_error, psnr

from ldm_rt.export.build import BuildOptions, build
from ldm_rt.export.build_engines import main as build_main
from ldm_rt.runtime.contracts import ContractError, ShapeProfile, build_contracts
from ldm_rt.runtime.manifest import Manifest
from ldm_rt.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

SIZE, STEPS, SEED, CHUNKS = 16, 5, 3, 3
WORDS = "a photo of a red car parked in front of a small blue house with a green door and white windows".split()
# 184 tokens with the tiny test vocabulary (it spells most words in pieces): three chunks of 75, nothing dropped.
LONG = " ".join(WORDS * 4)
ARGS = dict(negative_prompt="blurry", steps=STEPS, guidance=7.5, height=SIZE, width=SIZE, scheduler="ddim")
FP32_DB, SENSITIVE_DB = 50.0, 40.0


_CHUNKED: dict[tuple[str, str], Path] = {}


def chunked_export(tmp_path_factory, source: Path) -> Path:
    """`source` built with --prompt-chunks CHUNKS (EXPORT_PROFILE otherwise), once per session (the native tests
    share it)."""
    key = (str(tmp_path_factory.getbasetemp()), str(source))
    if key not in _CHUNKED:
        out = tmp_path_factory.mktemp("long_prompts") / "artifacts"
        profile = replace(EXPORT_PROFILE, prompt_chunks=CHUNKS)
        build(BuildOptions(model=Path(source), out=out, profile=profile, onnx_only=True, progress=False))
        _CHUNKED[key] = out
    return _CHUNKED[key]


@pytest.fixture(scope="module")
def chunked(tmp_path_factory, tiny_sd_v1) -> Path:
    return chunked_export(tmp_path_factory, tiny_sd_v1)


def oracle_embeds(pipe, prompt: str, chunks: int) -> torch.Tensor:
    """diffusers' text encoder on `prompt` split into `chunks` chunks of 75 tokens (empty chunks past its end)."""
    tok = pipe.tokenizer
    ids = tok(prompt, add_special_tokens=False, truncation=False).input_ids
    length = tok.model_max_length
    rows = []
    for k in range(chunks):
        piece = ids[k * (length - 2):(k + 1) * (length - 2)]
        row = [tok.bos_token_id, *piece, tok.eos_token_id]
        rows.append(row + [tok.pad_token_id] * (length - len(row)))
    with torch.no_grad():
        states = pipe.text_encoder(torch.tensor(rows))[0]  # (chunks, 77, D)
    return states.reshape(1, -1, states.shape[-1])


def diffusers_image(folder: Path, prompt: str, negative: str, chunks: int, latents: np.ndarray) -> np.ndarray:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(
            prompt_embeds=oracle_embeds(pipe, prompt, chunks), negative_prompt_embeds=oracle_embeds(pipe, negative, chunks),
            num_inference_steps=STEPS, guidance_scale=ARGS["guidance"], latents=torch.from_numpy(latents), height=SIZE,
            width=SIZE, output_type="np",
        ).images
    return np.round(images * 255).astype(np.uint8)


def test_a_long_prompt_draws_what_diffusers_draws_from_its_concatenated_chunks(chunked, tiny_sd_v1, tmp_path_factory, caplog):
    latents = np.random.default_rng(SEED).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)
    theirs = diffusers_image(Path(tiny_sd_v1), LONG, ARGS["negative_prompt"], CHUNKS, latents)
    pipe = Pipeline.load(chunked)
    assert pipe.prompt_chunks == (1, CHUNKS)
    with caplog.at_level(logging.WARNING):
        ours = pipe.generate(LONG, latents=latents, **ARGS).images
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]
    assert psnr(ours, theirs) >= FP32_DB
    # The oracle tells the chunks apart: the first chunk alone (what a build without --prompt-chunks draws, with a
    # warning), or one word changed in the last chunk, moves the image well below the bar.
    truncated = Pipeline.load(exported(tmp_path_factory, tiny_sd_v1, fp16=False))
    assert truncated.prompt_chunks == (1, 1)
    with caplog.at_level(logging.WARNING):
        first_only = truncated.generate(LONG, latents=latents, **ARGS).images
    assert any("prompt 0 was truncated" in r.getMessage() and "text encoder's 77" in r.getMessage() for r in caplog.records)
    assert psnr(first_only, theirs) < SENSITIVE_DB
    changed = LONG.rsplit(" ", 2)[0] + " purple door"
    assert psnr(pipe.generate(changed, latents=latents, **ARGS).images, theirs) < SENSITIVE_DB


def test_short_prompts_are_unchanged_and_words_past_the_last_chunk_are_dropped_with_a_warning(chunked, tmp_path_factory, tiny_sd_v1, caplog):
    latents = np.random.default_rng(SEED).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)
    pipe = Pipeline.load(chunked)
    plain = Pipeline.load(exported(tmp_path_factory, tiny_sd_v1, fp16=False))
    # One chunk each: the same image as a build without --prompt-chunks (the same context, 77 tokens).
    short = dict(latents=latents, **ARGS)
    assert np.array_equal(pipe.generate("a red car", **short).images, plain.generate("a red car", **short).images)
    too_long = " ".join(WORDS * 8)  # 368 tokens: 143 past the third chunk
    with caplog.at_level(logging.WARNING):
        a = pipe.generate(too_long, **short).images
    assert any("was truncated" in r.getMessage() and "3 chunks of the text encoder's 77" in r.getMessage() for r in caplog.records)
    b = pipe.generate(too_long + " and a purple dog", **short).images  # beyond the last chunk: no effect
    assert np.array_equal(a, b)
    # A long negative prompt pads a short prompt to its chunk count, and moves the image.
    assert psnr(pipe.generate("a red car", **{**short, "negative_prompt": LONG}).images, pipe.generate("a red car", **short).images) < SENSITIVE_DB


def test_the_profile_records_the_chunks_and_the_unet_takes_them(chunked, tmp_path_factory, tiny_sd_v1):
    manifest = Manifest.read(chunked)
    assert manifest.profile.prompt_chunks == CHUNKS
    unet = manifest.components["unet"].contract
    tokens = next(d for d in unet.dims if d.name == "context_tokens")
    assert (tokens.min, tokens.opt, tokens.max, tokens.multiple_of) == (77, 77, 3 * 77, 77)
    text = manifest.components["text_encoder"].contract
    assert text.dims[0].max == 2 * EXPORT_PROFILE.batch[2] * CHUNKS  # every chunk of every row
    # ONNX Runtime's fused attention is still found, everywhere, with a dynamic context length.
    plain = Manifest.read(exported(tmp_path_factory, tiny_sd_v1, fp16=False))
    fused = manifest.components["unet"].precisions["fp32"].ort.fused
    assert fused and fused == plain.components["unet"].precisions["fp32"].ort.fused


def test_static_profiles_take_every_chunk_and_bad_counts_are_refused(tmp_path, tiny_sd_v1, capsys):
    facts = Manifest.read(Path(__file__).parent.parent / "engines/default/artifacts").facts
    static = replace(ShapeProfile.static(1, 64, 64), prompt_chunks=2)
    tokens = next(d for d in build_contracts(facts, static)["unet"].dims if d.name == "context_tokens")
    assert (tokens.min, tokens.max) == (2 * facts.context_length,) * 2
    for bad in (0, 9):
        with pytest.raises(ContractError, match="prompt chunks must be 1 to 8"):
            ShapeProfile(prompt_chunks=bad)
        with pytest.raises(SystemExit) as e:  # argparse's usage errors exit from inside the parser
            build_main(["--model", str(tiny_sd_v1), "--out", str(tmp_path / "x"), "--prompt-chunks", str(bad)])
        assert "--prompt-chunks must be 1 to 8" in one_line_error(e.value.code, capsys.readouterr().err, "build_engines.py")
        assert not (tmp_path / "x").exists()


# ---- SDXL: both encoders chunked alike, the pooled text from the first chunk (A1111, ComfyUI) -------------------
def sdxl_oracle_embeds(pipe, prompt: str, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (1, chunks x 77, D1 + D2), pooled (1, P)) as diffusers' encoders give them per chunk."""
    states, pooled = [], None
    for tok, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(prompt, add_special_tokens=False, truncation=False).input_ids
        length = tok.model_max_length
        rows = []
        for k in range(chunks):
            row = [tok.bos_token_id, *ids[k * (length - 2):(k + 1) * (length - 2)], tok.eos_token_id]
            rows.append(row + [tok.pad_token_id] * (length - len(row)))
        with torch.no_grad():
            out = encoder(torch.tensor(rows), output_hidden_states=True)
        states.append(out.hidden_states[-2].reshape(1, -1, out.hidden_states[-2].shape[-1]))  # penultimate layer
        pooled = out[0][:1] if encoder is pipe.text_encoder_2 else pooled  # text_embeds of the first chunk
    return torch.cat(states, dim=-1), pooled


def test_sdxl_long_prompts_draw_what_diffusers_draws_from_chunked_embeddings(tmp_path_factory, small_sdxl_base):
    from sdxl_small_models import PROFILE_FLAGS, SIZE as XL_SIZE

    folder, plain, _ = small_sdxl_base
    out = tmp_path_factory.mktemp("long_prompts_sdxl") / "artifacts"
    assert build_main(["--model", str(folder), "--out", str(out), "--onnx-only", "--prompt-chunks", "2", *PROFILE_FLAGS]) == 0
    prompt, negative = " ".join(WORDS * 3), "blurry"  # 138 tokens: two chunks
    latents = np.random.default_rng(SEED).standard_normal((1, 4, XL_SIZE // 2, XL_SIZE // 2), dtype=np.float32)  # its VAE: f = 2
    oracle = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    oracle.scheduler = diffusers.EulerDiscreteScheduler.from_config(oracle.scheduler.config)
    oracle.set_progress_bar_config(disable=True)
    cond, cond_pooled = sdxl_oracle_embeds(oracle, prompt, 2)
    uncond, uncond_pooled = sdxl_oracle_embeds(oracle, negative, 2)
    with torch.no_grad():
        theirs = oracle(
            prompt_embeds=cond, pooled_prompt_embeds=cond_pooled, negative_prompt_embeds=uncond,
            negative_pooled_prompt_embeds=uncond_pooled, num_inference_steps=4, guidance_scale=5.0,
            latents=torch.from_numpy(latents), height=XL_SIZE, width=XL_SIZE, output_type="np",
        ).images
    theirs = np.round(theirs * 255).astype(np.uint8)
    kw = dict(negative_prompt=negative, steps=4, guidance=5.0, scheduler="euler", latents=latents)
    assert psnr(Pipeline.load(out).generate(prompt, **kw).images, theirs) >= FP32_DB
    assert psnr(Pipeline.load(plain).generate(prompt, **kw).images, theirs) < SENSITIVE_DB  # the first chunk alone


def test_tensorrt_profiles_and_controlnets_take_the_chunked_context():
    from ldm_rt.export.tensorrt_build import engine_profile
    from ldm_rt.runtime.contracts import ControlNetFacts

    facts = Manifest.read(Path(__file__).parent.parent / "engines/default/artifacts").facts
    profile = ShapeProfile((1, 1, 2), (64, 64, 128), (64, 64, 128), prompt_chunks=CHUNKS)
    layout = ControlNetFacts(down=((32, 1), (32, 2)), mid=(64, 4))
    contracts = build_contracts(facts, profile, [layout])
    L, D = facts.context_length, facts.context_dim
    assert engine_profile(contracts["unet"])["encoder_hidden_states"] == [[1, L, D], [2, L, D], [4, CHUNKS * L, D]]
    assert engine_profile(contracts["unet"], static=True)["encoder_hidden_states"] == [[2, L, D]] * 3
    spec = next(t for t in contracts["controlnet_0"].inputs if t.name == "encoder_hidden_states")
    assert spec.shape[1] == "context_tokens" and contracts["controlnet_0"].dims == contracts["unet"].dims
