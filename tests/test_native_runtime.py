"""cpp/native: the native runtime (no Python at run time), built with CMake and checked against `ldm-rt sample`.

The build (cmake + g++, OpenVINO from this environment's wheel) runs once per session in a background thread
while the Python side prepares its artifacts. Images are compared with the Python runtime's (ONNX Runtime) for
the same arguments: two engines, both fp32, so equal to rounding (PSNR >= 45 dB), and a different seed must
fall far below that bar, so the comparison can tell right from wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from cmake_build import CPP, CMakeBuild, start_build
from test_runtime_fixtures import exported, psnr

from ldm_rt.runtime.artifacts import default_artifacts_dir
from ldm_rt.runtime.cli import main as ldm_rt_main
from ldm_rt.runtime.manifest import MANIFEST
from ldm_rt.runtime.pipeline import Pipeline
from ldm_rt.runtime.schedulers import usable_schedulers

NATIVE_DB = 45.0  # both engines fp32 (issue 20)
WRONG_DB = 30.0  # what another seed gives at most: the comparison must separate the two
STEPS = 6
PROMPT = "a large red circle on the left on a white background"
NEGATIVE = "a small blue square"


@pytest.fixture(scope="session")
def native_build(tmp_path_factory) -> CMakeBuild:
    pytest.importorskip("openvino")
    # LDM_RT_NATIVE_BUILD_DIR: build there (incrementally, kept between sessions) instead of a fresh temp folder.
    folder = os.environ.get("LDM_RT_NATIVE_BUILD_DIR")
    return start_build(
        Path(folder) if folder else tmp_path_factory.mktemp("native_build"), "the native runtime",
        ["-DLDM_RT_EMBEDDING=OFF", "-DCMAKE_BUILD_TYPE=Release"], ["ldm-rt-native", "native_generate_many"],
    )


class Native:
    """The built executables, run with a private compile cache (XDG_CACHE_HOME) so repeated runs load fast."""

    def __init__(self, build: Path, cache: Path) -> None:
        self.exe = build / "ldm-rt-native"
        self.many = build / "native_generate_many"
        self.env = {**os.environ, "XDG_CACHE_HOME": str(cache)}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.exe), *map(str, args)], capture_output=True, text=True, timeout=300, env=self.env)

    def image(self, out: Path, *args: str) -> np.ndarray:
        done = self.run(*args, "--out", out)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [str(out)]
        return np.asarray(Image.open(out).convert("RGB"))

    def images(self, model: Path, requests: list[dict], folder: Path) -> list[np.ndarray]:
        """Every request through the library API: one process loads the model once and serves them all, each
        request on its own thread (cpp/native/examples/generate_many.cpp)."""
        outs = [folder / f"request_{k}.png" for k in range(len(requests))]
        lines = folder / "requests.jsonl"
        lines.write_text("".join(json.dumps({**r, "out": str(o)}) + "\n" for r, o in zip(requests, outs)))
        done = subprocess.run([str(self.many), str(model), str(lines)], capture_output=True, text=True, timeout=600, env=self.env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == list(map(str, outs))
        return [np.asarray(Image.open(o).convert("RGB")) for o in outs]


@pytest.fixture(scope="session")
def native(native_build, tmp_path_factory) -> Native:
    native_build.join(timeout=900)
    assert native_build.ok, f"the native build failed:\n{native_build.log[-4000:]}"
    return Native(native_build.out, tmp_path_factory.mktemp("native_cache"))


@pytest.fixture(scope="module")
def default_model(native_build) -> Path:
    root = default_artifacts_dir()
    if not (root / MANIFEST).is_file():
        pytest.skip("the shipped default model's artifacts are not in this checkout")
    return root


@pytest.fixture(scope="module")
def sd_model(native_build, tmp_path_factory, tiny_sd_v1) -> Path:
    """A small random SD v1-shaped model (CLIP BPE tokenizer, SD's scheduler config), exported to ONNX."""
    return exported(tmp_path_factory, tiny_sd_v1, fp16=False)


def sizes(model: Path) -> list[str]:
    return [] if model == default_artifacts_dir() else ["--height", "16", "--width", "16"]


def schedulers_of(pipe: Pipeline) -> dict[str, int]:
    """Every scheduler the model can use -> the steps to run it with (at least what it needs to be sound)."""
    usable, _ = usable_schedulers(pipe.scheduler_config)
    return {name: max(STEPS, s.fewest_sound_steps) for name, s in usable.items()}


def python_image(pipe: Pipeline, model: Path, **kw) -> np.ndarray:
    h = w = None if model == default_artifacts_dir() else 16
    return pipe.generate(prompt=PROMPT, negative_prompt=NEGATIVE, height=h, width=w, **kw).images[0]


def check_every_scheduler(native: Native, model: Path, tmp_path: Path) -> dict[str, float]:
    pipe = Pipeline.load(model)
    h = w = None if model == default_artifacts_dir() else 16
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=5, guidance=5.0, **({} if h is None else {"height": h, "width": w}))
    runs = schedulers_of(pipe)
    requests = [{**common, "scheduler": name, "steps": steps} for name, steps in runs.items()]
    images = native.images(model, requests, tmp_path)
    figures = {}
    for request, got in zip(requests, images):
        r = {k: v for k, v in request.items() if k not in ("prompt", "negative_prompt")}
        expected = pipe.generate(PROMPT, NEGATIVE, **r).images[0]
        figures[request["scheduler"]] = float(psnr(got, expected))
        if request["scheduler"] == "ddim":  # the bar separates: another seed's image is far below it
            other = pipe.generate(PROMPT, NEGATIVE, **{**r, "seed": 6}).images[0]
            assert psnr(got, other) < WRONG_DB, "another seed gives nearly the same image: the comparison proves nothing"
    low = {name: round(db, 1) for name, db in figures.items() if db < NATIVE_DB}
    assert not low, f"native vs ldm-rt sample below {NATIVE_DB} dB: {low} (all: {figures})"
    return figures


