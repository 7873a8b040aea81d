"""What every training run shares: its output folder, the metrics file, and what `train` returns."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm_rt.runtime.backends.base import MAX_THREADS_PER_CPU, usable_cpus

from . import distributed
from .checkpoint import has_checkpoint
from .cli import quiet_unless_main
from .config_loading import TrainConfigError
from .io_errors import naming


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]  # the last logged / evaluated values
    modules: dict[str, nn.Module] = field(default_factory=dict)  # this process's trained modules, by checkpoint name


class RunClock:
    """The two timings every trainer keeps: steps per second between log lines, and whether a timed checkpoint
    is due (rank 0's clock decides for every rank, so all reach the checkpoint at the same step)."""

    def __init__(self, step: int, checkpoint_minutes: float) -> None:
        self.checkpoint_seconds = checkpoint_minutes * 60
        self._tick, self._tick_step = time.monotonic(), step
        self._last_checkpoint = time.monotonic()

    def steps_per_second(self, step: int) -> float:
        """Since the previous call (or the start of this process's run)."""
        now = time.monotonic()
        rate = (step - self._tick_step) / max(now - self._tick, 1e-9)
        self._tick, self._tick_step = now, step
        return rate

    def checkpoint_due(self, ctx: distributed.DistContext, last_step: bool) -> bool:
        """On every rank, the same answer: at the last step, or `checkpoint_minutes` after the last checkpoint
        was written (see `checkpoint_written`). A collective: every rank calls it at every step."""
        due = time.monotonic() - self._last_checkpoint > self.checkpoint_seconds
        return distributed.broadcast_flag(due, ctx) or last_step

    def checkpoint_written(self) -> None:
        self._last_checkpoint = time.monotonic()


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def append_metrics(out_dir: Path, row: dict) -> None:
    """One JSON line per log event in RUN/metrics.jsonl (a resumed run appends after the old lines)."""
    with naming(out_dir / "metrics.jsonl"), open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}) + "\n")


def physical_memory() -> int:
    """Bytes of RAM on this machine (what the sizes a config asks for are held against)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def start_run(device: str, threads: int, out_dir: Path, resume: bool) -> distributed.DistContext:
    """Join the process group (if launched by torchrun), set threads, and claim `out_dir` on rank 0:
    a fresh run refuses a folder that already holds a checkpoint, so nothing is overwritten by accident,
    and a folder it cannot write is refused now rather than at the first checkpoint."""
    # torch starts every thread asked for (100000 crashed the process): a few per CPU at most, as the runtime allows.
    if threads > MAX_THREADS_PER_CPU * usable_cpus():
        raise TrainConfigError(
            f"threads {threads} is more than {MAX_THREADS_PER_CPU}x the {usable_cpus()} CPUs this process may use; "
            f"--set threads={usable_cpus()} (one per CPU) or fewer"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainConfigError(f"--out {out_dir} is a file, not a folder; choose a new or existing folder")
    ctx = distributed.init_distributed(device)
    torch.set_num_threads(threads)
    quiet_unless_main(ctx.is_main)
    if ctx.is_main:
        ensure_dir(out_dir)
        with naming(out_dir), tempfile.TemporaryFile(dir=out_dir):  # the OSError (read-only, permission) writing would raise
            pass
    if not resume and has_checkpoint(out_dir):
        raise TrainConfigError(f"{out_dir} already holds a checkpoint; pass --resume to continue it or choose a new --out")
    return ctx
