"""`--eta` / `eta=` / the HTTP example's `eta` (issue 18): diffusers' name for the sampler's noise, which DDIM's and
TCD's step take (TCD's gamma), and k-diffusion's eta of DPM++ 2S a; recorded in the image, refused in one line by the
other schedulers. On the shipped default model, 2-3 steps at its 64x64 optimum: ~10 s."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_runtime_fixtures import http_example

from ldm_rt.runtime.cli import main
from ldm_rt.runtime.params import GenerationError
from ldm_rt.runtime.pipeline import Pipeline

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load()


@pytest.mark.parametrize("scheduler", ["ddim", "tcd", "dpmpp-2s-a"])
def test_eta_moves_the_image_and_is_recorded(pipe, scheduler):
    kw = dict(steps=2, scheduler=scheduler, seed=4)
    default = pipe.generate(PROMPT, **kw)
    assert "eta" not in default.params  # the scheduler's own default, recorded only when asked for
    other = pipe.generate(PROMPT, eta=0.9 if scheduler == "ddim" else 0.0, **kw)
    assert other.params["eta"] == (0.9 if scheduler == "ddim" else 0.0)
    assert np.abs(other.images.astype(float) - default.images).mean() > 0.5
    again = pipe.generate(PROMPT, eta=other.params["eta"], **kw)
    assert np.array_equal(again.images, other.images)


def test_eta_zero_makes_the_ancestral_samplers_deterministic(pipe):
    # no step noise: another seed changes only the initial noise, which latents= fixes
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)  # the 64x64 optimum, f = 4
    for scheduler in ("tcd", "dpmpp-2s-a"):
        a, b = (pipe.generate(PROMPT, steps=3, scheduler=scheduler, eta=0.0, seed=s, latents=latents).images for s in (1, 2))
        assert np.array_equal(a, b), scheduler


@pytest.mark.parametrize("scheduler,eta,message", [
    ("euler", 0.5, "euler takes no eta; eta applies to ddim, tcd (as its gamma), dpmpp-2s-a"),
    ("tcd", 1.5, "eta must be a number in [0, 1]"),
    ("ddim", float("nan"), "eta must be a number in [0, 1]"),
])  # fmt: skip
def test_bad_eta_is_one_line_exit_2_and_no_file(tmp_path, capsys, pipe, scheduler, eta, message):
    with pytest.raises(GenerationError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        pipe.generate(PROMPT, steps=2, scheduler=scheduler, eta=eta)
    out = tmp_path / "x.png"
    code = main(["sample", "--prompt", PROMPT, "--steps", "2", "--scheduler", scheduler, "--eta", str(eta), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and err.count("\n") == 1 and message in err


def test_the_cli_records_eta_in_the_image(tmp_path):
    out = tmp_path / "tcd.png"
    assert main(["sample", "--prompt", PROMPT, "--steps", "2", "--scheduler", "tcd", "--eta", "0.6", "--seed", "1", "--out", str(out)]) == 0
    assert json.loads(Image.open(out).text["parameters"])["eta"] == 0.6


def test_the_http_example_takes_eta(pipe):
    """examples/http_service: `eta` as Pipeline.generate's (the image and its recorded parameters); the runtime's
    refusal for a scheduler without one, and a non-finite value, are 422s naming eta (FastAPI's test client, no server)."""
    import io

    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    app = http_example("ldm_rt_http_example_eta")
    client = TestClient(app.create_app(pipe))
    body = dict(prompt=PROMPT, steps=2, scheduler="tcd", seed=4, eta=0.6)
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(response.content)) as im:
        image, params = np.asarray(im.convert("RGB")), json.loads(im.text["parameters"])
    assert np.array_equal(image, pipe.generate(PROMPT, steps=2, scheduler="tcd", seed=4, eta=0.6).images[0]) and params["eta"] == 0.6
    assert not np.array_equal(image, pipe.generate(PROMPT, steps=2, scheduler="tcd", seed=4).images[0])  # eta reached the scheduler
    for bad, message in (({"scheduler": "euler"}, "euler takes no eta"), ({"eta": 1.5}, "eta must be a number in [0, 1]")):
        response = client.post("/generate", json={**body, **bad})
        assert response.status_code == 422 and message in response.text, response.text
    response = client.post("/generate", content=json.dumps(body).replace("0.6", "NaN"), headers={"content-type": "application/json"})
    assert response.status_code == 422 and "eta" in response.text, response.text