def test_the_executable_links_no_python(native):
    ldd = subprocess.run(["ldd", str(native.exe)], capture_output=True, text=True, check=True).stdout
    assert "libpython" not in ldd
    assert "libopenvino" in ldd
    done = native.run("--help")
    assert done.returncode == 0 and "--bf16" in done.stdout and "Off by default" in done.stdout


def test_default_model_every_scheduler_matches_ldm_rt_sample(native, default_model, tmp_path):
    figures = check_every_scheduler(native, default_model, tmp_path)
    print("default model, PSNR native vs ldm-rt sample:", {k: round(v, 1) for k, v in figures.items()})


def test_sd_shaped_model_every_scheduler_matches_ldm_rt_sample(native, sd_model, tmp_path):
    figures = check_every_scheduler(native, sd_model, tmp_path)
    print("SD-shaped model, PSNR native vs ldm-rt sample:", {k: round(v, 1) for k, v in figures.items()})


def test_the_cli_writes_the_text_chunks_of_ldm_rt_sample(native, default_model, tmp_path):
    args = ["--prompt", "a large green circle é ☃", "--negative-prompt", "blurry", "--steps", "4", "--seed", "9",
            "--guidance", "6.5", "--guidance-rescale", "0.5", "--batch", "2", "--scheduler", "euler-a"]  # fmt: skip
    assert ldm_rt_main(["sample", "--model", str(default_model), *args, "--out", str(tmp_path / "py.png")]) == 0
    done = native.run("--model", default_model, *args, "--out", tmp_path / "c.png")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "c_0.png"), str(tmp_path / "c_1.png")]
    for k in range(2):
        with Image.open(tmp_path / f"py_{k}.png") as a, Image.open(tmp_path / f"c_{k}.png") as b:
            py_text, c_text = dict(a.text), dict(b.text)
            assert psnr(np.asarray(b.convert("RGB")), np.asarray(a.convert("RGB"))) >= NATIVE_DB
        assert c_text.pop("Software") == "ldm-rt-native" and py_text.pop("Software") == "ldm-rt"
        py_params, c_params = json.loads(py_text.pop("parameters")), json.loads(c_text.pop("parameters"))
        assert (py_params.pop("backend"), c_params.pop("backend")) == ("onnxruntime", "openvino")
        assert c_params == py_params
        assert c_text == py_text  # prompt, seed, guidance ... as the same strings


