"""examples/http_service: prompt weighting per request, step previews as Server-Sent Events (/generate/stream) and
textual-inversion embeddings at start (--embedding), each equal to what the Python API makes, on the synthetic model."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from test_runtime_fixtures import http_example, http_server, synthetic

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from ldm_rt.runtime.pipeline import Pipeline  # noqa: E402

http_app = http_example("ldm_rt_http_prompt_features")

WIDTH = 8  # the synthetic text encoder's token width


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return synthetic(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def pipe(model_dir):
    return Pipeline.load(model_dir)


@pytest.fixture(scope="module")
def client(pipe):
    return TestClient(http_app.create_app(pipe, max_in_flight=1))


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def events(text: str) -> list[tuple[str, dict]]:
    """(event, data) of each Server-Sent Event in `text`."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_prompt_weighting_is_the_python_apis(client, pipe):
    body = {"prompt": "a (red:1.8) cube", "steps": 3, "seed": 2}
    r = client.post("/generate", json={**body, "prompt_weighting": True})
    assert r.status_code == 200, r.text
    weighted = pipe.generate("a (red:1.8) cube", steps=3, seed=2, prompt_weighting=True)
    np.testing.assert_array_equal(pixels(r.content), weighted.images[0])
    assert json.loads(Image.open(io.BytesIO(r.content)).text["parameters"])["prompt_weighting"] is True
    # The weight moves the image: the same words at weight 1 draw another one.
    assert not np.array_equal(weighted.images, pipe.generate("a red cube", steps=3, seed=2).images)
    r = client.post("/generate", json={**body, "prompt_weighting": "yes"})  # strict: a bool, not a truthy string
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt_weighting"]


def test_the_stream_sends_each_preview_then_the_image(client, pipe):
    seen = []
    expected = pipe.generate(
        "a blue ball", steps=5, seed=4, preview=lambda i, n, images: seen.append((i + 1, n, images[0])), preview_every=2, preview_kind="full"
    )  # fmt: skip
    body = {"prompt": "a blue ball", "steps": 5, "seed": 4, "preview_every": 2, "preview_kind": "full"}
    with client.stream("POST", "/generate/stream", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r.read().decode())
    assert [e for e, _ in got] == ["preview"] * 3 + ["image"]  # steps 2, 4 and the last
    for (_, data), (step, n, image) in zip(got, seen):
        assert (data["step"], data["steps"]) == (step, n)
        np.testing.assert_array_equal(pixels(base64.b64decode(data["png"])), image)
    final = got[-1][1]
    np.testing.assert_array_equal(pixels(base64.b64decode(final["png"])), expected.images[0])
    assert final["seed"] == 4 and final["params"]["steps"] == 5
    # The slot (max_in_flight=1) was given back when the generation ended: the next request runs.
    assert client.post("/generate", json={"prompt": "a cube", "steps": 1}).status_code == 200


@pytest.mark.parametrize(
    "body, status, where",
    [
        ({"height": 40}, 422, "height"),  # the pipeline's own check: a 422 before the stream starts
        ({"preview_every": 0}, 422, "preview_every"),
        ({"preview_kind": "slow"}, 422, "preview_kind"),
        ({"prompt_weighting": 1}, 422, "prompt_weighting"),
    ],
)
def test_bad_stream_requests_are_422_before_any_event(client, body, status, where):
    r = client.post("/generate/stream", json={"prompt": "a cube", "steps": 2, **body})
    assert r.status_code == status and where in r.text and r.headers["content-type"] == "application/json"


def test_embedding_at_start_over_real_http(model_dir, tmp_path, capsys):
    """The example as a user starts it, with --embedding: /health names the embedding, its trigger draws what the
    Python API draws with it (and not what it draws without), and the stream works through uvicorn."""
    from safetensors.numpy import save_file

    save_file({"zorblat": (np.random.default_rng(0).standard_normal((2, WIDTH)) * 3).astype(np.float32)}, str(path := tmp_path / "e.safetensors"))
    with pytest.raises(SystemExit) as e:
        http_app.main(["--embedding", str(tmp_path / "e.safetensors:two words")])
    assert e.value.code == 2 and "trigger 'two words' must be 1 to 128 printable characters without spaces" in capsys.readouterr().err
    with http_server(tmp_path, "--model", str(model_dir), "--embedding", str(path)) as server:
        assert [(x["token"], x["vectors"]) for x in httpx.get(f"{server.url}/health", timeout=10).json()["embeddings"]] == [("zorblat", 2)]
        body = {"prompt": "a zorblat cube", "steps": 2, "seed": 5}
        with httpx.stream("POST", f"{server.url}/generate/stream", json=body, timeout=60) as r:
            got = events(r.read().decode())
    assert [e for e, _ in got] == ["preview", "preview", "image"]
    image = pixels(base64.b64decode(got[-1][1]["png"]))
    np.testing.assert_array_equal(image, Pipeline.load(model_dir, embeddings=[path]).generate(**body).images[0])
    assert not np.array_equal(image, Pipeline.load(model_dir).generate(**body).images[0])


class SlowPreviews:
    """The real pipeline, each preview 0.1 s late: a long stream for a client to walk away from."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe, self.previews = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, preview=None, **kwargs):
        def slow(i, n, images):
            self.previews += 1
            time.sleep(0.1)
            preview(i, n, images)

        return self.pipe.generate(preview=slow if preview is not None else None, **kwargs)


def test_a_client_that_leaves_ends_its_generation_and_frees_its_slot(pipe):
    import threading

    import uvicorn

    slow = SlowPreviews(pipe)
    sock = http_app.listen("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(http_app.create_app(slow, max_in_flight=1), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(timeout=30) as client:
            deadline = time.monotonic() + 30
            while not server.started:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with client.stream("POST", f"{url}/generate/stream", json={"prompt": "a cube", "steps": 40, "preview_kind": "full"}) as r:
                next(line for line in r.iter_lines() if line.startswith("data: "))  # one preview, then away
            deadline = time.monotonic() + 10  # 40 slow previews would hold the slot for 4 s
            while (code := client.post(f"{url}/generate", json={"prompt": "a cube", "steps": 1}).status_code) == 503:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert code == 200 and slow.previews < 20  # the run ended soon after the client left (measured: 3 of 40)
    finally:
        server.should_exit = True
        thread.join(30)
