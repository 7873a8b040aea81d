"""Parity of exported components against the PyTorch reference, on several shapes of the profile.

Each component is checked at the profile's min, opt and max points and at one odd in-range size (a
batch of 3, a latent size that is neither end of the range): a graph that froze a traced shape into a
constant fails there. The measure is max |exported - reference| over the whole output, against the
contract's bound atol + rtol * max |reference| (runtime/contracts.Tolerance).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from ldm_rt.export.errors import ParityError
from ldm_rt.runtime.contracts import ComponentContract, Dim

log = logging.getLogger(__name__)

PARITY_SEED = 20220
ORT_BACKEND = "onnxruntime-cpu"
# ONNX Runtime's CPU provider has fp16 kernels for few ops: it runs the rest in fp32 behind inserted Casts.
ORT_FP16_NOTE = (
    "onnxruntime-cpu runs fp16 nodes that lack CPU fp16 kernels in fp32 (inserted casts): this checks the "
    "fp16 graph and its fp16 weights; fp16 arithmetic and overflow are checked by torch_fp16"
)


def _odd_size(d: Dim) -> int:
    """The smallest legal size strictly inside the range other than opt, preferably an odd multiple of
    the step (an odd batch, a latent size that halves to an odd size); opt when the range has none."""
    step = d.multiple_of
    inside = [v for v in range(d.min + 1, d.max) if v % step == 0 and v != d.opt]
    odd = [v for v in inside if (v // step) % 2 == 1]
    pool = odd or inside
    return pool[0] if pool else d.opt


def parity_points(contract: ComponentContract) -> list[dict[str, int]]:
    """Dimension sizes to check: min, opt, max and one odd in-range point (duplicates removed)."""
    points = [{d.name: getattr(d, which) for d in contract.dims} for which in ("min", "opt", "max")]
    points.append({d.name: _odd_size(d) for d in contract.dims})
    unique: list[dict[str, int]] = []
    for p in points:
        if p not in unique:
            unique.append(p)
    return unique


def sample_sets(contract: ComponentContract, seed: int = PARITY_SEED) -> list[dict[str, np.ndarray]]:
    """Random inputs at every parity point (fixed seed: reruns compare the same numbers)."""
    rng = np.random.default_rng(seed)
    vocab = int(contract.extra.get("vocab_size") or 0)
    return [contract.sample_inputs(point, rng, vocab_size=vocab) for point in parity_points(contract)]


@dataclass
class Case:
    """One parity input set and the fp32 reference output for it."""

    inputs: dict[str, np.ndarray]
    reference: np.ndarray

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.inputs.items()}


def reference_cases(wrapper: nn.Module, contract: ComponentContract, input_sets: Sequence[dict[str, np.ndarray]]) -> list[Case]:
    names = [t.name for t in contract.inputs]
    cases = []
    with torch.no_grad():
        for feeds in input_sets:
            out = wrapper(*[torch.from_numpy(feeds[n]) for n in names])
            cases.append(Case(feeds, out.float().numpy()))
    return cases


@dataclass
class ParityResult:
    component: str
    precision: str
    backend: str
    shapes: list[dict[str, list[int]]]
    max_abs_err: list[float]
    bound: list[float]

    @property
    def passed(self) -> bool:
        return all(np.isfinite(e) and e <= b for e, b in zip(self.max_abs_err, self.bound))

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "shapes": self.shapes,
            "max_abs_err": self.max_abs_err,
            "bound": self.bound,
            "passed": self.passed,
        }

    def raise_if_failed(self, fix: str) -> None:
        for shape, err, bound in zip(self.shapes, self.max_abs_err, self.bound):
            if not (np.isfinite(err) and err <= bound):
                first = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shape.items())
                raise ParityError(
                    f"parity failed: {self.component} {self.precision} ({self.backend}) at {first}: "
                    f"max abs error {err:.3g} > bound {bound:.3g}; {fix}"
                )


def _max_abs_err(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        return float("inf")
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return float("inf") if not np.all(np.isfinite(diff)) else float(diff.max())


def ort_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # fp16 constant-folding notices are expected, not the user's concern
    # The build alternates ONNX Runtime and torch on the same cores: idle ORT threads must not spin.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def check_onnx(path: Path, contract: ComponentContract, precision: str, cases: Sequence[Case]) -> ParityResult:
    """Run the ONNX file in ONNX Runtime (CPU) on every case; compare with the fp32 reference."""
    session = ort_session(path)
    out_name = contract.outputs[0].name
    errors, bounds = [], []
    for case in cases:
        (got,) = session.run([out_name], case.inputs)
        errors.append(_max_abs_err(got, case.reference))
        bounds.append(contract.tolerance[precision].bound(case.reference))
    return ParityResult(contract.name, precision, ORT_BACKEND, [c.shapes for c in cases], errors, bounds)


def format_table(results: Sequence[ParityResult]) -> str:
    """A small fixed-width table: one row per component, precision and backend; worst error and margin."""
    header = f"{'component':<14}{'precision':<10}{'backend':<17}{'shapes':>7}{'max abs err':>13}{'bound':>11}  ok"
    lines = [header, "-" * len(header)]
    for r in results:
        worst = max(range(len(r.max_abs_err)), key=lambda i: r.max_abs_err[i] / r.bound[i])
        lines.append(
            f"{r.component:<14}{r.precision:<10}{r.backend:<17}{len(r.shapes):>7}"
            f"{r.max_abs_err[worst]:>13.3g}{r.bound[worst]:>11.3g}  {'yes' if r.passed else 'NO'}"
        )
    return "\n".join(lines)
