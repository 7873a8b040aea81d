"""Half-precision variants of the components, with fp32 islands where fp16 overflows.

fp16 has 5 exponent bits: anything above 65504 becomes inf, and a GroupNorm/LayerNorm whose input
is large overflows in its variance (sum of squares) before it normalises. Known spots in the SD family
are attention scores (SD 2.x, hence `upcast_attention`) and the VAE decoder's last up blocks (the
SDXL VAE, "fp16-fix"). Rather than hard-coding them, the search below runs the reference in fp16
with forward hooks on every block and:

1. keeps in fp32 the first block (in execution order, so the innermost one) whose inputs were finite
   but whose output is not; repeats until the whole output is finite. When a kept block's own output is
   beyond fp16 (the stream between blocks overflows: a residual stream past 65504 from that block on), the
   nearest enclosing module that is called is kept instead, widening until what leaves the island fits;
2. if the output is finite but further from the fp32 reference than the contract's fp16 tolerance,
   re-runs each block in fp32 on the very inputs it saw in fp16 and keeps the block with the largest
   own error (descending into a child that explains most of it); repeats.

A kept block runs with fp32 weights; hooks cast its floating inputs to fp32 and its outputs back to
fp16, so exporting the module traces those casts into the graph. Inputs and outputs of every exported
component stay float32 (the contract); `HalfPrecisionIO` casts inside the graph.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, CLIPMLP

from ldm_rt.export.errors import Fp16Error
from ldm_rt.export.parity import Case, ParityResult
from ldm_rt.export.progress import ItemCallback
from ldm_rt.reference import attention, autoencoder, unet
from ldm_rt.reference.quantizer import VectorQuantizer
from ldm_rt.runtime.contracts import ComponentContract, Tolerance

log = logging.getLogger(__name__)

# Block classes whose outputs the search watches (reference UNet/autoencoder, transformers' CLIP). Classes,
# not names: a rename is an import error here instead of a block the fp16 guard silently stops watching.
BLOCK_TYPES: tuple[type[nn.Module], ...] = (
    unet.ResBlock,  # UNet residual block
    attention.SpatialTransformer,
    attention.BasicTransformerBlock,
    attention.CrossAttention,
    attention.FeedForward,
    autoencoder.ResnetBlock,  # autoencoder residual block
    autoencoder.AttnBlock,
    autoencoder.MidBlock,
    unet.Upsample,
    unet.Downsample,
    autoencoder.Upsample,
    autoencoder.Downsample,
    CLIPEncoderLayer,
    CLIPAttention,
    CLIPMLP,
)
NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)
# Always fp32: the VQ nearest-codebook search flips between near-equal distances in fp16, which changes
# the decoded image by a whole code, not by rounding.
ALWAYS_FP32: tuple[type[nn.Module], ...] = (VectorQuantizer,)
# Inputs kept float32 inside the fp16 graph: fp16 cannot tell t=999.0 from 999.5 and the sinusoidal
# embedding (computed in fp32 by the UNet) needs the exact value.
# SDXL's time ids (pixel sizes up to thousands) likewise.
FP32_INPUTS = frozenset({"timestep", "time_ids"})
MAX_ISLANDS = 16
TORCH_FP16_BACKEND = "torch-fp16-cpu"
# A child block explaining at least this share of its parent's own error is kept instead of the parent.
DESCEND_SHARE = 0.5
# Own error (relative to the block's output range) that marks a block as the culprit: one fp16 op rounds
# at ~5e-4 and a block of a dozen ops stays near 3e-3, so 1e-2 is well above plain rounding.
MIN_OWN_ERROR = 1e-2


def is_watched(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES + BLOCK_TYPES)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Cast every floating tensor in a (nested) tuple/list/dict to `dtype`; leave the rest alone."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        items = [_cast(v, dtype) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        out = copy.copy(value)  # keeps dict subclasses such as transformers' ModelOutput
        for k in value:
            out[k] = _cast(value[k], dtype)
        return out
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _all_finite(value: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(value))


def make_fp32_island(module: nn.Module) -> None:
    """Run `module` in fp32 inside an fp16 model: fp32 weights, inputs cast up, outputs cast down."""
    module.float()

    def cast_inputs(_mod, args, kwargs):
        return _cast(args, torch.float32), _cast(kwargs, torch.float32)

    def cast_outputs(_mod, _args, output):
        return _cast(output, torch.float16)

    module.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    module.register_forward_hook(cast_outputs)


def _within(name: str, roots: Sequence[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _normalise(kept: list[str]) -> list[str]:
    """Drop islands inside other islands (an ancestor kept in fp32 covers its children)."""
    return [k for k in kept if not any(o != k and _within(k, [o]) for o in kept)]


def always_fp32(module: nn.Module, inputs: Sequence[torch.Tensor]) -> list[str]:
    """Submodules of an ALWAYS_FP32 class that this component actually runs (the VAE encoder holds the
    quantiser too, but never calls it)."""
    candidates = {name: m for name, m in module.named_modules() if isinstance(m, ALWAYS_FP32)}
    if not candidates:
        return []
    called: list[str] = []
    handles = [m.register_forward_hook(lambda *_a, n=name: called.append(n)) for name, m in candidates.items()]
    try:
        _run(module, inputs)
    finally:
        for h in handles:
            h.remove()
    return sorted(set(called))


class HalfPrecisionIO(nn.Module):
    """A component computing in fp16 with the contract's float32 inputs and outputs (casts in the graph)."""

    def __init__(self, inner: nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.inner = inner
        self.input_names = tuple(input_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        cast = [
            x if name in FP32_INPUTS or not x.is_floating_point() else x.half()
            for name, x in zip(self.input_names, inputs)
        ]
        out = self.inner(*cast)
        return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()


def _half_copy(module: nn.Module) -> nn.Module:
    """copy.deepcopy(module).half() without the fp32 copy in between (SD 1.5's UNet: 3.4 GB more at the peak):
    deepcopy takes each floating parameter and buffer from its memo, already cast to fp16."""
    memo: dict[int, Any] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point() and id(t) not in memo:
            half = t.detach().half()
            memo[id(t)] = nn.Parameter(half, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else half
    return copy.deepcopy(module, memo).half()


def half_model(reference: nn.Module, contract: ComponentContract, kept_fp32: Sequence[str]) -> HalfPrecisionIO:
    """A copy of the fp32 export wrapper in fp16, with the named submodules as fp32 islands."""
    inner = _half_copy(reference).eval()
    for name in _normalise(list(kept_fp32)):
        make_fp32_island(inner.get_submodule(name))
    return HalfPrecisionIO(inner, [t.name for t in contract.inputs]).eval()


@dataclass
class _Probe:
    """Forward hooks on the watched blocks of an fp16 model (outside islands)."""

    model: nn.Module
    skip: Sequence[str]
    watch: Callable[[nn.Module], bool] = is_watched
    twins: dict[str, nn.Module] | None = None  # fp32 copies: measure each block's own error
    first_nonfinite: str | None = None
    # The first island whose fp32 output overflows as it is cast back to fp16: the stream between blocks itself
    # passes 65504 there (a residual stream, not one block's inner activations), so a wider island is needed.
    island_overflow: str | None = None
    own_error: dict[str, float] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)

    def __enter__(self) -> _Probe:
        for name, module in self.model.named_modules():
            if name and self.watch(module) and not _within(name, self.skip):
                self.handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
            elif name in self.skip:  # an island: registered after its cast-down hook, so this sees the fp16 output
                self.handles.append(module.register_forward_hook(self._island_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _island_hook(self, name: str) -> Callable[..., None]:
        def hook(_mod, args, kwargs, output) -> None:
            if self.island_overflow is None and not _all_finite(output) and _all_finite((args, kwargs)):
                self.island_overflow = name

        return hook

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_mod, args, kwargs, output) -> None:
            if self.first_nonfinite is None and not _all_finite(output) and _all_finite((args, kwargs)):
                self.first_nonfinite = name
            if self.twins is not None and name in self.twins:
                ref = self.twins[name](*_cast(args, torch.float32), **_cast(kwargs, torch.float32))
                got, want = _tensors(output), _tensors(ref)
                if got and want and got[0].shape == want[0].shape:
                    scale = max(float(want[0].abs().max()), 1e-3)
                    self.own_error[name] = float((got[0].float() - want[0]).abs().max()) / scale

        return hook


@dataclass
class IslandSearch:
    kept_fp32: list[str]
    parity: ParityResult  # the fp16 torch reference (with these islands) against fp32, on every case


def _run(model: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.float() - ref).abs()
    return float("inf") if not bool(torch.isfinite(diff).all()) else float(diff.max())


def _case_err(out: Any, refs: Sequence[torch.Tensor], bounds: Sequence[float]) -> float:
    """The max error of the first output, or of a further output scaled to the first's bound when that one is
    further beyond its own (so `error > bounds[0]` means some output is out of bounds)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    errs = [_max_err(o, r) for o, r in zip(outs, refs)]
    return max(e if i == 0 else e * bounds[0] / b for i, (e, b) in enumerate(zip(errs, bounds)))


def called_modules(model: nn.Module, inputs: Sequence[torch.Tensor]) -> set[str]:
    """Names of the submodules whose forward runs (containers iterated by their parent's code do not: an island
    must be a module that is called, for its hooks to cast what enters and leaves it)."""
    called: set[str] = set()
    handles = [m.register_forward_hook(lambda *_a, n=name: called.add(n)) for name, m in model.named_modules() if name]
    try:
        _run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return called


def _widen(island: str, called: set[str]) -> str | None:
    """The nearest called module enclosing `island` (None: only the whole component encloses it)."""
    parts = island.split(".")
    for k in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:k]) in called:
            return ".".join(parts[:k])
    return None


def _pick_by_own_error(errors: dict[str, float]) -> str | None:
    """The block with the largest own error, or a child of it that explains most of that error; None
    when no block stands out from fp16 rounding (the error is then spread over the whole model)."""
    if not errors or max(errors.values()) < MIN_OWN_ERROR:
        return None
    best = max(errors, key=errors.__getitem__)
    while True:
        children = {n: e for n, e in errors.items() if n.startswith(best + ".")}
        if not children:
            return best
        child = max(children, key=children.__getitem__)
        if children[child] < DESCEND_SHARE * errors[best]:
            return best
        best = child


def find_fp32_islands(
    reference: nn.Module,
    contract: ComponentContract,
    cases: Sequence[Case],
    tolerance: Tolerance | None = None,
    max_islands: int = MAX_ISLANDS,
    watch: Callable[[nn.Module], bool] = is_watched,
    progress: ItemCallback | None = None,
) -> IslandSearch:
    """Blocks of `reference` (an fp32 export wrapper) to keep in fp32 so that its fp16 variant is finite
    and within `tolerance` (default: the contract's fp16 tolerance) of the fp32 outputs of every case.
    `watch` says which submodules are candidate blocks (default: the reference's blocks and norms);
    `progress(detail)` after each case of each round."""
    report = progress or (lambda _detail: None)
    tolerance = tolerance or contract.tolerance["fp16"]
    names = [t.name for t in contract.inputs]
    sets = [[torch.from_numpy(case.inputs[n]) for n in names] for case in cases]
    refs = [[torch.from_numpy(o) for o in case.outputs] for case in cases]
    bounds = [tolerance.bound(case.reference) for case in cases]
    output_bounds = [[tolerance.bound(o) for o in case.outputs] for case in cases]
    kept = always_fp32(reference, sets[0])
    called: set[str] | None = None  # called_modules(reference), when an island needs widening
    for round_ in range(1, max_islands + 2):
        model = None  # the previous round's copy is freed before the next one is made
        model = half_model(reference, contract, kept)
        errors: list[float] = []
        culprit = None
        for x, ref, bound, case, each in zip(sets, refs, bounds, cases, output_bounds):
            with _Probe(model.inner, kept, watch) as probe:
                err = _case_err(_run(model, x), ref, each)
            report(f"round {round_} ({len(kept)} fp32 islands), {case.label}: error {err:.3g} (bound {bound:.3g})")
            if probe.first_nonfinite is not None and err == float("inf"):
                culprit = probe.first_nonfinite
                log.warning("%s: %s overflows in fp16 (non-finite output); keeping it in fp32", contract.name, culprit)
                break
            if probe.island_overflow is not None and err == float("inf"):
                # The stream leaving this island is itself past fp16's range: keep the block around it in fp32,
                # widening until what leaves the island fits fp16 again (at worst the whole decoder or UNet).
                called = called if called is not None else called_modules(reference, sets[0])
                culprit = _widen(probe.island_overflow, called)
                if culprit is None:
                    raise Fp16Error(
                        f"{contract.name}: the activations leaving {probe.island_overflow} pass fp16's range up to the "
                        "component's output; build this model without --fp16"
                    )
                log.warning(
                    "%s: the activations leaving %s pass fp16's range (a residual stream); keeping %s in fp32",
                    contract.name, probe.island_overflow, culprit,
                )
                break
            if err > bound:
                if err == float("inf"):
                    raise Fp16Error(
                        f"{contract.name}: the fp16 output is not finite but no watched block is to blame; "
                        "build this model without --fp16"
                    )
                twins = {n: m for n, m in reference.named_modules() if n and watch(m) and not _within(n, kept)}
                with _Probe(model.inner, kept, watch, twins) as probe:
                    _run(model, x)
                culprit = _pick_by_own_error(probe.own_error)
                if culprit is not None:
                    log.warning(
                        "%s: fp16 error %.3g exceeds %.3g; keeping %s (own relative error %.3g) in fp32",
                        contract.name, err, bound, culprit, probe.own_error[culprit],
                    )
                break
            errors.append(err)
        if len(errors) == len(sets):
            parity = ParityResult(contract.name, "fp16", TORCH_FP16_BACKEND, [c.shapes for c in cases], errors, bounds)
            result = IslandSearch(_normalise(kept), parity)
            if result.kept_fp32:
                log.info("%s: fp16 with fp32 islands %s", contract.name, result.kept_fp32)
            return result
        if culprit is None:
            break
        kept = _normalise(kept + [culprit])
    tried = f"after keeping {len(kept)} blocks in fp32 ({', '.join(kept[:4])}{' ...' if len(kept) > 4 else ''})"
    raise Fp16Error(
        f"{contract.name}: fp16 stays beyond its tolerance {tried if kept else 'and no single block is to blame'}; "
        "build this model without --fp16"
    )
