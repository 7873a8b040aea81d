"""Prompt weighting, A1111's syntax (`--prompt-weighting`, runtime/prompt_weights.py): the parser against A1111's
documented examples; the tokens (a prompt without brackets: exactly its usual ids); images against diffusers'
StableDiffusionPipeline / StableDiffusionXLPipeline given `prompt_embeds` that this file weights itself, in torch,
from the pipeline's own tokenizer and text encoder (the fragments written out by hand: no parser of ours involved)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from test_runtime_fixtures import exported, one_line_error, psnr, run_cli
from tiny_models import write_tiny_clip_tokenizer

from ldm_rt.runtime.cli import main as cli_main
from ldm_rt.runtime.params import GenerationError
from ldm_rt.runtime.pipeline import Pipeline
from ldm_rt.runtime.prompt_weights import parse_prompt_weights, tokenize
from ldm_rt.runtime.tokenizer import PromptTokenizer

SIZE, STEPS = 16, 4
FP32_DB, SENSITIVE_DB = 50.0, 40.0
# The weighted prompt of the image tests, as A1111 reads it (written out by hand for the oracles).
PROMPT = "a photo of a (red:1.5) car, [blurry] ((house))"
FRAGMENTS = [("a photo of a ", 1.0), ("red", 1.5), (" car, ", 1.0), ("blurry", 1 / 1.1), (" ", 1.0), ("house", 1.1 * 1.1)]
# Weighted heavily enough that A1111's mean restore moves the image well below the bar (it is a few % here).
NEGATIVE, NEGATIVE_FRAGMENTS = "(ugly sky:1.8)", [("ugly sky", 1.8)]
RED_AT_1 = [(text, 1.0 if text == "red" else weight) for text, weight in FRAGMENTS]  # (red:1.0): must look different


# ---- the parser: A1111's doctests (modules/prompt_parser.py), escapes, nesting, unbalanced brackets, BREAK ----
# A1111's documented examples and our edge cases (test_native_prompt_weighting.py runs them on the C++ parser too).
GOLDEN = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
         (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
    ),  # fmt: skip
    ("", [("", 1.0)]),
    ("[[low]] ((high))", [("low", (1 / 1.1) * (1 / 1.1)), (" ", 1.0), ("high", 1.1 * 1.1)]),
    ("(a [b] c:2)", [("a ", 2.0), ("b", (1 / 1.1) * 2), (" c", 2.0)]),
    ("( wide : 0.5 )", [(" wide ", 0.5)]),  # spaces around the weight (A1111 since 1.6)
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("closes) nothing] x:2)", [("closes) nothing] x:2)", 1.0)]),  # a bracket that closes nothing is text
    ("ratio 16:9 (x:-1)", [("ratio 16:9 ", 1.0), ("x", -1.0)]),
    (r"a \\ b \x", [("a \\ b x", 1.0)]),  # \\ is a backslash; any other backslash is dropped (A1111)
]


@pytest.mark.parametrize("prompt, expected", GOLDEN)
def test_the_parser_reads_what_a1111_reads(prompt, expected):
    assert parse_prompt_weights(prompt) == [expected]


def test_break_separates_segments_and_a_bad_weight_is_one_clear_error():
    # The empty text between BREAK and the bracket stays, as in A1111 (it keeps equal weights around it apart).
    assert parse_prompt_weights("a cat BREAK (a dog:1.2)") == [[("a cat", 1.0)], [("", 1.0), ("a dog", 1.2)]]
    assert parse_prompt_weights("(red BREAK car)") == [[("red", 1.1)], [("car", 1.1)]]  # the bracket spans it
    assert parse_prompt_weights("BREAKFAST") == [[("BREAKFAST", 1.0)]]  # a word of its own only
    with pytest.raises(GenerationError, match=r"prompt weight ':1\.2\.3\)' is not a number; write \(text:1\.2\)"):
        parse_prompt_weights("a (cat:1.2.3)")


# ---- tokens ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_tokenizer(tiny_sd_v1) -> PromptTokenizer:
    return PromptTokenizer.from_diffusers_folder(Path(tiny_sd_v1) / "tokenizer")


WORDS = "a photo of a red car parked in front of a small blue house with a green door and white windows".split()


@pytest.mark.parametrize("chunks", [1, 3])
def test_a_prompt_without_brackets_or_commas_gives_exactly_its_usual_ids(clip_tokenizer, chunks, tmp_path):
    v2 = PromptTokenizer.from_diffusers_folder(write_tiny_clip_tokenizer(tmp_path, pad_token="!"))  # SD v2's pad
    assert v2.pad_id != v2.eos_id
    prompts = ["", "a red car", " ".join(WORDS * 2), " ".join(WORDS * 4), " ".join(WORDS * 9), "wow!! <|endoftext|> é ☃"]
    for tokenizer in (clip_tokenizer, v2):
        usual, weighted = tokenizer(prompts, chunks=chunks, warn=False), tokenize(tokenizer, prompts, chunks=chunks, warn=False)
        assert np.array_equal(weighted.ids, usual.ids) and weighted.dropped == usual.dropped
        assert all(np.array_equal(a, b) for a, b in zip(weighted.chunks, usual.chunks, strict=True))
        assert all(np.all(w == 1.0) for w in weighted.weights)


def test_weights_follow_their_tokens_and_break_starts_a_chunk(clip_tokenizer, caplog):
    t = clip_tokenizer
    got = tokenize(t, "a (red:1.5) car", chunks=1)
    ids = t.token_ids(["a ", "red", " car"])
    assert got.chunks[0][0, : 2 + sum(map(len, ids))].tolist() == [t.bos_id, *ids[0], *ids[1], *ids[2], t.eos_id]
    assert got.weights[0][0, : 2 + sum(map(len, ids))].tolist() == [1.0] * (1 + len(ids[0])) + [1.5] * len(ids[1]) + [1.0] * (len(ids[2]) + 1)
    assert np.all(got.weights[0][0, 2 + sum(map(len, ids)) :] == 1.0)  # pads
    broken = tokenize(t, ["a cat BREAK a dog", "BREAK a dog", "a cat BREAK"], chunks=3)
    cat, dog = (t("a cat").chunks[0][0], t("a dog").chunks[0][0])
    empty = t("").chunks[0][0]
    assert [c.tolist() for c in broken.chunks[0]] == [cat.tolist(), dog.tolist()]
    assert [c.tolist() for c in broken.chunks[1]] == [empty.tolist(), dog.tolist()]  # A1111: an empty chunk first
    assert [c.tolist() for c in broken.chunks[2]] == [cat.tolist()]  # a BREAK at the end starts nothing
    with caplog.at_level(logging.WARNING):
        dropped = tokenize(t, "a cat BREAK a dog", chunks=1)
    assert dropped.dropped == [len(t.token_ids(["a dog"])[0])]
    assert any("prompt 0 was truncated" in r.getMessage() for r in caplog.records)


# ---- chunks: A1111's comma backtracking ---------------------------------------------------------------------------
def a1111_chunks(tokenized, weights, comma: int, size: int = 75, backtrack: int = 20) -> list[list[tuple[int, float]]]:
    """A1111's `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line` chunking, transcribed for the test: each fragment's
    tokens (None: BREAK) fill chunks of `size`; a full chunk whose last comma is within `backtrack` tokens ends after
    that comma and the tokens after it start the next chunk. Returns the chunks' (token, weight) lists."""
    chunks, chunk, last_comma = [], [], -1

    def next_chunk():
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = [], -1

    for tokens, weight in zip(tokenized, weights):
        if tokens is None:
            next_chunk()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(chunk)
            elif backtrack != 0 and len(chunk) == size and last_comma != -1 and len(chunk) - last_comma <= backtrack:
                reloc = chunk[last_comma + 1 :]
                chunk = chunk[: last_comma + 1]
                next_chunk()
                chunk = reloc
            if len(chunk) == size:
                next_chunk()
            chunk.append((token, weight))
    if chunk or not chunks:
        next_chunk()
    return chunks


