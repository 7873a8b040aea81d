"""examples/http_service: a real uvicorn server on 127.0.0.1 and a real HTTP client (httpx)."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_runtime_fixtures import synthetic

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from ldm_rt.runtime.pipeline import Pipeline  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "http_service" / "app.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return synthetic(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(APP), "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/openapi.json", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"server did not start: {err[-2000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pixels(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def test_generate_returns_the_png_the_python_api_makes(server, model_dir):
    body = {"prompt": "a red cube", "steps": 3, "seed": 9, "scheduler": "euler", "guidance_rescale": 0.7}
    r = httpx.post(f"{server}/generate", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "9"
    expected = Pipeline.load(model_dir).generate("a red cube", steps=3, seed=9, scheduler="euler", guidance_rescale=0.7).images[0]
    np.testing.assert_array_equal(pixels(r.content), expected)
    assert '"prompts": ["a red cube"]' in Image.open(io.BytesIO(r.content)).text["parameters"]


def test_concurrent_requests_each_get_their_own_image(server, model_dir):
    pipe = Pipeline.load(model_dir)
    seeds = list(range(6))
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda s: client.post(f"{server}/generate", json={"prompt": "a blue ball", "steps": 4, "seed": s, "scheduler": "euler-a"}), seeds))
    for s, r in zip(seeds, responses):
        assert r.status_code == 200
        np.testing.assert_array_equal(pixels(r.content), pipe.generate("a blue ball", steps=4, seed=s, scheduler="euler-a").images[0])
    assert len({r.content for r in responses}) == len(seeds)


@pytest.mark.parametrize("body, where", [
    ({"prompt": "a", "steps": 0}, "steps"),
    ({"prompt": "a", "steps": 1000}, "steps"),
    ({"prompt": "a", "height": 12}, "height"),
    ({"prompt": "a", "batch": 0}, "batch"),
    ({"prompt": "a", "scheduler": "heun"}, "scheduler"),
    ({"prompt": "a", "unknown": 1}, "unknown"),
    ({"prompt": "a", "guidance_rescale": 1.5}, "guidance_rescale"),
    ({"steps": 2}, "prompt"),
    ({"prompt": "a", "height": 40}, "height 40 must be a multiple of 4 in [8, 32]"),  # the artifacts' own range
])
def test_bad_requests_are_422(server, body, where):
    r = httpx.post(f"{server}/generate", json=body, timeout=30)
    assert r.status_code == 422
    assert where in r.text
