"""ldm-rt-native --prompt-weighting (A1111's emphasis; cpp/native/numerics/src/prompt_weights.cpp) against the Python
runtime's (runtime/prompt_weights.py). The numerics through the test driver: the parser on tests/test_prompt_weighting.py's
golden cases and thousands of random prompts (fragments, float64 weights to the bit, the same errors), the weighted
tokens, weights and warnings on a CLIP BPE and the default word-level tokenizer, emphasize to the bit. Then images
against `ldm-rt sample --prompt-weighting` on the default model (with the parameters and the one-line error), the tiny
SDXL base (both encoders, a batch of two) and the --prompt-chunks build (BREAK); each comparison also shown to fail
for the wrong weights. The native build and the SDXL / chunked exports are the session's shared ones."""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import test_prompt_weighting
from ldm_rt.runtime.artifacts import default_artifacts_dir
from ldm_rt.runtime.cli import build_parser
from ldm_rt.runtime.cli import main as ldm_rt_main
from ldm_rt.runtime.manifest import MANIFEST
from ldm_rt.runtime.params import GenerationError
from ldm_rt.runtime.pipeline import Pipeline
from ldm_rt.runtime.prompt_weights import emphasize, parse_prompt_weights, tokenize
from ldm_rt.runtime.tokenizer import PromptTokenizer
from PIL import Image
from test_native_numerics import probe, run_probe  # noqa: F401  (the session's numerics test driver)
from test_native_sdxl import native  # noqa: F401  (the session's native build)
from test_runtime_fixtures import one_line_error, psnr, run_cli

pytest.importorskip("openvino")

NATIVE_DB = 45.0  # both engines fp32 (test_native_runtime.py)
DEFAULT_TOKENIZER = default_artifacts_dir() / "tokenizer.json"
GOLDEN = test_prompt_weighting.GOLDEN  # the parser's golden cases, one list for both runtimes
EDGES = [
    "a cat BREAK (a dog:1.2)", "(red BREAK car)", "BREAKFAST", "x BREAK BREAK y", "a\u001cBREAK b", "_BREAK", "1BREAK",
    "a (cat:1.2.3)", "(x:-.)", "(x:\u0661.\u0665)", "(x: \u2003 1.5\u3000)", "(a:1e5)", "(a:" + "9" * 400 + ")", "a:1.5) b",
    "\\ \\\\ \\( \\x", "((a) [b]", "]]))", "(a [b:1.3] c]", "é ☃ (ü:0.5)", "",
]  # fmt: skip
TOKENS = ["(", ")", "[", "]", ":", ":1.3)", "(x:0.7)", ":1.2.3)", "\\(", "\\", "BREAK", " ", ".", "1", "\u0663", "\u2003", "é", "_",
          "zzqx"]  # fmt: skip


