"""cpp/native's ControlNet (`ldm-rt-native --control-image IMG ...`, Request::control_images; cpp/native/src/controlnet.cpp)
against `ldm-rt sample --backend openvino --control-image` on the tiny SD v1 model and two tiny ControlNets
(tests/tiny_models.py, exported together as tests/test_controlnet_export_runtime.py does): two ControlNets at
different scales with a guidance window each and a control image of another size (resized); guess mode with a
stochastic scheduler, a batch of two and inpainting at a partial strength (the windows count the run's steps); the
library's Request fields through one loaded pipeline. Both runtimes run the same engine in f32, so the images agree
to rounding (PSNR >= 45 dB; measured: 8-bit identical) and the parameters JSON is the same; another control image
(26 dB) or scale 0 (17 dB) falls far below the bar, so the comparison sees the ControlNets. Bad input gets
`ldm-rt sample`'s (or the Python API's) one line, exit 2, nothing written. SDXL was checked by hand (identical): its
ControlNet export costs more than this file's time budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from cmake_build import native_build
from test_native_sdxl import cli_error, native  # noqa: F401  (native: the session's built executable, a fixture)
from test_runtime_fixtures import psnr

from ldm_rt.runtime.cli import main as ldm_rt_main
from ldm_rt.runtime.artifacts import default_artifacts_dir
from ldm_rt.runtime.manifest import MANIFEST
from ldm_rt.runtime.params import GenerationError
from ldm_rt.runtime.pipeline import Pipeline

pytest.importorskip("openvino")
pytestmark = pytest.mark.usefixtures("torch_one_thread")  # the export's torch: one thread (tests/tiny_models.py)

SIZE = 32  # the tiny VAE's factor is 2: latents of 16 x 16
NATIVE_DB = 45.0
WRONG_DB = 30.0
COMMON = ["--prompt", "a red circle on the left", "--steps", 4, "--guidance", 5.0, "--scheduler", "ddim", "--seed", 3]


@pytest.fixture(scope="module")
def artifacts(tiny_sd_v1, tiny_controlnet_v1, tiny_controlnet_v1_b, tmp_path_factory) -> Path:
    """test_controlnet_export_runtime.py's session export with both ControlNets (the native build runs meanwhile)."""
    from test_controlnet_export_runtime import SIZE as EXPORT_SIZE
    from test_controlnet_export_runtime import two_controlnet_export

    native_build(tmp_path_factory)
    assert EXPORT_SIZE == SIZE
    return two_controlnet_export(tmp_path_factory, tiny_sd_v1, tiny_controlnet_v1, tiny_controlnet_v1_b)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Control images (two at the output size, one of another size), an init image and a half mask."""
    folder = tmp_path_factory.mktemp("native_controlnet_images")
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
        "b": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
        "odd": rng.integers(0, 256, (24, 40, 3), dtype=np.uint8),
        "init": np.full((SIZE, SIZE, 3), (200, 120, 40), np.uint8),
        "mask": np.where(np.arange(SIZE) < SIZE // 2, 0, 255).astype(np.uint8)[None, :].repeat(SIZE, 0),
    }
    paths = {}
    for name, array in arrays.items():
        paths[name] = folder / f"{name}.png"
        Image.fromarray(array).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def pipe(artifacts) -> Pipeline:
    """The Python runtime on ONNX Runtime (it loads faster than OpenVINO; the same request draws the same image to
    rounding and fails with the same message)."""
    return Pipeline.load(artifacts)


def read_png(path: Path) -> tuple[np.ndarray, dict]:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), json.loads(im.text["parameters"])


def python_sample(tmp_path: Path, name: str, *args) -> Path:
    out = tmp_path / f"py_{name}.png"
    assert ldm_rt_main(["sample", "--backend", "openvino", *map(str, args), "--out", str(out)]) == 0
    return out


def both(native, tmp_path: Path, name: str, *args, batch: int = 1) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """(native image, ldm-rt sample's image, the shared parameters) of each image of the same run; the parameters
    JSON of both runtimes is asserted equal."""
    ours, theirs = tmp_path / f"native_{name}.png", python_sample(tmp_path, name, *args)
    done = native.run(*args, "--out", ours)
    assert done.returncode == 0, done.stderr
    def nth(path: Path, k: int) -> Path:  # a batch's NAME_k.png
        return path if batch == 1 else path.with_stem(f"{path.stem}_{k}")

    pairs = [(nth(ours, k), nth(theirs, k)) for k in range(batch)]
    out = []
    for mine, python in pairs:
        (got, got_params), (want, want_params) = read_png(mine), read_png(python)
        assert got_params == want_params
        out.append((got, want, got_params))
    return out


def test_two_controlnets_windows_and_a_resized_control_image_match_and_the_control_moves_the_image(artifacts, native, pipe, images, tmp_path):
    args = ["--model", artifacts, *COMMON, "--control-image", images["odd"], "--controlnet-scale", 1.0, "--control-image", images["b"],
            "--controlnet-scale", 0.6, "--control-guidance-start", 0.25, 0.0, "--control-guidance-end", 0.75, 1.0]  # fmt: skip
    [(got, want, params)] = both(native, tmp_path, "two", *args)
    assert psnr(got, want) >= NATIVE_DB
    nets = params["controlnets"]
    assert [(n["conditioning_scale"], n["control_guidance_start"], n["control_guidance_end"]) for n in nets] == [(1.0, 0.25, 0.75), (0.6, 0.0, 1.0)]
    assert nets[0]["control_image_size"] == [24, 40] and params["guess_mode"] is False
    assert all(len(n["control_image_sha256"]) == 64 and len(n["controlnet_sha256"]) == 64 for n in nets)
    # The bar tells the ControlNets' input apart: another control image, or both at scale 0.
    request = dict(prompt=COMMON[1], steps=COMMON[3], guidance=COMMON[5], scheduler=COMMON[7], seed=COMMON[9],
                   control_guidance_start=[0.25, 0.0], control_guidance_end=[0.75, 1.0])  # fmt: skip
    same = pipe.generate(**request, control_image=[images["odd"], images["b"]], controlnet_conditioning_scale=[1.0, 0.6]).images[0]
    assert psnr(got, same) >= NATIVE_DB
    for name, control, scales in (("another image", [images["odd"], images["a"]], [1.0, 0.6]), ("scale 0", [images["odd"], images["b"]], 0.0)):
        other = pipe.generate(**request, control_image=control, controlnet_conditioning_scale=scales).images[0]
        assert psnr(got, other) < WRONG_DB, f"{name}: the comparison cannot see the ControlNets"


def test_guess_mode_with_a_batch_and_inpainting_match(artifacts, native, images, tmp_path):
    args = ["--model", artifacts, *COMMON, "--scheduler", "euler-a", "--control-image", images["a"], "--control-image", images["b"],
            "--controlnet-scale", -1.5, "--controlnet-scale", 2.0, "--guess-mode", "--batch", 2, "--init-image", images["init"],
            "--mask", images["mask"], "--strength", 0.9]  # fmt: skip
    runs = both(native, tmp_path, "guess", *args, batch=2)
    for got, want, params in runs:
        assert psnr(got, want) >= NATIVE_DB
        assert params["guess_mode"] is True and params["mode"] == "inpaint"
    assert not np.array_equal(runs[0][0], runs[1][0])


def test_the_library_takes_the_request_fields_and_refuses_bad_ones_as_the_python_api(artifacts, native, pipe, images, tmp_path):
    """Request::control_images etc. through one loaded pipeline (native_generate_many): a guess-mode request draws the
    Python API's image; bad requests get its messages."""
    common = dict(prompt=COMMON[1], steps=COMMON[3], guidance=COMMON[5], scheduler=COMMON[7], seed=COMMON[9])
    two = [str(images["a"]), str(images["b"])]
    requests = [
        dict(control_images=two, controlnet_conditioning_scale=[0.5, 1.5], guess_mode=True, control_guidance_end=0.5),
        {},  # no control image
        dict(control_images=two[:1]),  # one for two ControlNets
        dict(control_images=two, controlnet_conditioning_scale=[1.0, 200.0]),
        dict(control_images=two, control_guidance_start=0.5, control_guidance_end=0.5),
        dict(control_images=two, control_guidance_end=[0.5, 0.6, 0.7]),
    ]
    got, errors = native.serve(artifacts, [{**common, **r} for r in requests], tmp_path)
    for k, r in enumerate(requests):
        kwargs = {("control_image" if key == "control_images" else key): value for key, value in r.items()}
        if k == 0:
            assert psnr(got[0], pipe.generate(**common, **kwargs).images[0]) >= NATIVE_DB
            continue
        with pytest.raises(GenerationError) as python:
            pipe.generate(**common, **kwargs)
        assert errors.get(k) == str(python.value) and got[k] is None, r
    assert set(errors) == set(range(1, len(requests)))


def test_the_cli_refuses_bad_input_with_the_messages_of_ldm_rt_sample(artifacts, native, images, tmp_path):
    plain = default_artifacts_dir()  # a folder without ControlNets, when this checkout has it
    model, two = ["--model", artifacts], ["--control-image", images["a"], "--control-image", images["b"]]
    cases = [
        [*model, *two, "--controlnet-scale", 1.0],  # a scale count that is not one per image
        [*model, *two, "--control-guidance-start", 0.5, "--control-guidance-end", 0.5],  # the flags reach the request
        [*model, "--control-image", images["a"], "--control-image", tmp_path / "missing.png"],
        [*model, *two, "--control-guidance-start"],
        [*model, *two, "--refiner", artifacts],  # ControlNets with a refiner
    ]
    if (plain / MANIFEST).is_file():
        cases.append(["--model", plain, "--control-image", images["a"]])
    for args in cases:
        out = tmp_path / "never.png"
        expected = cli_error(*args, *COMMON, "--out", out)  # ONNX Runtime: the same messages, a faster load
        done = native.run(*args, *COMMON, "--out", out)
        assert (done.returncode, done.stderr.splitlines()) == (2, [f"ldm-rt-native: error: {expected}"]), args
        assert not out.exists()
