"""The CPython-embedding C++ host (cpp/src, cpp/examples/generate) takes SDXL's micro-conditioning as the Python API
does (diffusers' names; `--original-size H W`, ... on the example's command line): the same request gives the same
bytes as `Pipeline.generate`, the values reach the UNet (another original size, another image), and the runtime's
range check is its one-line error. A request without --scheduler samples with the model's own (euler here).

Cost: the host's CMake build (~11 s of CPU at -O1, in the background while the small SDXL base is exported; the build is
shared with the other embedding tests and the export with tests/test_sdxl_export_runtime.py when they run in one session).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from cmake_build import CMakeBuild, embedding_build
from sdxl_small_models import SIZE

from ldm_rt.runtime.params import GenerationError
from ldm_rt.runtime.pipeline import Pipeline

PROMPT = "a red circle on the left"
MICRO = {"original_size": (48, 40), "crops_coords_top_left": (8, 4), "target_size": (24, 32), "negative_original_size": (16, 24)}


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> CMakeBuild:
    return embedding_build(tmp_path_factory)  # the session's one build (tests/cmake_build.py)


@pytest.fixture(scope="module")
def artifacts(build, small_sdxl_base) -> Path:  # exported while the build runs (unless already done this session)
    return small_sdxl_base[1]


@pytest.fixture(scope="module")
def generate(build, artifacts) -> Path:
    build.join(timeout=540)
    assert build.ok, f"the C++ build failed:\n{build.log[-4000:]}"
    return build.out / "generate"


def flags(micro: dict) -> list[str]:
    return [a for name, value in micro.items() for a in ("--" + name.replace("_", "-"), *map(str, value))]


def run(exe: Path, artifacts: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--model", str(artifacts), "--prompt", PROMPT, "--negative-prompt", "blurry", "--steps", "3", "--guidance", "5", "--seed", "7"]
    return subprocess.run([str(exe), *args, *extra, "--out", str(out)], capture_output=True, text=True, timeout=300)


def test_the_host_passes_the_micro_conditioning_as_the_python_api(generate, artifacts, tmp_path):
    pipe = Pipeline.load(artifacts)
    expected = pipe.generate(PROMPT, negative_prompt="blurry", steps=3, guidance=5.0, seed=7, **MICRO)
    assert expected.params["scheduler"] == "euler"  # no scheduler named: the folder's own
    done = run(generate, artifacts, tmp_path / "micro.raw", *flags(MICRO))
    assert done.returncode == 0, done.stderr
    got = np.frombuffer((tmp_path / "micro.raw").read_bytes(), np.uint8).reshape(SIZE, SIZE, 3)
    np.testing.assert_array_equal(got, expected.images[0])
    done = run(generate, artifacts, tmp_path / "plain.raw")  # the defaults (the output size, crops 0 0)
    assert done.returncode == 0, done.stderr
    plain = np.frombuffer((tmp_path / "plain.raw").read_bytes(), np.uint8).reshape(SIZE, SIZE, 3)
    np.testing.assert_array_equal(plain, pipe.generate(PROMPT, negative_prompt="blurry", steps=3, guidance=5.0, seed=7).images[0])
    assert np.abs(plain.astype(int) - got).mean() > 1  # the micro-conditioning reached the UNet


@pytest.mark.parametrize("extra,kwargs", [
    (["--original-size", "-8", "32"], {"original_size": (-8, 32)}),
    (["--aesthetic-score", "7"], {"aesthetic_score": 7.0}),  # a base reads no aesthetic score
])  # fmt: skip
def test_a_bad_value_is_the_runtimes_one_line_error(generate, artifacts, tmp_path, extra, kwargs):
    with pytest.raises(GenerationError) as expected:
        Pipeline.load(artifacts).generate(PROMPT, negative_prompt="blurry", steps=3, guidance=5.0, seed=7, **kwargs)
    out = tmp_path / "never.raw"
    done = run(generate, artifacts, out, *extra)
    assert done.returncode == 2 and done.stderr.splitlines() == [f"generate: error: {expected.value}"]
    assert not out.exists()
    done = run(generate, artifacts, out, "--target-size", "32")  # one value where two belong: the example's usage error
    assert done.returncode == 2 and "--target-size needs two values" in done.stderr
