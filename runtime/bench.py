"""`ldm-rt bench`: how long our own pipeline takes to load and to sample on this machine, and its peak memory.

One artifacts folder (default: the shipped model), in this process: the load (`Pipeline.load`), the first
image (cold sessions), then --runs timed calls of the same generation: time per image and per UNet step
(medians), and the process's peak resident memory. Against other pipelines (the PyTorch reference, diffusers,
Optimum): `python benchmarks/run.py` in a source checkout (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .schedulers import SCHEDULERS

MAX_RUNS = 100  # timed calls; each is a full generation, so more only costs time


class BenchError(ValueError):
    """`ldm-rt bench` cannot run as asked; the message names the cause and the fix."""


@dataclass(frozen=True)
class PipelineTiming:
    """Seconds (and MB) of one pipeline on one machine; medians over the timed calls."""

    load_s: float  # Pipeline.load: manifest, tokenizer, sessions
    first_image_s: float  # the first generate call, on cold sessions
    image_s: float  # one timed call / batch
    unet_step_s: float  # over every step of the timed calls
    text_encoder_s: float
    vae_decoder_s: float
    peak_rss_mb: float | None  # this process's high-water mark (None off Linux)
    runs: int
    batch: int
    steps: int
    params: dict[str, Any]  # what was generated (Result.params of the last call)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def peak_rss_mb() -> float | None:
    """This process's peak resident set (VmHWM, Linux). Not getrusage's ru_maxrss: Linux carries the high-water
    mark of the process that forked us (before exec) into it, so a child of a big process reports that size."""
    # Copied from benchmarks/peers/worker_common.py peak_rss_mb, which must run where ldm_rt is not installed;
    # tests/test_runtime_bench.py holds the two equal.
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(found.group(1)) / 1024.0 if found else None


def time_pipeline(model: Path | None, *, runs: int = 3, backend: str = "onnxruntime", precision: str = "fp32",
                  threads: int | None = None, **generate: Any) -> PipelineTiming:
    """Load `model` and time `runs` calls of `Pipeline.generate(**generate)` after one untimed first call."""
    if isinstance(runs, bool) or not isinstance(runs, int) or not 1 <= runs <= MAX_RUNS:
        raise BenchError(f"runs must be a whole number from 1 to {MAX_RUNS}, got {runs!r}")
    from .pipeline import Pipeline  # after argument checks: `--help` and bad input stay fast

    t0 = time.perf_counter()
    pipe = Pipeline.load(model, backend=backend, precision=precision, threads=threads, compile_cache=False)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.generate(**generate)
    first_image_s = time.perf_counter() - t0
    results = [pipe.generate(**generate) for _ in range(runs)]
    timings = [r.timings for r in results]
    batch = results[-1].images.shape[0]
    return PipelineTiming(
        load_s=load_s,
        first_image_s=first_image_s,
        image_s=statistics.median(t["total"] for t in timings) / batch,
        unet_step_s=statistics.median(s for t in timings for s in t["unet"]),
        text_encoder_s=statistics.median(t.get("text_encoder", 0.0) for t in timings),
        vae_decoder_s=statistics.median(t["vae_decoder"] for t in timings),
        peak_rss_mb=peak_rss_mb(),
        runs=runs,
        batch=batch,
        steps=len(timings[-1]["unet"]),
        params=results[-1].params,
    )


def describe(timing: PipelineTiming) -> list[str]:
    """The lines `ldm-rt bench` prints."""
    p = timing.params
    rss = "unknown (no /proc on this system)" if timing.peak_rss_mb is None else f"{timing.peak_rss_mb:.0f} MB"
    return [
        f"{p.get('width')}x{p.get('height')}, batch {timing.batch}, {timing.steps} UNet calls, {p.get('scheduler')}, "
        f"backend {p.get('backend')}, {p.get('precision')}",
        f"load: {timing.load_s:.2f} s",
        f"first image: {timing.first_image_s:.2f} s (cold)",
        f"per image: {timing.image_s:.3f} s (median of {timing.runs} calls)",
        f"UNet step: {timing.unet_step_s * 1e3:.1f} ms; text encoder {timing.text_encoder_s * 1e3:.1f} ms; "
        f"VAE decoder {timing.vae_decoder_s * 1e3:.1f} ms",
        f"peak RSS: {rss}",
    ]


def add_arguments(parser: argparse.ArgumentParser, backends: Sequence[str]) -> None:
    """The `ldm-rt bench` options (runtime/cli.py adds them to its subcommand)."""
    parser.add_argument("--model", type=Path, default=None, help="artifacts folder (default: the shipped default model)")
    parser.add_argument("--backend", default="onnxruntime", choices=list(backends), help="inference backend (default onnxruntime)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="which built precision to run (default fp32)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per operator (default: one per physical core)")
    parser.add_argument("--prompt", default="a red circle on a white background", help="the prompt drawn every call")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default 25, as `ldm-rt sample`)")
    parser.add_argument(
        "--scheduler", default=None, choices=list(SCHEDULERS),
        help="sampler (default: the model's own, from its folder's scheduler class, as `ldm-rt sample`; `ldm-rt info` names it)",
    )
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the artifacts' optimum)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the artifacts' optimum)")
    parser.add_argument("--runs", type=int, default=3, help=f"timed calls after the first; medians are reported (default 3, at most {MAX_RUNS})")
    parser.add_argument("--json", action="store_true", help="print the measurements as one JSON object")


def bench_command(args: argparse.Namespace) -> int:
    """`ldm-rt bench`: time the pipeline, print what was measured."""
    timing = time_pipeline(
        args.model, runs=args.runs, backend=args.backend, precision=args.precision, threads=args.threads,
        prompt=args.prompt, steps=args.steps, scheduler=args.scheduler, guidance=args.guidance, batch=args.batch,
        height=args.height, width=args.width, seed=0,  # every call draws the same image
    )
    print(json.dumps(timing.to_dict()) if args.json else "\n".join(describe(timing)))
    return 0
