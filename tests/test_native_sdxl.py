"""cpp/native on SDXL and with --latents: a tiny SDXL base (tests/tiny_models.py) exported to ONNX, sampled by
the native runtime and by the Python runtime with the same arguments: both text encoders (each with its own
tokenizer and pad token, the penultimate sequences side by side, the second's projected pooled output as
text_embeds), the micro-conditioning as time_ids, force_zeros_for_empty_prompt, noise from a .npy file, the
same image files and text chunks, the same one-line errors. Images agree to rounding of two engines, both fp32
(PSNR >= 45 dB, as test_native_runtime.py); the native build is the session's one (tests/cmake_build.py).
Requests that load a model go through one native process (native_generate_many) and one Python Pipeline."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from cmake_build import RUNTIME_TARGETS, native_build
from test_runtime_fixtures import psnr, run_cli

from ldm_rt.runtime.artifacts import default_artifacts_dir
from ldm_rt.runtime.cli import main as ldm_rt_main
from ldm_rt.runtime.params import GenerationError
from ldm_rt.runtime.pipeline import Pipeline

pytest.importorskip("openvino")

NATIVE_DB = 45.0
WRONG_DB = 30.0
SIZE = 32  # the tiny VAE's factor is 2: latents of 16 x 16
PROMPT = "a red circle on the left"
MICRO = {"original_size": (64, 48), "crops_coords_top_left": (4, 8), "negative_target_size": (16, 24)}


class Native:
    def __init__(self, out: Path, cache: Path) -> None:
        self.exe, self.many = out / "ldm-rt-native", out / "native_generate_many"
        self.env = {**os.environ, "XDG_CACHE_HOME": str(cache)}

    def run(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.exe), *map(str, args)], capture_output=True, text=True, timeout=300, env=self.env)

    def serve(self, model: Path, requests: list[dict], folder: Path) -> tuple[list[np.ndarray | None], dict[int, str]]:
        """Every request through one loaded pipeline: (the first image of each, or None; errors by request)."""
        outs = [folder / f"request_{k}.png" for k in range(len(requests))]
        lines = folder / "requests.jsonl"
        lines.write_text("".join(json.dumps({**r, "out": str(o)}) + "\n" for r, o in zip(requests, outs)))
        done = subprocess.run([str(self.many), str(model), str(lines)], capture_output=True, text=True, timeout=600, env=self.env)
        errors = {}
        for line in done.stderr.splitlines():
            if not line.startswith("native_generate_many: error: request "):
                raise AssertionError(done.stderr)
            head, _, message = line.removeprefix("native_generate_many: error: request ").partition(": ")
            errors[int(head)] = message
        first = [o if o.exists() else o.with_name(o.stem + "_0.png") for o in outs]
        return [np.asarray(Image.open(p).convert("RGB")) if p.exists() else None for p in first], errors


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> Native:
    build = native_build(tmp_path_factory)
    assert build.wait(RUNTIME_TARGETS), f"the native build failed:\n{build.log[-4000:]}"
    return Native(build.out, tmp_path_factory.mktemp("native_cache"))


@pytest.fixture(scope="module")
def base(native, small_sdxl_base) -> Path:
    """The session's small SDXL base export (tests/sdxl_small_models.py: up to two images per call), exported while
    the native build runs unless another file did already."""
    return small_sdxl_base[1]


@pytest.fixture(scope="module")
def pipe(base) -> Pipeline:
    return Pipeline.load(base)


def test_sdxl_base_matches_the_python_runtime(native, base, pipe, tmp_path):
    """Empty negatives (zeros, not encoded) and a real one, with and without micro-conditioning, two images per
    prompt, three schedulers (one of them ancestral)."""
    cases = [("euler", "", {}), ("dpmpp-2m", "blurry", MICRO), ("euler-a", "", MICRO)]
    requests = [dict(prompt=PROMPT, negative_prompt=neg, steps=4, guidance=5.0, scheduler=s, seed=3, batch=2, **micro)
                for s, neg, micro in cases]  # fmt: skip
    got, errors = native.serve(base, requests, tmp_path)
    assert not errors, errors
    figures = {}
    for (scheduler, _, micro), request, image in zip(cases, requests, got):
        expected = pipe.generate(**request).images
        figures[scheduler] = psnr(image, expected[0])
        assert figures[scheduler] >= NATIVE_DB, figures
        second = np.asarray(Image.open(tmp_path / f"request_{requests.index(request)}_1.png").convert("RGB"))
        assert psnr(second, expected[1]) >= NATIVE_DB
    plain = pipe.generate(**{**requests[1], **{k: None for k in MICRO}}).images[0]
    assert psnr(plain, got[1]) < WRONG_DB  # the time ids matter: without them it is another image
    print("SDXL, PSNR native vs Python runtime:", {k: round(v, 1) for k, v in figures.items()})


def test_sdxl_cli_files_and_latents_as_ldm_rt_sample(native, base, tmp_path):
    """Same file and text chunks as `ldm-rt sample` (params with the micro-conditioning), noise from a float16
    .npy (the seed then draws nothing)."""
    noise = np.random.default_rng(11).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float16)
    np.save(tmp_path / "noise.npy", noise)
    micro = [str(v) for name, pair in MICRO.items() for v in ("--" + name.replace("_", "-"), *pair)]
    common = ["--model", base, "--prompt", PROMPT, "--steps", 3, "--scheduler", "ddim", "--latents", tmp_path / "noise.npy", *micro]
    assert ldm_rt_main(["sample", *map(str, common), "--seed", "1", "--out", str(tmp_path / "py.png")]) == 0
    for seed, name in ((1, "c.png"), (2, "c2.png")):
        done = native.run(*common, "--seed", seed, "--out", tmp_path / name)
        assert done.returncode == 0 and done.stdout.split() == [str(tmp_path / name)], done.stderr
    with Image.open(tmp_path / "py.png") as a, Image.open(tmp_path / "c.png") as b, Image.open(tmp_path / "c2.png") as c:
        assert psnr(np.asarray(b.convert("RGB")), np.asarray(a.convert("RGB"))) >= NATIVE_DB
        np.testing.assert_array_equal(np.asarray(b), np.asarray(c))  # the noise came from the file
        py_text, c_text = dict(a.text), dict(b.text)
    py_params, c_params = json.loads(py_text.pop("parameters")), json.loads(c_text.pop("parameters"))
    assert (py_params.pop("backend"), c_params.pop("backend")) == ("onnxruntime", "openvino")
    assert c_params == py_params and py_params["crops_coords_top_left"] == [4, 8]
    assert (c_text.pop("Software"), py_text.pop("Software")) == ("ldm-rt-native", "ldm-rt")
    assert c_text == py_text


def read_png(path: Path) -> tuple[np.ndarray, str]:
    """The image and its `parameters` text (compared as text: the JSON must be Python's to the byte)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), im.text["parameters"]


def python_sample(model: Path, out: Path, *args) -> tuple[np.ndarray, str]:
    code, _, err = run_cli(ldm_rt_main, ["sample", "--backend", "openvino", "--model", str(model), *map(str, args), "--out", str(out)])
    assert code == 0, err
    return read_png(out)


def native_sample(native: Native, model: Path, out: Path, *args) -> tuple[np.ndarray, str]:
    done = native.run("--model", model, *args, "--out", out)
    assert done.returncode == 0, done.stderr
    return read_png(out)


def cli_error(*args) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = ldm_rt_main(["sample", *map(str, args)])
        except SystemExit as e:  # argparse's usage errors exit from inside the parser
            code = e.code
    lines = err.getvalue().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ldm-rt: error: "), lines
    return lines[0].removeprefix("ldm-rt: error: ")


def cli_errors(native: Native, *args, backend: str | None = None) -> tuple[str, str]:
    """(Python's one-line message, native's) for the same refused arguments; `backend`: Python's --backend (native
    runs OpenVINO)."""
    done = native.run(*args)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("ldm-rt-native: error: "), done.stderr
    return cli_error(*(["--backend", backend] if backend else []), *args), lines[0].removeprefix("ldm-rt-native: error: ")


def test_sdxl_and_latents_bad_input_gets_the_messages_of_the_python_runtime(native, base, pipe, tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((1, 4, 8, 8), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((1, 4, 16, 16), np.int64))
    nan = np.zeros((1, 4, 16, 16), np.float32)
    nan[0, 1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.savez(tmp_path / "two.npz", a=nan)
    (tmp_path / "text.npy").write_text("not numpy")

    # Refused before any model is loaded: the command line and the --latents file's header.
    for args in (
        ["--original-size", 32],
        ["--target-size", 32, "x"],
        ["--latents", tmp_path / "two.npz"],
        ["--latents", tmp_path / "text.npy"],
        ["--latents", tmp_path / "missing.npy"],
    ):
        out = tmp_path / "never.png"
        expected = cli_error("--model", base, *args, "--out", out)
        done = native.run("--model", base, *args, "--out", out)
        assert (done.returncode, done.stderr.splitlines()) == (2, [f"ldm-rt-native: error: {expected}"]), args
        assert not out.exists()

    # Refused by the pipeline: one loaded model on each side.
    requests = [
        {"original_size": [0, 32]},
        {"crops_coords_top_left": [-1, 0]},
        {"aesthetic_score": 5.0},  # a base model reads no aesthetic score
        {"latents": str(tmp_path / "small.npy")},
        {"latents": str(tmp_path / "ints.npy")},
        {"latents": str(tmp_path / "nan.npy")},
    ]
    _, errors = native.serve(base, [{"prompt": PROMPT, **r} for r in requests], tmp_path)
    for k, r in enumerate(requests):
        kw = {name: np.load(v) if name == "latents" else v for name, v in r.items()}
        with pytest.raises(GenerationError) as e:
            pipe.generate(PROMPT, **kw)
        assert errors.get(k) == str(e.value), r
    _, errors = native.serve(default_artifacts_dir(), [{"original_size": [64, 64]}], tmp_path)
    with pytest.raises(GenerationError) as e:
        Pipeline.load(default_artifacts_dir()).generate("", original_size=(64, 64))
    assert errors == {0: str(e.value)}  # not an SDXL model
