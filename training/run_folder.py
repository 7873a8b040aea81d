"""What every training run shares: its output folder, the metrics file, and what `train` returns."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .checkpoint import has_checkpoint
from .cli import quiet_unless_main
from .config_loading import TrainConfigError


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]  # the last logged / evaluated values
    modules: dict[str, nn.Module] = field(default_factory=dict)  # this process's trained modules, by checkpoint name


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def append_metrics(out_dir: Path, row: dict) -> None:
    """One JSON line per log event in RUN/metrics.jsonl (a resumed run appends after the old lines)."""
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}) + "\n")


def start_run(device: str, threads: int, out_dir: Path, resume: bool) -> distributed.DistContext:
    """Join the process group (if launched by torchrun), set threads, and claim `out_dir` on rank 0:
    a fresh run refuses a folder that already holds a checkpoint, so nothing is overwritten by accident."""
    ctx = distributed.init_distributed(device)
    torch.set_num_threads(threads)
    quiet_unless_main(ctx.is_main)
    if ctx.is_main:
        ensure_dir(out_dir)
    if not resume and has_checkpoint(out_dir):
        raise TrainConfigError(f"{out_dir} already holds a checkpoint; pass --resume to continue it or choose a new --out")
    return ctx