def write_init_and_mask(pipe: Pipeline, model: Path, tmp_path: Path, size: tuple[int, int]) -> tuple[Path, Path]:
    """An init image of another size than the output (so both resize it, with Pillow's Lanczos) and a mask
    that repaints the middle band."""
    image = python_image(pipe, model, steps=STEPS, seed=1)
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(image).resize(size, Image.BICUBIC).save(init)
    m = np.zeros((size[1], size[0]), np.uint8)
    m[size[1] // 4 : 3 * size[1] // 4] = 255
    Image.fromarray(m).save(mask)
    return init, mask


@pytest.mark.parametrize("which", ["default", "sd"])
def test_img2img_and_inpainting_match_ldm_rt_sample(native, which, request, tmp_path):
    model = request.getfixturevalue("default_model" if which == "default" else "sd_model")
    pipe = Pipeline.load(model)
    out_h, out_w = (64, 64) if which == "default" else (16, 16)
    init, mask = write_init_and_mask(pipe, model, tmp_path, (out_w + 13, out_h + 5))
    common = dict(prompt="a large green square at the top", steps=8, seed=3, height=out_h, width=out_w)
    cli = ["--model", model, "--prompt", common["prompt"], "--steps", 8, "--seed", 3, "--height", out_h, "--width", out_w]

    expected = pipe.generate(**common, scheduler="dpmpp-2m", init_image=init, strength=0.6).images[0]
    img2img = native.image(tmp_path / "i2i.png", *cli, "--scheduler", "dpmpp-2m", "--init-image", init, "--strength", 0.6)
    assert psnr(img2img, expected) >= NATIVE_DB, "img2img"

    expected = pipe.generate(**common, scheduler="euler-a", init_image=init, mask=mask).images[0]
    got = native.image(tmp_path / "inpaint.png", *cli, "--scheduler", "euler-a", "--init-image", init, "--mask", mask)
    assert psnr(got, expected) >= NATIVE_DB, "inpainting"
    assert psnr(got, img2img) < 40  # inpainting is not img2img
    # The kept pixels are the init image resized to the output: equal only if the resize is Pillow's to the bit.
    keep = np.asarray(Image.open(mask).resize((out_w, out_h), Image.LANCZOS)) < 128
    resized = np.asarray(Image.open(init).convert("RGB").resize((out_w, out_h), Image.LANCZOS))
    np.testing.assert_array_equal(got[keep], resized[keep])

    # A soft seam (Pillow's GaussianBlur of the mask): the same composite, and not the hard-edged one.
    expected = pipe.generate(**common, scheduler="euler-a", init_image=init, mask=mask, mask_blur=2.5).images[0]
    soft = native.image(tmp_path / "soft.png", *cli, "--scheduler", "euler-a", "--init-image", init, "--mask", mask, "--mask-blur", 2.5)
    assert psnr(soft, expected) >= NATIVE_DB, "inpainting with --mask-blur"
    assert not np.array_equal(soft, got)


def python_error(capsys, *args: str) -> str:
    try:
        code = ldm_rt_main(["sample", *args])
    except SystemExit as e:  # argparse's usage errors exit from inside the parser
        code = e.code
    assert code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm-rt: error: "), lines
    return lines[0].removeprefix("ldm-rt: error: ")


def test_bad_input_gets_the_messages_of_ldm_rt_sample(native, default_model, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(default_model, broken)
    with open(broken / "scheduler_config.json", "a") as f:
        f.write(" ")
    (tmp_path / "folder.png").mkdir()
    init = tmp_path / "init.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(init)
    model = ["--model", str(default_model)]
    cases = [
        [*model, "--steps", "0", "--seed", "1"],
        [*model, "--steps", "x"],
        [*model, "--height", "60"],
        [*model, "--batch", "5"],
        [*model, "--scheduler", "nope"],
        [*model, "--scheduler", "pndm"],  # the default model's zero-terminal-SNR schedule refuses it
        [*model, "--guidance-rescale", "2"],
        [*model, "--mask", str(init)],
        [*model, "--init-image", str(init), "--strength", "0"],
        [*model, "--init-image", str(tmp_path / "missing.png")],
        [*model, "--threads", "0"],
        [*model, "--prompt", os.fsdecode(b"a \xff cat")],  # bytes that are not UTF-8
        [*model, "--unknown-flag"],
        ["--model", str(tmp_path / "no_such_model")],
        ["--model", str(broken)],
        [*model, "--out", str(tmp_path / "folder.png")],
        [*model, "--out", str(tmp_path / "no_such_folder" / "x.png")],
    ]
    for args in cases:
        out = tmp_path / "never.png"
        with_out = args if "--out" in args else [*args, "--out", str(out)]
        expected = python_error(capsys, *with_out)
        done = native.run(*with_out)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.splitlines() == [f"ldm-rt-native: error: {expected}"], args
        assert not out.exists()
    done = native.run(*model, "--out", tmp_path / "x.jpg")  # PNG only: said so, nothing written
    assert done.returncode == 2 and "end the name with .png" in done.stderr and not (tmp_path / "x.jpg").exists()


def test_one_loaded_pipeline_serves_many_threads(native, default_model, tmp_path):
    seeds = [11, 12, 13, 11]
    requests = [{"prompt": PROMPT, "steps": STEPS, "seed": seed, "scheduler": "euler-a"} for seed in seeds]
    images = native.images(default_model, requests, tmp_path)
    pipe = Pipeline.load(default_model)
    for seed, got in zip(seeds, images):
        expected = pipe.generate(PROMPT, steps=STEPS, seed=seed, scheduler="euler-a").images[0]
        assert psnr(got, expected) >= NATIVE_DB, f"seed {seed}"
    np.testing.assert_array_equal(images[0], images[3])  # concurrency changes no image
    assert psnr(images[0], images[1]) < WRONG_DB  # the seeds really differ


def test_a_service_finds_the_package_links_one_library_and_draws_the_same_image(native, native_build, default_model, tmp_path):
    """cpp/native/examples/service: a separate CMake project, find_package(ldm_rt_native) from the build folder."""
    build = tmp_path / "service"
    for cmd in (
        ["cmake", "-S", str(CPP / "native" / "examples" / "service"), "-B", str(build), f"-Dldm_rt_native_DIR={native_build.out}"],
        ["cmake", "--build", str(build), "--parallel", "2"],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "libpython" not in subprocess.run(["ldd", str(build / "service")], capture_output=True, text=True).stdout
    out = tmp_path / "circle.png"
    done = subprocess.run([str(build / "service"), str(default_model), PROMPT, "7", str(out)], capture_output=True, text=True, env=native.env)
    assert done.returncode == 0, done.stderr
    expected = Pipeline.load(default_model).generate(PROMPT, steps=10, seed=7).images[0]
    assert psnr(np.asarray(Image.open(out).convert("RGB")), expected) >= NATIVE_DB
    done = subprocess.run([str(build / "service"), str(tmp_path / "nowhere"), PROMPT, "7", str(out)], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, f"service: error: {tmp_path / 'nowhere'} is not a folder; pass --model DIR with a built artifacts folder\n")


def test_png_kinds_are_read_as_pillow_reads_them(native, default_model, tmp_path):
    """An RGBA init image (alpha dropped, not composited), a palette one, and a 16-bit grey mask (scaled by 65535)."""
    pipe = Pipeline.load(default_model)
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., :3]).convert("P", palette=Image.ADAPTIVE, colors=16).save(tmp_path / "palette.png")
    mask16 = np.zeros((64, 64), np.uint16)
    mask16[16:48, 8:40] = 40000  # 0.61: repaint
    mask16[20:30, 50:60] = 30000  # 0.46: keep
    Image.fromarray(mask16).save(tmp_path / "mask16.png")
    cli = ["--model", default_model, "--prompt", PROMPT, "--steps", 6, "--seed", 2]
    for init in ("rgba.png", "palette.png"):
        expected = pipe.generate(PROMPT, steps=6, seed=2, init_image=tmp_path / init, mask=tmp_path / "mask16.png").images[0]
        got = native.image(tmp_path / "out.png", *cli, "--init-image", tmp_path / init, "--mask", tmp_path / "mask16.png")
        assert psnr(got, expected) >= NATIVE_DB, init
        keep = mask16 < 32768
        np.testing.assert_array_equal(got[keep], np.asarray(Image.open(tmp_path / init).convert("RGB"))[keep])