def random_prompts(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    words = test_prompt_weighting.WORDS + TOKENS
    return ["".join(rnd.choice(words) + rnd.choice(["", " "]) for _ in range(rnd.randint(0, 40))) for _ in range(n)]


def from_bits(hex_words: list[str], dtype) -> np.ndarray:
    return np.array([int(h, 16) for h in hex_words], np.uint64 if dtype == np.float64 else np.uint32).view(dtype)


# ---- numerics: parser, tokens, emphasis -------------------------------------------------------------------------
def test_the_parser_reads_every_prompt_as_python_to_the_bit(probe):  # noqa: F811
    prompts = [case[0] for case in GOLDEN] + EDGES + random_prompts(3000, seed=1)
    got = json.loads(run_probe(probe, "prompt-weights", str(DEFAULT_TOKENIZER), "1", stdin=json.dumps(prompts)).stdout)["parsed"]
    errors = 0
    for prompt, native_parse in zip(prompts, got, strict=True):
        try:
            expected = parse_prompt_weights(prompt)
        except GenerationError as e:
            assert native_parse == {"error": str(e)}, prompt
            errors += 1
            continue
        weights = [from_bits([w for _, w in segment], np.float64).tolist() for segment in native_parse]
        assert [[(t, w) for (t, _), w in zip(s, ws)] for s, ws in zip(native_parse, weights)] == expected, prompt
    assert errors >= 50  # the random prompts hit the bad-weight error too


@pytest.fixture(scope="module")
def tokenizers(tiny_sd_v1, tmp_path_factory) -> list[tuple[PromptTokenizer, Path]]:
    clip = tmp_path_factory.mktemp("weighted_tokens") / "tokenizer.json"
    PromptTokenizer.from_diffusers_folder(Path(tiny_sd_v1) / "tokenizer").save(clip)
    return [(PromptTokenizer.from_file(path), path) for path in (clip, DEFAULT_TOKENIZER)]


@pytest.mark.parametrize("chunks", [1, 3])
def test_weighted_tokens_weights_and_warnings_match_python(probe, tokenizers, chunks, caplog):  # noqa: F811
    long = " ".join(test_prompt_weighting.WORDS * 9)
    prompts = ["", "a (red:1.5) car", "a cat BREAK a dog", "BREAK a dog", "a cat BREAK", f"({long}:1.2) BREAK (x)", "(zzqx) [zzqx]"]
    prompts += [p for p in random_prompts(300, seed=2) if _parses(p)] + test_prompt_weighting.comma_prompts()
    for tokenizer, path in tokenizers:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ldm_rt"):
            expected = tokenize(tokenizer, prompts, chunks=chunks)
        got = json.loads(run_probe(probe, "prompt-weights", str(path), str(chunks), stdin=json.dumps(prompts)).stdout)
        for ids, weights, e_ids, e_weights in zip(got["chunks"], got["weights"], expected.chunks, expected.weights, strict=True):
            assert np.array_equal(np.reshape(ids, e_ids.shape), e_ids)
            assert np.array_equal(from_bits(weights, np.float32).reshape(e_weights.shape), e_weights)
        assert got["dropped"] == expected.dropped and np.array_equal(np.reshape(got["ids"], expected.ids.shape), expected.ids)
        assert got["warnings"] == [r.getMessage() for r in caplog.records] and got["warnings"]


def _parses(prompt: str) -> bool:
    try:
        parse_prompt_weights(prompt)
    except GenerationError:
        return False
    return True


@pytest.mark.parametrize(
    "shape, batch, weights",
    [
        ((2, 154, 8), 1, [[[1.0] * 77, [1.5] * 77], [[0.5] * 40 + [1.0] * 37]]),  # a shorter prompt's missing chunk: 1
        ((4, 77, 16), 2, [[[1.2] * 10 + [1.0] * 67], [[1.0] * 77]]),  # each prompt twice in a row
        ((1, 77, 8), 1, [[[1.0] * 77]]),  # all 1: unchanged
        ((1, 77, 8), 1, [[[3e38] * 77]]),  # overflows: the one-line error
    ],
)
def test_emphasis_is_numpys_to_the_bit(probe, shape, batch, weights):  # noqa: F811
    states = np.random.default_rng(3).standard_normal(shape, dtype=np.float32)  # the driver draws the same
    args = ["emphasize", "3", json.dumps(list(shape)), str(batch), json.dumps(weights)]
    try:
        with np.errstate(all="ignore"):  # the overflow case: numpy's warnings before the error
            expected = emphasize(states, [np.asarray(w, np.float32) for w in weights], batch)
    except GenerationError as e:
        assert run_probe(probe, *args, ok=False).stderr.strip() == f"error: {e}"
        return
    got = from_bits(json.loads(run_probe(probe, *args).stdout), np.float32).reshape(shape)
    assert np.array_equal(got, expected)


# ---- images ------------------------------------------------------------------------------------------------------
def image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_the_flag_reads_as_in_ldm_rt_sample_help(native):  # noqa: F811
    sample = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["sample"]
    expected = next(a.help for a in sample._actions if "--prompt-weighting" in a.option_strings)
    done = native.run("--help")
    assert done.returncode == 0 and expected in " ".join(done.stdout.split())


def test_default_model_weighted_image_parameters_and_error_match_ldm_rt_sample(native, tmp_path, capsys):  # noqa: F811
    model = default_artifacts_dir()
    if not (model / MANIFEST).is_file():
        pytest.skip("the shipped default model's artifacts are not in this checkout")
    prompt, negative = "a large (red:2.5) circle on the (left:0.3) on a white background", "(a small blue square:1.4)"
    args = ["--model", str(model), "--prompt", prompt, "--negative-prompt", negative, "--steps", "6", "--seed", "3",
            "--prompt-weighting"]  # fmt: skip
    done = native.run(*args, "--out", tmp_path / "c.png")
    assert done.returncode == 0, done.stderr
    code, _, err = run_cli(ldm_rt_main, ["sample", *args, "--out", str(tmp_path / "py.png")])
    assert code == 0, err
    ours = image(tmp_path / "c.png")
    assert psnr(ours, image(tmp_path / "py.png")) >= NATIVE_DB
    # The weights show, the prompt's and the negative prompt's: without either, another image.
    pipe = Pipeline.load(model)
    kw = dict(steps=6, seed=3, prompt_weighting=True)
    plain = pipe.generate("a large red circle on the left on a white background", negative_prompt=negative, **kw).images[0]
    plain_negative = pipe.generate(prompt, negative_prompt="a small blue square", **kw).images[0]
    print("default model, native vs without the weights:", round(psnr(ours, plain), 1), "dB; without the negative's:",
          round(psnr(ours, plain_negative), 1), "dB")
    assert max(psnr(ours, plain), psnr(ours, plain_negative)) < NATIVE_DB - 15
    with Image.open(tmp_path / "c.png") as c, Image.open(tmp_path / "py.png") as py:
        c_text, py_text = dict(c.text), dict(py.text)
    assert (c_text.pop("Software"), py_text.pop("Software")) == ("ldm-rt-native", "ldm-rt")
    c_params, py_params = json.loads(c_text.pop("parameters")), json.loads(py_text.pop("parameters"))
    assert (c_params.pop("backend"), py_params.pop("backend")) == ("openvino", "onnxruntime")
    assert c_params == py_params and c_params["prompt_weighting"] is True
    assert c_text == py_text

    bad = [*args[:3], "a (cat:1.2.3)", *args[4:]]
    done = native.run(*bad, "--out", tmp_path / "bad_c.png")
    code = ldm_rt_main(["sample", *bad, "--out", str(tmp_path / "bad_py.png")])
    native_line = one_line_error(done.returncode, done.stderr, "ldm-rt-native")
    python_line = one_line_error(code, capsys.readouterr().err, "ldm-rt")
    assert native_line.removeprefix("ldm-rt-native") == python_line.removeprefix("ldm-rt")
    assert "prompt weight ':1.2.3)' is not a number" in native_line
    assert not (tmp_path / "bad_c.png").exists()


def test_sdxl_weights_both_encoders_as_ldm_rt_sample(native, small_sdxl_base, tmp_path):  # noqa: F811
    _, artifacts, _ = small_sdxl_base
    from sdxl_small_models import SIZE

    kw = dict(negative_prompt=test_prompt_weighting.NEGATIVE, steps=4, guidance=5.0, scheduler="euler", seed=4, height=SIZE, width=SIZE)
    prompt = test_prompt_weighting.PROMPT
    # A batch of two: each prompt's weights serve both of its rows.
    (first,), errors = native.serve(artifacts, [{**kw, "prompt": prompt, "prompt_weighting": True, "batch": 2}], tmp_path)
    assert not errors
    ours = np.stack([first, image(tmp_path / "request_0_1.png")])
    pipe = Pipeline.load(artifacts)
    expected = pipe.generate(prompt, prompt_weighting=True, batch=2, **kw).images
    assert psnr(ours, expected) >= NATIVE_DB
    other = pipe.generate(prompt.replace("1.5", "1.0"), prompt_weighting=True, batch=2, **kw).images
    print("SDXL, native vs red at 1.0:", round(psnr(ours, other), 1), "dB")
    assert psnr(ours, other) < NATIVE_DB - 10


@pytest.fixture(scope="module")
def chunked(tmp_path_factory, tiny_sd_v1) -> Path:
    from test_long_prompts import chunked_export

    return chunked_export(tmp_path_factory, tiny_sd_v1)  # its session's --prompt-chunks 3 build, shared


def test_break_and_long_weighted_prompts_match_ldm_rt_sample_on_a_chunked_build(native, chunked, tmp_path):  # noqa: F811
    from test_long_prompts import ARGS

    model = chunked
    words = " ".join(test_prompt_weighting.WORDS * 2)  # a chunk of 75 tokens and one of 17, then BREAK starts the third
    prompt = f"({words}:1.2) BREAK a (blue:1.4) house"
    kw = {**ARGS, "negative_prompt": test_prompt_weighting.NEGATIVE, "seed": 2}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    done = native.run("--model", model, "--prompt", prompt, *args, "--prompt-weighting", "--out", tmp_path / "c.png")
    assert done.returncode == 0, done.stderr
    pipe = Pipeline.load(model)
    ours = image(tmp_path / "c.png")
    assert psnr(ours, pipe.generate(prompt, prompt_weighting=True, **kw).images[0]) >= NATIVE_DB
    joined = pipe.generate(prompt.replace(" BREAK", ""), prompt_weighting=True, **kw).images[0]  # the words join chunk 2
    print("chunked build, native vs without BREAK:", round(psnr(ours, joined), 1), "dB")
    assert psnr(ours, joined) < NATIVE_DB - 10
