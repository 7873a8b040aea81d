"""examples/http_service: a real uvicorn server on 127.0.0.1 and a real HTTP client (httpx); bodies that never
end are sent by hand over a socket."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_runtime_fixtures import HTTP_APP, http_example, http_server, synthetic

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from ldm_rt.runtime.pipeline import Pipeline  # noqa: E402

http_app = http_example("ldm_rt_http_example")

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return synthetic(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # --max-in-flight: room for test_concurrent_requests_each_get_their_own_image's six at once
    with http_server(tmp_path_factory.mktemp("server"), "--model", str(model_dir), "--max-in-flight", "6") as running:
        yield running


def pixels(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def test_generate_returns_the_png_the_python_api_makes(server, model_dir):
    server = server.url
    body = {"prompt": "a red cube", "steps": 3, "seed": 9, "scheduler": "euler", "guidance_rescale": 0.7}
    r = httpx.post(f"{server}/generate", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "9"
    expected = Pipeline.load(model_dir).generate("a red cube", steps=3, seed=9, scheduler="euler", guidance_rescale=0.7).images[0]
    np.testing.assert_array_equal(pixels(r.content), expected)
    assert '"prompts": ["a red cube"]' in Image.open(io.BytesIO(r.content)).text["parameters"]


def test_concurrent_requests_each_get_their_own_image(server, model_dir):
    server = server.url
    pipe = Pipeline.load(model_dir)
    seeds = list(range(6))
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda s: client.post(f"{server}/generate", json={"prompt": "a blue ball", "steps": 4, "seed": s, "scheduler": "euler-a"}), seeds))
    for s, r in zip(seeds, responses):
        assert r.status_code == 200
        np.testing.assert_array_equal(pixels(r.content), pipe.generate("a blue ball", steps=4, seed=s, scheduler="euler-a").images[0])
    assert len({r.content for r in responses}) == len(seeds)


def test_start_line_health_and_access_log(server, model_dir):
    """The start line names the URL and the model; /health says the model is loaded and which; requests are logged."""
    assert f"with model {model_dir} (onnxruntime, fp32, sha256 " in server.start_line
    r = httpx.get(f"{server.url}/health", timeout=10)
    pipe = Pipeline.load(model_dir)
    assert r.status_code == 200 and r.json() == {
        "status": "ok", "model": str(model_dir), "model_hash": pipe.artifacts.model_hash, "backend": "onnxruntime",
        "precision": "fp32", "schedulers": list(pipe.schedulers), "loras": [],  # started without --lora
    }
    deadline = time.monotonic() + 10
    while '"GET /health HTTP/1.1" 200' not in server.stdout.read_text():
        assert time.monotonic() < deadline, server.stdout.read_text()
        time.sleep(0.1)


def test_a_bad_model_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(HTTP_APP), "--model", str(tmp_path / "nowhere"), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("ldm-rt-http: error: ") and "nowhere is not a folder" in r.stderr


def raw_request(url: str, head: str, body_parts, timeout: float = 20) -> bytes:
    """Send a request by hand (a declared or chunked body that never ends) and return the first bytes of the reply."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(head.encode())
            for part in body_parts:
                s.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending: the reply is what counts
        return s.recv(200)


