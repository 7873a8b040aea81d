"""cpp/native: the native runtime (no Python at run time), built with CMake and checked against `ldm-rt sample`.

The build (cmake + g++, OpenVINO from this environment's wheel) runs once per session in a background thread
while the Python side prepares its artifacts. Images are compared with the Python runtime's (ONNX Runtime) for
the same arguments: two engines, both fp32, so equal to rounding (PSNR >= 45 dB), and a different seed must
fall far below that bar, so the comparison can tell right from wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from cmake_build import CPP, RUNTIME_TARGETS, CMakeBuild
from cmake_build import native_build as shared_native_build
from test_export_bf16 import UNAVAILABLE as BF16_UNAVAILABLE
from test_export_bf16 import failed_copy
from test_runtime_fixtures import exported, psnr

from ldm_rt.runtime.artifacts import default_artifacts_dir
from ldm_rt.runtime.cli import main as ldm_rt_main
from ldm_rt.runtime.manifest import MANIFEST, Manifest, sha256_file
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
    return shared_native_build(tmp_path_factory)  # the build test_native_numerics.py uses too


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
    assert native_build.wait(RUNTIME_TARGETS), f"the native build failed:\n{native_build.log[-4000:]}"
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
    (tmp_path / "notes.png").write_text("a file of the user's")  # never replaced by --out: neither is init.png
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
        [*model, "--out", str(tmp_path / "notes.png")],
        [*model, "--out", str(init)],
    ]
    for args in cases:
        out = tmp_path / "never.png"
        with_out = args if "--out" in args else [*args, "--out", str(out)]
        expected = python_error(capsys, *with_out)
        done = native.run(*with_out)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.splitlines() == [f"ldm-rt-native: error: {expected}"], args
        assert not out.exists()
    assert (tmp_path / "notes.png").read_text() == "a file of the user's"
    # An image either runtime wrote is replaced (PNG by its text chunk; JPEG by its EXIF UserComment).
    python_png, python_jpg = tmp_path / "python.png", tmp_path / "python.jpg"
    for out in (python_png, python_jpg):
        assert ldm_rt_main(["sample", *model, "--steps", "2", "--out", str(out)]) == 0
    for seed, out in enumerate((python_png, python_jpg, python_png)):  # the last: native's own image
        before = out.read_bytes()
        done = native.run(*model, "--steps", "2", "--seed", str(9 + seed), "--out", out)
        if out.suffix == ".jpg" and "built without libjpeg" in done.stderr:
            continue  # this build writes no JPEG (said before any ownership check)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() != before
    done = native.run(*model, "--out", tmp_path / "x.webp")  # no libwebp here: said so, nothing written
    assert done.returncode == 2 and "built without libwebp" in done.stderr and not (tmp_path / "x.webp").exists()


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
    """cpp/native/examples/service: a separate CMake project, find_package(ldm_rt_native) from an install prefix
    (cmake --install), built and run; from the build folder itself, configured."""
    prefix, build = tmp_path / "prefix", tmp_path / "service"
    service = CPP / "native" / "examples" / "service"
    for cmd in (
        ["cmake", "--install", str(native_build.out), "--prefix", str(prefix)],
        ["cmake", "-S", str(service), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"],
        ["cmake", "--build", str(build), "--parallel", "2"],
        ["cmake", "-S", str(service), "-B", str(tmp_path / "from_build"), f"-Dldm_rt_native_DIR={native_build.out}"],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (prefix / "lib" / "cmake" / "ldm_rt_native" / "ldm_rt_nativeConfigVersion.cmake").is_file()
    assert (prefix / "include" / "ldm_rt" / "native" / "pipeline.hpp").is_file() and (prefix / "bin" / "ldm-rt-native").is_file()
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


def test_jpeg_in_and_out_as_ldm_rt_sample(native, default_model, tmp_path):
    """JPEG output as Pillow writes it (quality 95: the same decoded pixels; parameters in the EXIF UserComment),
    and JPEG init image and mask read as Pillow reads them (grey and colour)."""
    args = ["--model", default_model, "--prompt", PROMPT, "--steps", 6, "--seed", 4, "--scheduler", "euler"]
    done = native.run(*args, "--out", tmp_path / "c.jpg")
    if "built without libjpeg" in done.stderr:
        pytest.skip("ldm-rt-native was built without libjpeg (libjpeg-dev)")
    assert done.returncode == 0, done.stderr
    assert ldm_rt_main(["sample", *map(str, args), "--out", str(tmp_path / "py.jpg")]) == 0
    with Image.open(tmp_path / "c.jpg") as c, Image.open(tmp_path / "py.jpg") as py:
        np.testing.assert_array_equal(np.asarray(c), np.asarray(py))
        texts = [json.loads(im.getexif().get_ifd(0x8769)[0x9286][8:].decode("utf-16-be")) for im in (c, py)]
    params = [json.loads(t.pop("parameters")) for t in texts]
    assert (params[0].pop("backend"), params[1].pop("backend")) == ("openvino", "onnxruntime") and params[0] == params[1]
    assert (texts[0].pop("Software"), texts[1].pop("Software")) == ("ldm-rt-native", "ldm-rt") and texts[0] == texts[1]

    pipe = Pipeline.load(default_model)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "init.jpg", quality=90)
    mask = np.zeros((64, 80), np.uint8)
    mask[16:48, 10:50] = 255
    Image.fromarray(mask).save(tmp_path / "grey_mask.jpg")
    Image.fromarray(np.repeat(mask[..., None], 3, axis=2)).save(tmp_path / "colour_mask.jpg")
    for name in ("grey_mask.jpg", "colour_mask.jpg"):
        init, m = tmp_path / "init.jpg", tmp_path / name
        expected = pipe.generate(PROMPT, steps=6, seed=2, init_image=init, mask=m).images[0]  # at the init image's size
        got = native.image(tmp_path / "out.png", *args[:4], "--steps", 6, "--seed", 2, "--init-image", init, "--mask", m)
        assert psnr(got, expected) >= NATIVE_DB, name
        keep = np.asarray(Image.open(m).convert("L")) < 128
        np.testing.assert_array_equal(got[keep], np.asarray(Image.open(init).convert("RGB"))[keep])


def test_the_benchmark_worker_speaks_the_peer_protocol(native_build, native, default_model, tmp_path):
    """benchmarks/run.py's ours-native row: native_bench_worker answers benchmarks/peers/worker_common.py's
    protocol (ready, warmup, run with stage times, final with peak RSS) and draws ldm-rt's image from the noise file."""
    import sys

    sys.path.insert(0, str(CPP.parent))
    from benchmarks.peers.worker_common import RESULT_PREFIX

    noise = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    np.save(tmp_path / "noise.npy", noise)
    spec = {"model": str(default_model), "prompt": PROMPT, "negative_prompt": "", "steps": 5, "guidance": 7.5, "scheduler": "ddim",
            "seed": 0, "batch": 1, "height": 64, "width": 64, "threads": 1, "noise_file": str(tmp_path / "noise.npy"),
            "image_out": str(tmp_path / "image.npy")}  # fmt: skip
    done = subprocess.run([str(native_build.out / "native_bench_worker"), "--spec", json.dumps(spec)], input="warmup\nrun\nexit\n",
                          capture_output=True, text=True, timeout=300, env=native.env)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    events = [json.loads(line.removeprefix(RESULT_PREFIX)) for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    assert [e["event"] for e in events] == ["ready", "done", "run", "final"]
    assert events[0]["precision"] == "f32" and events[0]["load_s"] > 0 and events[3]["peak_rss_mb"] > 10
    run = events[2]
    assert len(run["unet"]) == 5 and run["total"] >= sum(run["unet"]) and run["vae_decoder"] > 0
    expected = Pipeline.load(default_model).generate(PROMPT, steps=5, latents=noise).images
    assert psnr(np.load(tmp_path / "image.npy")[0], expected[0]) >= NATIVE_DB


def test_a_service_can_add_subdirectory_the_native_runtime(native, tmp_path):
    """The other way in (issue 20): add_subdirectory(cpp/native) inside a service's own tree defines
    ldm_rt::native, found OpenVINO from the Python environment named, and the service's link to it configures."""
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(tree LANGUAGES CXX)\n"
        f'add_subdirectory("{CPP / "native"}" ldm_rt_native)\n'
        f'add_executable(service "{CPP / "native" / "examples" / "service" / "main.cpp"}")\n'
        "target_link_libraries(service PRIVATE ldm_rt::native)\n"
    )
    done = subprocess.run(["cmake", "-S", str(tmp_path), "-B", str(tmp_path / "b"), f"-DPython_EXECUTABLE={sys.executable}"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cache = (tmp_path / "b" / "CMakeCache.txt").read_text()
    assert "OpenVINO_DIR:PATH=" in cache and (tmp_path / "b" / "ldm_rt_native").is_dir()


@pytest.mark.skipif(BF16_UNAVAILABLE is not None, reason=f"--bf16 computes in f32 here: {BF16_UNAVAILABLE}")
def test_bf16_refuses_a_model_whose_measured_bf16_parity_failed(native, tmp_path, capsys):
    root = failed_copy(tmp_path, measured=True)
    args = ["--model", str(root), "--bf16", "--out", str(tmp_path / "x.png")]
    expected = python_error(capsys, *args, "--backend", "openvino")
    done = native.run(*args)
    assert done.returncode == 2 and done.stderr.splitlines() == [f"ldm-rt-native: error: {expected}"]
    assert "failed bf16 parity" in expected and not (tmp_path / "x.png").exists()


def test_long_prompts_are_chunked_as_ldm_rt_sample_chunks_them(native, tmp_path_factory, tiny_sd_v1, tmp_path):
    from test_long_prompts import LONG, WORDS, chunked_export

    model = chunked_export(tmp_path_factory, tiny_sd_v1)  # built with --prompt-chunks 3
    pipe = Pipeline.load(model)
    common = dict(seed=5, steps=STEPS, guidance=5.0, height=16, width=16, scheduler="ddim")
    requests = [{"prompt": LONG, "negative_prompt": NEGATIVE, **common}, {"prompt": PROMPT, "negative_prompt": LONG, **common}]
    images = native.images(model, requests, tmp_path)
    for request, got in zip(requests, images):
        expected = pipe.generate(request["prompt"], request["negative_prompt"], **common).images[0]
        assert psnr(got, expected) >= NATIVE_DB, request["prompt"][:20]
    # The chunks matter: the first one alone (a build without --prompt-chunks) draws another image.
    first_only = Pipeline.load(exported(tmp_path_factory, tiny_sd_v1, fp16=False)).generate(LONG, NEGATIVE, **common).images[0]
    assert psnr(images[0], first_only) < WRONG_DB
    # Words past the last chunk: the warning ldm-rt sample gives.
    too_long = " ".join(WORDS * 8)
    done = native.run("--model", model, "--prompt", too_long, "--steps", "1", "--height", "16", "--width", "16", "--out", tmp_path / "x.png")
    assert done.returncode == 0 and "3 chunks of the text encoder's 77 were dropped" in done.stderr, done.stderr


def test_a_big_file_is_hashed_once_per_compile_cache_with_pythons_record(native, default_model, tmp_path, monkeypatch):
    """base.verified_file, native (src/artifacts.cpp verified_manifest_file): a file of at least VERIFIED_FROM_BYTES is
    hashed at the first start with a compile cache, which records it in the record Python writes for it (same name,
    same bytes), and is not hashed again while that record vouches for it; each unpatched component compiles into its
    own cache folder, named as openvino_backend.py names it."""
    from ldm_rt.runtime.backends import base

    model = Path(shutil.copytree(default_model, tmp_path / "artifacts"))
    # The decoder gets a big external-data file (zeros, sparse: cheap); OpenVINO never reads it (the ONNX names none).
    rel = "onnx/fp32/vae_decoder.onnx.data"
    with open(model / rel, "wb") as f:
        f.truncate(base.VERIFIED_FROM_BYTES)
    data = json.loads((model / MANIFEST).read_text())
    external = {"file": rel, "sha256": sha256_file(model / rel), "bytes": base.VERIFIED_FROM_BYTES}
    data["components"]["vae_decoder"]["precisions"]["fp32"]["external_data"] = external
    (model / MANIFEST).write_text(json.dumps(data))
    cache = tmp_path / "cache"
    own = Native(native.exe.parent, cache)
    args = ["--model", model, "--prompt", PROMPT, "--steps", "1", "--seed", "1"]
    first = own.image(tmp_path / "first.png", *args)
    manifest = Manifest.read(model)
    pe = manifest.components["vae_decoder"].precisions["fp32"]
    base.verified_file(model, manifest, pe.external_data, base.HostOptions(compile_cache=tmp_path / "python"))
    records = {p.name: p.read_bytes() for p in (cache / "ldm-rt" / "verified").iterdir()}
    assert len(records) == 1 and records == {p.name: p.read_bytes() for p in (tmp_path / "python" / "verified").iterdir()}

    def key(name: str) -> str:
        pe = manifest.components[name].precisions["fp32"]
        return hashlib.sha256(" ".join(e.sha256 for e in (pe.onnx, pe.external_data) if e is not None).encode()).hexdigest()[:24]

    assert {p.name for p in (cache / "ldm-rt" / "openvino").iterdir()} == {key(n) for n in ("text_encoder", "unet", "vae_decoder")}

    # A record is trusted without reading the file: a manifest whose hash the file does not have fails a start...
    external["sha256"] = "0" * 64
    (model / MANIFEST).write_text(json.dumps(data))
    done = Native(native.exe.parent, tmp_path / "fresh").run(*args, "--out", tmp_path / "x.png")
    bad = f"{model / rel} does not match the manifest's hash (truncated or changed); rebuild the artifacts"
    assert (done.returncode, done.stderr.splitlines()) == (2, [f"ldm-rt-native: error: {bad}"])
    # ... and passes once this cache holds a record vouching for the file at that hash (written here by Python's
    # verified_file, its hash check skipped): the start did not hash it.
    monkeypatch.setattr(Manifest, "verify_file", lambda self, folder, entry: Path(folder) / entry.file)
    lying = Manifest.read(model)
    base.verified_file(model, lying, lying.components["vae_decoder"].precisions["fp32"].external_data, base.HostOptions(compile_cache=cache / "ldm-rt"))
    np.testing.assert_array_equal(own.image(tmp_path / "again.png", *args), first)


def test_a_model_rebuilt_at_the_same_path_is_compiled_afresh(native, tmp_path):
    """OpenVINO keys a cached graph compiled from a path on the path and the settings, not on the file's bytes: the
    cache folder per file, named after its manifest hash, keeps a model rebuilt in place (same contracts, other
    weights) from running the old model's compiled graphs (tests/test_runtime_openvino.py's, natively)."""
    from test_runtime_fixtures import build_synthetic_artifacts

    folder = tmp_path / "artifacts"
    own = Native(native.exe.parent, tmp_path / "cache")
    args = ["--model", folder, "--prompt", "a red cube", "--steps", "2", "--seed", "1", "--height", "16", "--width", "16"]
    drawn = []
    for seed in (0, 1):
        shutil.rmtree(folder, ignore_errors=True)
        build_synthetic_artifacts(folder, seed=seed)
        drawn.append(own.image(tmp_path / f"cached_{seed}.png", *args))
        np.testing.assert_array_equal(drawn[-1], own.image(tmp_path / f"uncached_{seed}.png", *args, "--no-compile-cache"))
    assert np.abs(drawn[0].astype(int) - drawn[1].astype(int)).max() > 10
