"""Serving many requests: one Pipeline shared by threads (sessions reused, memory flat), and one Pipeline
per worker process. Complements tests/test_runtime_pipeline.py (6 threads, one request each) and
tests/test_runtime_http.py (concurrent HTTP clients)."""

from __future__ import annotations

import gc
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_runtime_fixtures import synthetic

from ldm_rt.runtime.backends.base import unwrap
from ldm_rt.runtime.pipeline import Pipeline

THREADS = 4
PER_THREAD = 3
# A deterministic, a stochastic and two multistep samplers: each keeps per-request state a race would mix up.
SCHEDULERS = ("ddim", "euler-a", "dpmpp-2m", "pndm")
PROMPTS = ("a red cube", "a blue ball on the table", "a green cat", "a dog")
STEPS = 4


def request(k: int) -> dict:
    """Request number k: its own seed, and a prompt, scheduler and size that vary with k."""
    size = (16, 32, 8)[k % 3]
    return dict(prompt=PROMPTS[k % len(PROMPTS)], steps=STEPS, seed=100 + k, scheduler=SCHEDULERS[k % len(SCHEDULERS)], height=size, width=size)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return synthetic(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def pipe(model_dir) -> Pipeline:
    return Pipeline.load(model_dir)


@pytest.fixture(scope="module")
def expected(pipe) -> dict[int, np.ndarray]:
    """Single-threaded images of every request the tests send."""
    return {k: pipe.generate(**request(k)).images for k in range(THREADS * PER_THREAD)}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def concurrent_round(pipe: Pipeline) -> dict[int, np.ndarray]:
    """THREADS threads released together, each sending PER_THREAD requests; results by request number."""
    start = threading.Barrier(THREADS)

    def worker(t: int) -> list[tuple[int, np.ndarray]]:
        start.wait()
        return [(k, pipe.generate(**request(k)).images) for k in range(t, THREADS * PER_THREAD, THREADS)]

    with ThreadPoolExecutor(THREADS) as pool:
        done = list(pool.map(worker, range(THREADS)))  # re-raises a worker's exception here
    return {k: images for results in done for k, images in results}


def test_threads_sharing_one_pipeline_get_the_single_threaded_images(pipe, expected):
    got = concurrent_round(pipe)
    assert sorted(got) == sorted(expected)  # none lost, none duplicated
    for k, images in got.items():
        np.testing.assert_array_equal(images, expected[k], err_msg=f"request {k}: {request(k)}")
    assert len({images.tobytes() for images in got.values()}) == len(got)


def test_sessions_are_shared_and_memory_stays_flat_across_rounds(pipe, expected, monkeypatch):
    components = dict(pipe.components)
    sessions = {name: unwrap(c).session for name, c in components.items()}  # the encoder's opens here (on first use otherwise)
    opened = []
    original = ort.InferenceSession.__init__

    def counting_init(self, *args, **kwargs):
        opened.append(args[:1])
        original(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "__init__", counting_init)
    concurrent_round(pipe)  # warm-up: ONNX Runtime's arenas grow to their working size once
    gc.collect()
    before = rss_bytes()
    for _ in range(4):
        got = concurrent_round(pipe)
        assert all(np.array_equal(got[k], expected[k]) for k in expected)
    gc.collect()
    growth = rss_bytes() - before
    assert opened == []  # no request opened a session
    assert all(pipe.components[name] is c for name, c in components.items())
    assert all(unwrap(pipe.components[name]).session is s for name, s in sessions.items())
    # 48 more requests on 4 threads; a session or an arena per request would add far more than this.
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 4 rounds"


# ---- one pipeline per worker process -------------------------------------------------------------------
_WORKER_PIPE: Pipeline | None = None


def _load_worker_pipeline(model_dir: str) -> None:
    global _WORKER_PIPE
    _WORKER_PIPE = Pipeline.load(model_dir)


def _generate_in_worker(k: int) -> tuple[int, np.ndarray]:
    assert _WORKER_PIPE is not None
    return k, _WORKER_PIPE.generate(**request(k)).images


def test_one_pipeline_per_worker_process(model_dir, expected):
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker, as a server's workers
    requests = list(range(THREADS * PER_THREAD))
    with ProcessPoolExecutor(2, mp_context=context, initializer=_load_worker_pipeline, initargs=(str(model_dir),)) as pool:
        got = dict(pool.map(_generate_in_worker, requests))
    assert sorted(got) == requests
    for k in requests:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=f"request {k}")
