"""cpp/: the CPython-embedding host's Request::prompt_weighting (the example's --prompt-weighting) reaches the runtime:
the same bytes as the Python API's generate(prompt_weighting=True), which differ from the unweighted image. Reuses the
session's one build of the host (tests/cmake_build.py)."""

from __future__ import annotations

import numpy as np
from test_embedding_cpp import artifacts, build, generate, run_generate  # noqa: F401 (the host's fixtures, one build)

from ldm_rt.runtime.pipeline import Pipeline

PROMPT = "a (red:1.6) house, [blue] sky"


def test_prompt_weighting_reaches_the_runtime(generate, artifacts, tmp_path):
    pipe = Pipeline.load(artifacts)
    kw = dict(steps=2, seed=7)
    weighted = pipe.generate(PROMPT, **kw, prompt_weighting=True).images[0]
    plain = pipe.generate(PROMPT, **kw).images[0]
    assert np.abs(weighted.astype(int) - plain).mean() > 0.5  # the flag is visible in the bytes
    # (Without the flag the host draws `plain`: the default, as tests/test_embedding_cpp.py checks for every request.)
    out = tmp_path / "weighted.raw"
    done = run_generate(generate, "--model", str(artifacts), "--prompt", PROMPT, "--steps", "2", "--seed", "7", "--prompt-weighting", "--out", str(out))
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.frombuffer(out.read_bytes(), np.uint8), weighted.ravel())