def comma_prompts() -> list[str]:
    """Long prompts with commas 0..75 tokens before a chunk's end, with weights and BREAK (test_native_prompt_weighting.py
    runs them on the C++ tokenizer too)."""
    prompts = []
    for before_end in (0, 1, 2, 19, 20, 21, 30, 74, 75):
        words = ["cat"] * 160
        words[74 - before_end] = "cat,"
        words[150 - before_end // 2] = "cat,"
        prompts.append(" ".join(words))
    return prompts + ["(" + " ".join(["red,"] * 80) + ":1.3)", " ".join(["dog"] * 70) + ", (blue:1.2) " + " ".join(["sky"] * 20) + " BREAK a, b"]


def test_a_full_chunk_ends_at_a_comma_within_20_tokens_as_in_a1111(clip_tokenizer):
    """Long prompts with commas 0..30 tokens before a chunk's end (and at it, and with BREAK and weights): the chunks
    are A1111's. The comma is one token; the rest are one-token words."""
    t = clip_tokenizer
    comma = t.token_ids([","])[0][0]
    prompts = comma_prompts()
    for prompt in prompts:
        segments = parse_prompt_weights(prompt)
        fragments = [f for k, segment in enumerate(segments) for f in ([None] if k else []) + segment]
        tokenized = [None if f is None else t.token_ids([f[0]])[0] for f in fragments]
        expected = a1111_chunks(tokenized, [None if f is None else f[1] for f in fragments], comma)
        got = tokenize(t, prompt, chunks=4, warn=False)
        assert len(got.chunks[0]) == min(len(expected), 4), prompt
        for ids, w, want in zip(got.chunks[0], got.weights[0], expected):
            n = len(want)
            assert ids[1 : n + 1].tolist() == [tok for tok, _ in want] and ids[n + 1] == t.eos_id, prompt
            np.testing.assert_array_equal(w[1 : n + 1], np.float32([wt for _, wt in want]))
    # The backtrack moved words (not only split at 75) in these prompts: 19 and 20 tokens back, not 21.
    firsts = [int(np.argmax(tokenize(t, p, chunks=1, warn=False).ids[0, 1:] == t.eos_id)) for p in prompts[3:6]]
    assert firsts == [57, 56, 75]  # "cat," is two tokens: its comma sits 18 and 19 tokens before the end


# ---- images against diffusers, SD ------------------------------------------------------------------------------
def weighted_embeds(tokenizer, encoder, fragments, chunks: int = 1, hidden_state: int | None = None, rescale: bool = True):
    """A1111's weighted embeddings, written for the test: each (text, weight) fragment tokenised alone, its tokens
    filling chunks of 75 (None: BREAK, the next fragment starts a new chunk), `chunks` chunks in all, each with
    bos/eos/pad (weight 1), encoded, z *= w, then z *= mean(z) / mean(z * w) over each chunk's (tokens, channels).
    `hidden_state`: that hidden layer instead of the last (SDXL: -2); rescale=False: no mean restore. Returns
    ((1, chunks x 77, D), the encoder's output)."""
    import torch

    length = tokenizer.model_max_length
    tokenized = [None if f is None else tokenizer(f[0], add_special_tokens=False, truncation=False).input_ids for f in fragments]
    pieces = a1111_chunks(tokenized, [None if f is None else f[1] for f in fragments], tokenizer.convert_tokens_to_ids(",</w>"), length - 2)
    pieces += [[] for _ in range(chunks - len(pieces))]
    rows = [[tokenizer.bos_token_id, *(t for t, _ in p), tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (length - 2 - len(p)) for p in pieces]
    row_weights = [[1.0, *(w for _, w in p)] + [1.0] * (length - 1 - len(p)) for p in pieces]
    with torch.no_grad():
        out = encoder(torch.tensor(rows), output_hidden_states=hidden_state is not None)
        z = out[0] if hidden_state is None else out.hidden_states[hidden_state]  # (chunks, 77, D)
        before = z.mean(dim=(1, 2), keepdim=True)
        z = z * torch.tensor(row_weights)[..., None]
        z = z * before / z.mean(dim=(1, 2), keepdim=True) if rescale else z
    return z.reshape(1, -1, z.shape[-1]), out


def sd_oracle(folder: Path, fragments, negative_fragments, latents: np.ndarray, rescale: bool = True, chunks: int = 1) -> np.ndarray:
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    cond, _ = weighted_embeds(pipe.tokenizer, pipe.text_encoder, fragments, chunks, rescale=rescale)
    uncond, _ = weighted_embeds(pipe.tokenizer, pipe.text_encoder, negative_fragments, chunks, rescale=rescale)
    with torch.no_grad():
        images = pipe(
            prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS, guidance_scale=7.5,
            latents=torch.from_numpy(latents), height=SIZE, width=SIZE, output_type="np",
        ).images  # fmt: skip
    return np.round(images * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sd(tmp_path_factory, tiny_sd_v1, torch_one_thread):
    """(pipeline over the exported tiny SD v1, its diffusers folder, latents, generate's keyword arguments)."""
    latents = np.random.default_rng(5).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)
    kw = dict(steps=STEPS, guidance=7.5, height=SIZE, width=SIZE, scheduler="ddim", latents=latents)
    return Pipeline.load(exported(tmp_path_factory, tiny_sd_v1, fp16=False)), Path(tiny_sd_v1), latents, kw


def test_a_weighted_prompt_draws_what_diffusers_draws_from_a1111s_weighted_embeddings(sd):
    pipe, folder, latents, kw = sd
    theirs = sd_oracle(folder, FRAGMENTS, NEGATIVE_FRAGMENTS, latents)
    ours = pipe.generate(PROMPT, negative_prompt=NEGATIVE, prompt_weighting=True, **kw)
    assert ours.params["prompt_weighting"] is True
    assert psnr(ours.images, theirs) >= FP32_DB
    # The oracle tells the weights apart: red at 1.0 instead of 1.5, no mean restore, or the brackets read as text.
    assert psnr(sd_oracle(folder, RED_AT_1, NEGATIVE_FRAGMENTS, latents), theirs) < SENSITIVE_DB
    assert psnr(sd_oracle(folder, FRAGMENTS, NEGATIVE_FRAGMENTS, latents, rescale=False), theirs) < SENSITIVE_DB
    assert psnr(pipe.generate(PROMPT, negative_prompt=NEGATIVE, **kw).images, theirs) < SENSITIVE_DB


def test_long_weighted_prompts_weight_each_chunk_on_its_own(sd, tmp_path_factory, tiny_sd_v1):
    from test_long_prompts import CHUNKS, chunked_export  # its session's --prompt-chunks build, shared

    _, folder, latents, kw = sd
    words = " ".join(WORDS * 2)  # 92 tokens: a chunk of 75 and one of 17, then BREAK starts the third
    prompt = f"({words}:1.2) BREAK a (blue:1.4) house"
    theirs = sd_oracle(folder, [(words, 1.2), None, ("a ", 1.0), ("blue", 1.4), (" house", 1.0)], NEGATIVE_FRAGMENTS, latents, chunks=CHUNKS)
    pipe = Pipeline.load(chunked_export(tmp_path_factory, tiny_sd_v1))
    assert psnr(pipe.generate(prompt, negative_prompt=NEGATIVE, prompt_weighting=True, **kw).images, theirs) >= FP32_DB
    # Without BREAK the last words join the second chunk: another image.
    joined = sd_oracle(folder, [(words, 1.2), ("a ", 1.0), ("blue", 1.4), (" house", 1.0)], NEGATIVE_FRAGMENTS, latents, chunks=CHUNKS)
    assert psnr(joined, theirs) < SENSITIVE_DB


def test_without_brackets_the_flag_changes_nothing_and_without_the_flag_brackets_are_text(sd):
    pipe, _, _, kw = sd
    plain = pipe.generate("a red car", negative_prompt="blurry", **kw)
    flagged = pipe.generate("a red car", negative_prompt="blurry", prompt_weighting=True, **kw)
    assert np.array_equal(plain.images, flagged.images)
    assert "prompt_weighting" not in plain.params  # images made without it carry the same parameters as before
    literal = pipe.generate("a (red) car", negative_prompt="blurry", **kw).images
    assert psnr(literal, pipe.generate("a (red) car", negative_prompt="blurry", prompt_weighting=True, **kw).images) < SENSITIVE_DB
    with pytest.raises(GenerationError, match="prompt_weighting must be True or False, got 'yes'"):
        pipe.generate("a red car", prompt_weighting="yes", **kw)


def test_prompts_batched_together_are_each_weighted_on_their_own(sd):
    pipe, _, _, kw = sd
    prompts = [PROMPT, "a (blue:1.3) [house]"]
    latents = np.random.default_rng(7).standard_normal((2, 4, SIZE // 2, SIZE // 2), dtype=np.float32)
    together = pipe.generate(prompts, negative_prompt=NEGATIVE, prompt_weighting=True, **{**kw, "latents": latents}).images
    twice = pipe.generate(prompts[1], negative_prompt=NEGATIVE, prompt_weighting=True, batch=2, **{**kw, "latents": latents}).images
    for k, prompt in enumerate(prompts):
        alone = pipe.generate(prompt, negative_prompt=NEGATIVE, prompt_weighting=True, **{**kw, "latents": latents[k : k + 1]}).images
        assert psnr(together[k : k + 1], alone) >= FP32_DB
        alone = pipe.generate(prompts[1], negative_prompt=NEGATIVE, prompt_weighting=True, **{**kw, "latents": latents[k : k + 1]}).images
        assert psnr(twice[k : k + 1], alone) >= FP32_DB


def test_the_cli_flag_weights_the_prompt_and_records_it(sd, tmp_path, capsys):
    pipe, _, latents, kw = sd
    np.save(tmp_path / "noise.npy", latents)
    args = ["sample", "--model", str(pipe.artifacts.root), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--steps", str(STEPS),
            "--height", str(SIZE), "--width", str(SIZE), "--scheduler", "ddim", "--latents", str(tmp_path / "noise.npy")]  # fmt: skip
    code, out, err = run_cli(cli_main, [*args, "--prompt-weighting", "--out", str(tmp_path / "w.png")])
    assert code == 0, err
    from PIL import Image

    with Image.open(tmp_path / "w.png") as im:
        image, params = np.asarray(im.convert("RGB")), json.loads(im.text["parameters"])
    assert params["prompt_weighting"] is True and params["prompts"] == [PROMPT]
    assert np.array_equal(image, pipe.generate(PROMPT, negative_prompt=NEGATIVE, prompt_weighting=True, **kw).images[0])
    code = cli_main([*args[:4], "a (cat:1.2.3)", *args[5:], "--prompt-weighting", "--out", str(tmp_path / "bad.png")])
    line = one_line_error(code, capsys.readouterr().err, "ldm-rt")
    assert "prompt weight ':1.2.3)' is not a number" in line and not (tmp_path / "bad.png").exists()


# ---- SDXL: both encoders' states weighted, each on its own; the pooled text is not weighted (A1111, ComfyUI) ----
def test_sdxl_weights_both_encoders_and_not_the_pooled_text(small_sdxl_base, torch_one_thread):
    import diffusers
    import torch
    from sdxl_small_models import SIZE as XL_SIZE

    folder, artifacts, _ = small_sdxl_base
    latents = np.random.default_rng(6).standard_normal((1, 4, XL_SIZE // 2, XL_SIZE // 2), dtype=np.float32)  # its VAE: f = 2
    oracle = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    oracle.scheduler = diffusers.EulerDiscreteScheduler.from_config(oracle.scheduler.config)
    oracle.set_progress_bar_config(disable=True)

    def embeds(fragments):
        states, pooled = [], None
        for tok, encoder in ((oracle.tokenizer, oracle.text_encoder), (oracle.tokenizer_2, oracle.text_encoder_2)):
            z, out = weighted_embeds(tok, encoder, fragments, hidden_state=-2)  # penultimate layer
            states.append(z)
            pooled = out[0] if encoder is oracle.text_encoder_2 else pooled  # text_embeds, unweighted
        return torch.cat(states, dim=-1), pooled

    def draw(fragments):
        (cond, cond_pooled), (uncond, uncond_pooled) = embeds(fragments), embeds(NEGATIVE_FRAGMENTS)
        with torch.no_grad():
            images = oracle(
                prompt_embeds=cond, pooled_prompt_embeds=cond_pooled, negative_prompt_embeds=uncond,
                negative_pooled_prompt_embeds=uncond_pooled, num_inference_steps=STEPS, guidance_scale=5.0,
                latents=torch.from_numpy(latents), height=XL_SIZE, width=XL_SIZE, output_type="np",
            ).images  # fmt: skip
        return np.round(images * 255).astype(np.uint8)

    theirs = draw(FRAGMENTS)
    kw = dict(negative_prompt=NEGATIVE, steps=STEPS, guidance=5.0, scheduler="euler", latents=latents, prompt_weighting=True)
    assert psnr(Pipeline.load(artifacts).generate(PROMPT, **kw).images, theirs) >= FP32_DB
    assert psnr(draw(RED_AT_1), theirs) < SENSITIVE_DB
