"""Parity of exported components against the PyTorch reference, on several shapes of the profile.

Each component is checked at the profile's min, opt and max points and at one odd in-range size (a
batch of 3, a latent size that is neither end of the range): a graph that froze a traced shape into a
constant fails there. The measure is max |exported - reference| over the whole output, against the
contract's bound atol + rtol * max |reference| (runtime/contracts.Tolerance). A point whose run would need
more memory than the build may spend (export/memory.py) is moved towards the minimum until it fits
(`plan_parity`), and the manifest records the largest point checked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from ldm_rt.export.errors import ExportError, ParityError
from ldm_rt.export.progress import ItemCallback
from ldm_rt.runtime.backends.base import HostOptions
from ldm_rt.runtime.backends.onnxruntime_backend import open_session, session_options
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


def input_shapes(contract: ComponentContract, point: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The input shapes at a point (sizes not given: opt), without allocating the inputs."""
    full = {d.name: d.opt for d in contract.dims} | point
    return {t.name: t.resolve(full) for t in contract.inputs}


def shape_label(shapes: dict[str, Sequence[int]]) -> str:
    """`sample=2x4x8x8, timestep=2`: input shapes for a line of text."""
    return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())


@dataclass(frozen=True)
class ParityPlan:
    """The points a component is checked at: parity_points, each shrunk to fit the memory budget."""

    points: list[dict[str, int]]
    largest: dict[str, int]  # the largest point checked: the profile's maximum unless `note` says otherwise
    note: str | None = None  # why the profile's maximum is not checked as it is

    def to_dict(self) -> dict[str, object]:
        """What the manifest records beside each precision's parity."""
        return {"largest_checked": self.largest, **({"bounded": self.note} if self.note else {})}


def _shrunk(contract: ComponentContract, point: dict[str, int], s: float) -> dict[str, int]:
    """`point` moved towards the profile's minimum: min + s * (point - min), on each dim's grid."""
    out = {}
    for d in contract.dims:
        steps = int((point[d.name] - d.min) * s) // d.multiple_of
        out[d.name] = d.min + steps * d.multiple_of
    return out


def plan_parity(
    contract: ComponentContract, estimate: Callable[[dict[str, tuple[int, ...]]], int] | None, budget: int
) -> ParityPlan:
    """parity_points, with each point whose estimated memory (`estimate` of its input shapes, in bytes)
    exceeds `budget` replaced by the largest point towards the profile's minimum that fits. With `estimate`
    None (the graph could not be analysed) nothing larger than the opt point is checked: its cost is unknown."""
    points = parity_points(contract)
    profile_max = {d.name: d.max for d in contract.dims}

    def elements(p: dict[str, int]) -> int:
        return sum(int(np.prod(s)) for s in input_shapes(contract, p).values())

    def where(p: dict[str, int]) -> str:
        return shape_label(input_shapes(contract, p))

    if estimate is None:
        opt = {d.name: d.opt for d in contract.dims}
        kept = [p for p in points if elements(p) <= elements(opt)]
        note = None if profile_max in kept else f"its memory could not be estimated; checked up to opt ({where(opt)})"
        return ParityPlan(kept, max(kept, key=elements), note)

    def cost(p: dict[str, int]) -> int:
        return estimate(input_shapes(contract, p))

    planned: list[dict[str, int]] = []
    note = None
    for p in points:
        need = cost(p)
        if need > budget:
            smallest = _shrunk(contract, p, 0.0)
            least = cost(smallest)  # one walk of the graph: each estimate evaluates every node
            if least > budget:
                raise ExportError(
                    f"{contract.name}: a parity check at the profile's minimum ({where(smallest)}) needs about "
                    f"{_gib(least)} GiB, more than the {_gib(budget)} GiB it may use; free memory or lower "
                    "the profile's minimum"
                )
            lo, hi = 0.0, 1.0
            for _ in range(24):  # bisection on the scale: sizes move by whole grid steps long before 2**-24
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if cost(_shrunk(contract, p, mid)) <= budget else (lo, mid)
            fitted = _shrunk(contract, p, lo)
            if p == profile_max:
                note = (
                    f"parity at the profile's maximum ({where(p)}) would need about {_gib(need)} GiB, more than the "
                    f"{_gib(budget)} GiB it may use; checked at {where(fitted)} instead"
                )
            p = fitted
        if p not in planned:
            planned.append(p)
    return ParityPlan(planned, max(planned, key=elements), note)


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g}"