def test_a_declared_oversized_body_is_413_before_it_is_read(server):
    """300 MB announced, 1 kB sent: the reply comes at once (a server reading the whole body would wait here)."""
    head = (f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {300 << 20}\r\n\r\n")
    reply = raw_request(server.url, head, [b'{"prompt": "' + b"a" * 1024])
    assert reply.startswith(b"HTTP/1.1 413"), reply


def test_a_streamed_oversized_body_is_413_once_it_passes_the_limit(server):
    """No Content-Length (chunked): the bytes are counted as they arrive, and the body never ends."""
    head = "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"a" * 4096
    n = http_app.MAX_BODY_BYTES // len(chunk) + 2
    reply = raw_request(server.url, head, [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * n)
    assert reply.startswith(b"HTTP/1.1 413"), reply


def test_the_largest_valid_body_fits_the_limit(server):
    """Two prompts of the maximum length in the longest JSON spelling (surrogate-pair escapes) are accepted."""
    emoji = "\\ud83d\\ude00" * http_app.MAX_PROMPT_CHARS  # one character, 12 bytes, each
    body = f'{{"prompt": "{emoji}", "negative_prompt": "{emoji}", "steps": 1, "seed": 1}}'.encode()
    assert len(body) <= http_app.MAX_BODY_BYTES
    r = httpx.post(f"{server.url}/generate", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, where", [
    # strict types: no coercion from booleans, strings or floats
    ('{"prompt": "a", "steps": true}', "steps"),
    ('{"prompt": "a", "steps": 2.0}', "steps"),
    ('{"prompt": "a", "steps": "2"}', "steps"),
    ('{"prompt": "a", "seed": true}', "seed"),
    ('{"prompt": "a", "batch": true}', "batch"),
    ('{"prompt": "a", "guidance": "7"}', "guidance"),
    ('{"prompt": 5}', "prompt"),
    # JSON's non-standard constants and lone surrogates (a 500 before: the error echo could not be encoded)
    ('{"prompt": "a", "guidance": NaN}', "guidance"),
    ('{"prompt": "a", "guidance": Infinity}', "guidance"),
    ('{"prompt": "a", "guidance_rescale": -Infinity}', "guidance_rescale"),
    ('{"prompt": "a", "steps": NaN}', "steps"),
    ('{"prompt": "a", "seed": NaN}', "seed"),
    ('{"prompt": "\\ud800"}', "prompt"),
    ('{"prompt": "a", "negative_prompt": "x\\udfff"}', "negative_prompt"),
    ('{"prompt": "a", "\\ud800": 1}', "valid string"),
    # the service's bounds, each naming its limit
    ('{"prompt": "a", "steps": 0}', "greater than or equal to 1"),
    ('{"prompt": "a", "steps": 1000}', "less than or equal to 150"),
    ('{"prompt": "a", "steps": 100000000000000000000000}', "less than or equal to 150"),
    ('{"prompt": "a", "guidance": 51}', "less than or equal to 50"),
    ('{"prompt": "%s"}' % ("a" * 2001), "at most 2000 characters"),
    ('{"prompt": "a", "seed": -1}', "seed"),
    # the artifacts' bounds, from the pipeline's own validation
    ('{"prompt": "a", "height": 40}', "height 40 must be a multiple of 4 in [8, 32]"),
    ('{"prompt": "a", "width": 12345678901234567890}', "must be a multiple of 4 in [8, 32]"),
    ('{"prompt": "a", "batch": 5}', "batch range [1, 4]"),
    ('{"prompt": "a", "batch": 0}', "batch must be >= 1"),
    ('{"prompt": "a", "guidance_rescale": 1.5}', "guidance_rescale must be in [0, 1]"),
    ('{"prompt": "a", "scheduler": "kdpm2"}', "scheduler"),
    ('{"prompt": "a", "unknown": 1}', "unknown"),
    ('{"steps": 2}', "prompt"),
    ("[1]", "valid dictionary"),
    ('{"prompt": "a", ', "json_invalid"),
])
def test_bad_requests_are_422_naming_the_field_or_limit(server, body, where):
    r = httpx.post(f"{server.url}/generate", content=body.encode(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    assert where in r.text
    assert len(r.text) < 1000  # the error names where and what, it does not echo the input back


@pytest.mark.parametrize("body", [b'{"prompt": "\xff\xfe"}', b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}"])
def test_undecodable_bodies_are_a_client_error(server, body):
    """Not UTF-8, or an integer of more digits than Python parses: FastAPI's 400, never a 500."""
    r = httpx.post(f"{server.url}/generate", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text


def test_scheduler_choices_are_the_ones_the_loaded_model_can_use():
    """On the shipped model: the request schema offers exactly the pipeline's usable schedulers (the runtime's
    registry checked against the model's schedule), and a registry name the model cannot use is a 422."""
    from fastapi.testclient import TestClient

    from ldm_rt.runtime.schedulers import SCHEDULERS

    pipe = Pipeline.load()
    client = TestClient(http_app.create_app(pipe))
    schema = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]
    assert schema["properties"]["scheduler"]["enum"] == list(pipe.schedulers)
    assert client.get("/health").json()["schedulers"] == list(pipe.schedulers)
    for name in set(SCHEDULERS) - set(pipe.schedulers):
        r = client.post("/generate", json={"prompt": "a red circle", "scheduler": name, "steps": 1})
        assert r.status_code == 422 and "scheduler" in r.text


def test_a_request_naming_no_scheduler_gets_the_models_own(model_dir, tmp_path):
    """Before: the request's default was "ddim" whatever the model; now the pipeline's default_scheduler (the
    model folder's own scheduler class, recorded at export), as `ldm-rt sample` uses it."""
    from fastapi.testclient import TestClient
    from test_runtime_bench import with_default_scheduler

    pipe = Pipeline.load(with_default_scheduler(model_dir, tmp_path / "euler_model", "euler"))
    assert pipe.default_scheduler == "euler" and "ddim" in pipe.schedulers
    client = TestClient(http_app.create_app(pipe))
    schema = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]
    assert schema["properties"]["scheduler"]["default"] == "euler"
    r = client.post("/generate", json={"prompt": "a red cube", "steps": 3, "seed": 4})
    assert r.status_code == 200, r.text
    euler, ddim = (pipe.generate("a red cube", steps=3, seed=4, scheduler=s).images[0] for s in ("euler", "ddim"))
    assert not np.array_equal(euler, ddim)  # the two defaults give different images: the check below tells them apart
    np.testing.assert_array_equal(pixels(r.content), euler)


class GatedPipeline:
    """The real pipeline, its generations held at a gate: requests stay in flight as long as a test says."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe, self.gate, self.entered = pipe, threading.Event(), threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, **kwargs):
        self.entered.release()
        assert self.gate.wait(60)
        return self.pipe.generate(**kwargs)


def test_generations_past_max_in_flight_are_503_with_retry_after(model_dir):
    import uvicorn

    gated = GatedPipeline(Pipeline.load(model_dir))
    sock = http_app.listen("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(http_app.create_app(gated, max_in_flight=2), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    body = {"prompt": "a red cube", "steps": 1, "seed": 1}
    try:
        with httpx.Client(timeout=60) as client, ThreadPoolExecutor(max_workers=2) as pool:
            running = [pool.submit(client.post, f"{url}/generate", json=body) for _ in range(2)]
            for _ in running:
                assert gated.entered.acquire(timeout=30)
            r = client.post(f"{url}/generate", json=body)  # both slots taken: refused at once, not queued
            assert r.status_code == 503 and r.headers["retry-after"] == "1"  # no generation has finished yet
            assert "2 generations are running, the most this service runs at once (--max-in-flight)" in r.json()["detail"]
            assert client.get(f"{url}/health").status_code == 200  # only generations are bounded
            gated.gate.set()
            assert [f.result().status_code for f in running] == [200, 200]
            for _ in range(3):  # more refusals than slots: each one gave its slot back
                assert client.post(f"{url}/generate", json={**body, "height": 40}).status_code == 422
            assert client.post(f"{url}/generate", json=body).status_code == 200
    finally:
        gated.gate.set()
        server.should_exit = True
        thread.join(30)


def test_max_in_flight_is_bounded_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        http_app.main(["--max-in-flight", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "ldm-rt-http: error: --max-in-flight must be 1..64, got 0; see --help\n"
