"""cpp/native's SDXL base -> refiner hand-off (`ldm-rt-native --refiner DIR --refiner-start F`) against
`ldm-rt sample --refiner` on the small SDXL base and refiner (tests/sdxl_small_models.py): the base runs the
schedule up to the cutoff and hands its latents over undecoded, the refiner continues with no noise added and
one generator for both (docs/sampler_spec.md, "Base + refiner"). Images agree to rounding of two engines, both
fp32 (PSNR >= 45 dB); the oracle tells a wrong split or a base-only image apart (< 30 dB). Also: the same text
chunks and the same one-line refusals (ControlNet with --refiner: tests/test_native_controlnet.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sdxl_small_models import SIZE
from test_native_sdxl import cli_error, native  # noqa: F401  (native: the module's built executable, a fixture)
from test_runtime_fixtures import psnr

from ldm_rt.runtime.artifacts import default_artifacts_dir
from ldm_rt.runtime.cli import main as ldm_rt_main

pytest.importorskip("openvino")

NATIVE_DB = 45.0
WRONG_DB = 30.0
PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def base(small_sdxl_base) -> Path:
    return small_sdxl_base[1]


@pytest.fixture(scope="module")
def refiner(small_sdxl_refiner) -> Path:
    return small_sdxl_refiner[1]


def read_png(path: Path) -> tuple[np.ndarray, dict]:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), dict(im.text)


def python_sample(*args) -> None:
    assert ldm_rt_main(["sample", "--backend", "openvino", *map(str, args)]) == 0


@pytest.mark.parametrize(
    ("scheduler", "start", "steps"),
    [("euler", 0.8, 8), ("dpmpp-2m", 0.6, 8), ("euler-a", 0.7, 8), ("heun", 0.5, 5)],
)  # multistep history restarted, the refiner's draws from the shared generator, a second-order split
def test_refiner_hand_off_matches_ldm_rt_sample(native, base, refiner, tmp_path, scheduler, start, steps):
    common = ["--model", base, "--refiner", refiner, "--refiner-start", start, "--prompt", PROMPT, "--negative-prompt", "blurry",
              "--steps", steps, "--scheduler", scheduler, "--seed", 5, "--guidance", 5.0, "--aesthetic-score", 7.0,
              "--original-size", 48, 64, "--target-size", SIZE, SIZE]  # fmt: skip
    python_sample(*common, "--out", tmp_path / "py.png")
    done = native.run(*common, "--out", tmp_path / "c.png")
    assert done.returncode == 0 and done.stdout.split() == [str(tmp_path / "c.png")], done.stderr
    (py, py_text), (c, c_text) = read_png(tmp_path / "py.png"), read_png(tmp_path / "c.png")
    figure = psnr(c, py)
    print(f"{scheduler} refiner_start {start}: {figure:.1f} dB")
    assert figure >= NATIVE_DB, figure

    # The oracle tells a wrong hand-off apart: another split, and the base alone.
    python_sample(*[a if a != start else 0.3 for a in common], "--out", tmp_path / "split.png")
    python_sample(*[a for a in common if a not in ("--refiner", refiner, "--refiner-start", start, "--aesthetic-score", 7.0)],
                  "--out", tmp_path / "alone.png")  # fmt: skip
    for wrong in ("split.png", "alone.png"):
        assert psnr(c, read_png(tmp_path / wrong)[0]) < WRONG_DB, wrong

    py_params, c_params = json.loads(py_text.pop("parameters")), json.loads(c_text.pop("parameters"))
    assert c_params == py_params
    assert (c_params["mode"], c_params["refiner_start"], c_params["base_original_size"]) == ("txt2img+refiner", start, [48, 64])
    assert (c_text.pop("Software"), py_text.pop("Software")) == ("ldm-rt-native", "ldm-rt")
    assert c_text == py_text


def test_refiner_bad_input_gets_the_messages_of_ldm_rt_sample(native, base, refiner, tmp_path):
    Image.new("RGB", (SIZE, SIZE), "white").save(tmp_path / "init.png")
    Image.new("L", (SIZE, SIZE), 255).save(tmp_path / "mask.png")
    cases = [
        ["--model", base, "--refiner-start", 0.5],
        ["--model", base, "--refiner", refiner, "--init-image", tmp_path / "init.png", "--mask", tmp_path / "mask.png"],
        ["--model", base, "--refiner", refiner, "--refiner-start", 1.5],
        ["--model", base, "--refiner", refiner, "--refiner-start", 0.0],
        ["--model", base, "--refiner", refiner, "--refiner-start", "x"],
        ["--model", refiner, "--refiner", refiner],  # the refiner passed as the base
        ["--model", base, "--refiner", default_artifacts_dir()],  # not an SDXL model
        ["--model", base, "--refiner", refiner, "--steps", 1, "--refiner-start", 0.1, "--scheduler", "euler"],  # no refiner step left
    ]
    for args in cases:
        out = tmp_path / "never.png"
        expected = cli_error("--backend", "openvino", *args, "--prompt", PROMPT, "--out", out)
        done = native.run(*args, "--prompt", PROMPT, "--out", out)
        assert (done.returncode, done.stderr.splitlines()) == (2, [f"ldm-rt-native: error: {expected}"]), args
        assert not out.exists()


def test_without_scheduler_each_samples_with_the_models_own(native, base, refiner, tmp_path):
    """No --scheduler: the folder's own (manifest default_scheduler: euler for the SDXL base; a hand-off uses the
    base's for both), as ldm-rt sample; a manifest naming an unknown one gets its message."""
    for name, extra in (("alone", []), ("handoff", ["--refiner", refiner])):
        common = ["--model", base, *extra, "--prompt", PROMPT, "--steps", 6, "--seed", 3]
        python_sample(*common, "--out", tmp_path / f"py_{name}.png")
        done = native.run(*common, "--out", tmp_path / f"c_{name}.png")
        assert done.returncode == 0, done.stderr
        (py, py_text), (c, c_text) = read_png(tmp_path / f"py_{name}.png"), read_png(tmp_path / f"c_{name}.png")
        assert psnr(c, py) >= NATIVE_DB and c_text["scheduler"] == py_text["scheduler"] == "euler", name

    folder = tmp_path / "named"
    shutil.copytree(default_artifacts_dir(), folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["default_scheduler"] = "nope"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    expected = cli_error("--backend", "openvino", "--model", folder, "--prompt", "x", "--out", tmp_path / "never.png")
    done = native.run("--model", folder, "--prompt", "x", "--out", tmp_path / "never.png")
    assert (done.returncode, done.stderr.splitlines()) == (2, [f"ldm-rt-native: error: {expected}"])
