"""What every peer worker shares: read the run spec, time stages, answer the harness one call at a time.

Standard library (and numpy) only: the Optimum worker imports this inside its own virtual environment,
where ldm_rt is not installed. This file owns the protocol: every worker, ldm-rt's own (ours_worker.py)
included, serves through `run_worker`, and the harness (benchmarks/harness.py) reads RESULT_PREFIX from here.

    python <peer>_worker.py --spec '{"model": ..., "steps": 20, ...}'
    stdout  LDMRT_BENCH {"event": "ready", "first_image_at": ..., ...}   after loading and the first image
    stdin   warmup | run | exit, one per line; each answered by one LDMRT_BENCH line:
            {"event": "done"} | {"event": "run", "total": s, "text_encoder": s, "unet": [s, ...], "vae_decoder": s}
            | {"event": "final", "status": "ok", "peak_rss_mb": ...}
    any failure: LDMRT_BENCH {"event": "final", "status": "failed", "error": "..."} and exit status 1

The harness keeps every peer's process alive and asks for one timed call from each in turn, so a change of
load on a shared machine hits every peer alike instead of whichever ran at that moment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

RESULT_PREFIX = "LDMRT_BENCH "


def read_spec(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="one benchmark worker (see worker_common.py for the protocol)")
    parser.add_argument("--spec", required=True, help="the run spec as JSON (see benchmarks/harness.py RunSpec)")
    return json.loads(parser.parse_args(argv).spec)


def emit(message: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(message), flush=True)


class StageClock:
    """Seconds per stage for one pipeline call; `unet` collects one entry per call (= per step)."""

    def __init__(self) -> None:
        self.times: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        self.times = {"text_encoder": 0.0, "unet": [], "vae_decoder": 0.0}

    def add(self, stage: str, seconds: float) -> None:
        if stage == "unet":
            self.times["unet"].append(seconds)
        else:
            self.times[stage] = self.times.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` timed as `stage` (for methods replaced on an instance)."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.timing(stage):
                return fn(*args, **kwargs)

        return timed


def serve(generate: Callable[[], Any], clock: StageClock, save_first: Callable[[Any], None], info: dict[str, Any]) -> None:
    """The first image (the cold-start one), then answer warmup/run/exit from stdin until told to exit."""
    clock.reset()
    t0 = time.perf_counter()
    images = generate()
    first_image_s = time.perf_counter() - t0
    # Wall clock: the harness subtracts its own start time, so cold start includes interpreter start and imports.
    emit({"event": "ready", "first_image_s": first_image_s, "first_image_at": time.time(), **info})
    save_first(images)
    for line in sys.stdin:
        command = line.strip()
        if command == "exit":
            break
        clock.reset()
        t0 = time.perf_counter()
        generate()
        total = time.perf_counter() - t0
        emit({"event": "run", "total": total, **clock.times} if command == "run" else {"event": "done"})
    emit({"event": "final", "status": "ok", "peak_rss_mb": peak_rss_mb()})


def run_worker(prepare: Callable[[dict[str, Any]], tuple[Callable[[], Any], StageClock, dict[str, Any]]]) -> None:
    """`prepare(spec)` loads the pipeline and returns (generate, clock, info); then serve the harness.
    Any failure is reported as the final line (exit status 1)."""
    spec = read_spec()
    try:
        generate, clock, info = prepare(spec)
        serve(generate, clock, lambda images: save_uint8(spec.get("image_out"), images), info)
    except Exception as e:  # a worker reports every failure to the harness instead of dying silently
        traceback.print_exc(file=sys.stderr)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        emit({"event": "final", "status": "failed", "error": f"{type(e).__name__}: {first}"})
        sys.exit(1)


def peak_rss_mb() -> float | None:
    """This process's peak resident set (VmHWM), read last. Not the parent's ru_maxrss from wait4: Linux
    carries the pre-exec (forked) image's high-water mark into it, so every child would report at least the
    harness's own size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def save_uint8(path: str | None, images: Any) -> None:
    """Write the first call's images (B, H, W, 3) uint8 as .npy so the harness can compare peers' outputs."""
    if not path:
        return
    import numpy as np

    np.save(path, np.asarray(images, dtype=np.uint8), allow_pickle=False)


def to_uint8(images_float01: Any) -> Any:
    """diffusers' output_type="np" images in [0, 1] -> uint8 exactly as ldm-rt rounds them."""
    import numpy as np

    return np.round(np.clip(np.asarray(images_float01, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
