"""cpp/: the C++ library that embeds the Python runtime, built with CMake and driven through its example: same bytes as
the Python API (also with the few-step schedulers and --eta), the runtime's one-line errors.

The build (cmake + g++, pybind11 from the test environment) runs in a background thread while the artifacts
are prepared: the shipped default model when it exists, else the tiny model exported by the shared fixture.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from cmake_build import CMakeBuild, embedding_build
from test_runtime_fixtures import exported

from ldm_rt.runtime.artifacts import default_artifacts_dir
from ldm_rt.runtime.cli import main as ldm_rt_main
from ldm_rt.runtime.manifest import MANIFEST, ArtifactError
from ldm_rt.runtime.params import GenerationError
from ldm_rt.runtime.pipeline import Pipeline

STEPS = "3"


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> CMakeBuild:
    # The embedding host only (the native runtime has its own test, test_native_runtime.py); one build per session.
    return embedding_build(tmp_path_factory)


@pytest.fixture(scope="module")
def artifacts(build, tmp_path_factory, request) -> Path:
    default = default_artifacts_dir()
    if (default / MANIFEST).is_file():
        return default
    return exported(tmp_path_factory, request.getfixturevalue("tiny_ldm_rt_model"), fp16=False)


@pytest.fixture(scope="module")
def generate(build, artifacts) -> Path:
    build.join(timeout=540)
    assert build.ok, f"the C++ build failed:\n{build.log[-4000:]}"
    return build.out / "generate"


@pytest.fixture(scope="module")
def pipe(artifacts) -> Pipeline:
    return Pipeline.load(artifacts)


def run_generate(exe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


def read_ppm(path: Path) -> np.ndarray:
    magic, size, depth, data = path.read_bytes().split(b"\n", 3)
    assert magic == b"P6" and depth == b"255"
    w, h = map(int, size.split())
    return np.frombuffer(data, np.uint8).reshape(h, w, 3)


def test_same_seed_gives_the_pixels_of_ldm_rt_sample(generate, artifacts, tmp_path, capsys):
    args = ["--model", str(artifacts), "--prompt", "a red car", "--negative-prompt", "blurry", "--steps", STEPS, "--guidance", "5", "--seed", "7"]
    done = run_generate(generate, *args, "--out", str(tmp_path / "cpp.ppm"))
    assert done.returncode == 0, done.stderr
    assert ldm_rt_main(["sample", *args, "--out", str(tmp_path / "py.png")]) == 0
    expected = np.asarray(Image.open(tmp_path / "py.png").convert("RGB"))
    got = read_ppm(tmp_path / "cpp.ppm")
    np.testing.assert_array_equal(got, expected)
    assert expected.std() > 1  # a real image, not a constant that any seed would match


def test_threads_share_one_pipeline_and_each_image_equals_the_single_threaded_one(generate, artifacts, pipe, tmp_path):
    done = run_generate(
        generate, "--model", str(artifacts), "--prompt", "a blue house", "--steps", STEPS, "--seed", "11",
        "--scheduler", "euler-a", "--threads", "3", "--out", str(tmp_path / "t.raw"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / f"t_{k}.raw") for k in range(3)]
    images = []
    for k in range(3):
        expected = pipe.generate("a blue house", steps=int(STEPS), seed=11 + k, scheduler="euler-a").images[0]
        got = np.frombuffer((tmp_path / f"t_{k}.raw").read_bytes(), np.uint8)
        np.testing.assert_array_equal(got, expected.ravel(), err_msg=f"thread {k} (seed {11 + k})")
        images.append(got.tobytes())
    assert len(set(images)) == 3  # the seeds really differ


def test_a_bad_argument_is_the_runtimes_one_line_error_and_exit_2(generate, artifacts, pipe, tmp_path):
    with pytest.raises(GenerationError) as expected:
        pipe.generate("a cat", steps=0, seed=1)
    out = tmp_path / "never.ppm"
    done = run_generate(generate, "--model", str(artifacts), "--prompt", "a cat", "--steps", "0", "--seed", "1", "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"generate: error: {expected.value}"]
    assert not out.exists()
    with pytest.raises(ArtifactError) as expected:
        Pipeline.load(tmp_path / "no_such_model")
    done = run_generate(generate, "--model", str(tmp_path / "no_such_model"), "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"generate: error: {expected.value}"]


@pytest.mark.parametrize("scheduler,eta", [("tcd", None), ("dpmpp-2s-a", 0.5), ("lcm", None)])
def test_the_few_step_schedulers_and_eta_reach_the_runtime(generate, artifacts, pipe, tmp_path, scheduler, eta):
    """The host embeds the runtime, so issue 18's schedulers come with it: each gives the Python API's bytes, with its
    step noise from the seed's generator, and `--eta` (Request::eta) moves the image as `eta=` does."""
    extra = [] if eta is None else ["--eta", str(eta)]
    out = tmp_path / "few.raw"
    done = run_generate(generate, "--model", str(artifacts), "--prompt", "a blue house", "--steps", "2", "--seed", "5",
                        "--scheduler", scheduler, *extra, "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    kw = dict(steps=2, seed=5, scheduler=scheduler)
    expected = pipe.generate("a blue house", **kw, **({} if eta is None else {"eta": eta})).images[0]
    got = np.frombuffer(out.read_bytes(), np.uint8)
    np.testing.assert_array_equal(got, expected.ravel())
    if eta is not None:
        assert np.abs(got.astype(int) - pipe.generate("a blue house", **kw).images[0].ravel()).mean() > 0.5


def test_eta_for_a_scheduler_without_one_is_the_runtimes_one_line_error(generate, artifacts, pipe, tmp_path):
    with pytest.raises(GenerationError) as expected:
        pipe.generate("a cat", steps=2, seed=1, scheduler="euler", eta=0.5)
    out = tmp_path / "never.raw"
    done = run_generate(generate, "--model", str(artifacts), "--prompt", "a cat", "--steps", "2", "--seed", "1",
                        "--scheduler", "euler", "--eta", "0.5", "--out", str(out))  # fmt: skip
    assert done.returncode == 2 and done.stderr.splitlines() == [f"generate: error: {expected.value}"]
    assert not out.exists()