def sample_sets(
    contract: ComponentContract, seed: int = PARITY_SEED, points: Sequence[dict[str, int]] | None = None
) -> list[dict[str, np.ndarray]]:
    """Random inputs at every parity point, or at `points` (fixed seed: reruns compare the same numbers)."""
    rng = np.random.default_rng(seed)
    vocab = int(contract.extra.get("vocab_size") or 0)
    points = parity_points(contract) if points is None else points
    return [contract.sample_inputs(point, rng, vocab_size=vocab) for point in points]


@dataclass
class Case:
    """One parity input set and the fp32 reference output for it (`others`: the further outputs of a component
    with several, in contract order, such as text_encoder_2's text_embeds)."""

    inputs: dict[str, np.ndarray]
    reference: np.ndarray
    others: tuple[np.ndarray, ...] = ()

    @property
    def outputs(self) -> tuple[np.ndarray, ...]:
        return (self.reference, *self.others)

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.inputs.items()}

    @property
    def label(self) -> str:
        return shape_label(self.shapes)


def reference_cases(
    wrapper: nn.Module,
    contract: ComponentContract,
    input_sets: Sequence[dict[str, np.ndarray]],
    progress: ItemCallback | None = None,
) -> list[Case]:
    """The fp32 reference output for every input set; `progress(label)` after each."""
    names = [t.name for t in contract.inputs]
    cases = []
    with torch.no_grad():
        for feeds in input_sets:
            out = wrapper(*[torch.from_numpy(feeds[n]) for n in names])
            first, *rest = out if isinstance(out, (tuple, list)) else (out,)
            cases.append(Case(feeds, first.float().numpy(), tuple(o.float().numpy() for o in rest)))
            if progress is not None:
                progress(cases[-1].label)
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

    def failure(self) -> str | None:
        """The first case over its bound, in one line; None when every case passed."""
        for shape, err, bound in zip(self.shapes, self.max_abs_err, self.bound):
            if not (np.isfinite(err) and err <= bound):
                return (
                    f"parity failed: {self.component} {self.precision} ({self.backend}) at {shape_label(shape)}: "
                    f"max abs error {err:.3g} > bound {bound:.3g}"
                )
        return None

    def raise_if_failed(self, fix: str) -> None:
        if (failure := self.failure()) is not None:
            raise ParityError(f"{failure}; {fix}")


def cheapest_cases(cases: Sequence[Case], n: int = 2) -> list[Case]:
    """The `n` cases with the fewest input elements, in their order."""
    size = {id(c): sum(v.size for v in c.inputs.values()) for c in cases}
    keep = {id(c) for c in sorted(cases, key=lambda c: size[id(c)])[:n]}
    return [c for c in cases if id(c) in keep]


def worst_output(errors: Sequence[float], bounds: Sequence[float]) -> tuple[float, float]:
    """(error, bound) of the output furthest beyond (or closest to) its own bound: one figure per case for a
    component with several outputs."""
    i = max(range(len(errors)), key=lambda k: errors[k] / bounds[k] if bounds[k] > 0 else float("inf"))
    return errors[i], bounds[i]


def _max_abs_err(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        return float("inf")
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return float("inf") if not np.all(np.isfinite(diff)) else float(diff.max())


def ort_session(path: Path) -> ort.InferenceSession:
    """A CPU session opened and configured exactly as the runtime opens its own (threads, optimisation level,
    execution mode: all of them can change the rounding), so what parity checks is what runs. HostOptions'
    defaults do not spin, which the build needs too: it alternates ONNX Runtime and torch on the same cores."""
    return open_session(path, session_options(HostOptions()), ["CPUExecutionProvider"])


def compare(
    contract: ComponentContract, precision: str, backend: str, cases: Sequence[Case], outputs: Sequence[Sequence[np.ndarray]]
) -> ParityResult:
    """`outputs` (per case, every output in contract order) against each case's fp32 reference, at the
    contract's `precision` tolerance."""
    tolerance = contract.tolerance[precision]
    errors, bounds = [], []
    for case, got in zip(cases, outputs):
        err, bound = worst_output(
            [_max_abs_err(g, w) for g, w in zip(got, case.outputs)], [tolerance.bound(w) for w in case.outputs]
        )
        errors.append(err)
        bounds.append(bound)
    return ParityResult(contract.name, precision, backend, [c.shapes for c in cases], errors, bounds)


def check_onnx(
    path: Path, contract: ComponentContract, precision: str, cases: Sequence[Case], progress: ItemCallback | None = None
) -> ParityResult:
    """Run the ONNX file in ONNX Runtime (CPU) on every case; compare with the fp32 reference.
    `progress(label)` after each case."""
    session = ort_session(path)
    out_names = [t.name for t in contract.outputs]
    outputs = []
    for case in cases:
        outputs.append(session.run(out_names, case.inputs))
        if progress is not None:
            progress(case.label)
    return compare(contract, precision, ORT_BACKEND, cases, outputs)


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
