"""What every training run shares: its output folder, the metrics file, and what `train` returns."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn


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
