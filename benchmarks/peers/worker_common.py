"""What every peer worker shares: read the run spec, time stages, report one JSON line.

Standard library (and numpy) only: the Optimum worker imports this inside its own virtual environment,
where ldm_rt is not installed. The protocol mirrors `ldm_rt.runtime.bench` (RESULT_PREFIX, the spec and
result fields); tests/test_benchmarks_harness.py runs every worker through the harness to keep them in step.

    python <peer>_worker.py --spec '{"model": ..., "steps": 20, ...}'
    -> stdout, last line: LDMRT_BENCH {"status": "ok", "first_image_at": ..., "runs": [...], ...}
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
# The stages every peer reports per timed run (seconds); "unet" is a list, one entry per denoising step.
STAGES = ("text_encoder", "unet", "vae_decoder")


def read_spec(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="one benchmark worker: runs a pipeline and prints LDMRT_BENCH {json}")
    parser.add_argument("--spec", required=True, help="the run spec as JSON (see ldm_rt.runtime.bench.RunSpec)")
    return json.loads(parser.parse_args(argv).spec)


def emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


class StageClock:
    """Seconds per stage for one pipeline call; `unet` collects one entry per call (= per step)."""

    def __init__(self) -> None:
        self.times: dict[str, Any] = {}

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


def measure(spec: dict[str, Any], generate: Callable[[], Any], clock: StageClock, save_first: Callable[[Any], None]) -> dict[str, Any]:
    """Warm-up calls (the first one is the cold-start image), then `runs` timed calls of `generate`.

    `generate` runs the whole pipeline once and returns its images; `clock` is filled by the peer's hooks."""
    out: dict[str, Any] = {}
    clock.reset()
    t0 = time.perf_counter()
    images = generate()
    out["first_image_s"] = time.perf_counter() - t0
    out["first_image_at"] = time.time()  # the harness subtracts its own start time: cold start incl. imports
    save_first(images)
    for _ in range(max(int(spec.get("warmup", 1)) - 1, 0)):
        clock.reset()
        generate()
    runs = []
    for _ in range(int(spec["runs"])):
        clock.reset()
        t0 = time.perf_counter()
        generate()
        total = time.perf_counter() - t0
        runs.append({"total": total, **clock.times})
    out["runs"] = runs
    return out


def run_worker(main: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Call `main(spec)` and print its result; any failure is reported as one JSON line (exit status 1)."""
    spec = read_spec()
    try:
        result = main(spec)
    except Exception as e:  # a worker reports every failure to the harness instead of dying silently
        traceback.print_exc(file=sys.stderr)
        emit({"status": "failed", "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"})
        sys.exit(1)
    emit({"status": "ok", **result})


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
