"""bf16 parity: what computing a component in bf16 (`ldm-rt sample --backend openvino --bf16`) does to its
outputs, checked at export against the fp32 reference and recorded in the manifest beside fp32's parity.

Two measures, on the same cases as fp32's parity:
- emulated, on every CPU: the reference model with every float tensor an operator reads or writes rounded to
  bf16 while the operator computes in f32: bf16 storage with f32 accumulation, which is what OpenVINO's CPU
  plugin does in bf16 (AVX512-BF16 and AMX dot products accumulate in f32). torch's own bf16 kernels cannot
  stand in: on CPUs without AVX512-BF16 its bf16 convolution is ~90x slower than f32 (a 3x3, 320-channel
  convolution here). Slightly pessimistic: OpenVINO keeps the graph's tail after its last matmul or
  convolution in f32, where this rounds every operator.
- measured, where OpenVINO computes in bf16 (AVX512-BF16 or AMX) and is installed: the exported fp32 ONNX file
  compiled exactly as the runtime's OpenVINO backend compiles it with `--bf16`.

A component over its bf16 bound (runtime/contracts.py) does not fail the build, whose files are the fp32 ones:
its manifest records the failure, and `--bf16` then refuses the model where OpenVINO's own bf16 failed, and warns
where only the emulation did (runtime/manifest.py `bf16_failure`): the emulation can be more pessimistic than
OpenVINO, so it informs but does not forbid. Small models with random weights can fail it (the tiny SDXL of the
tests: 21 % of max|reference| on its UNet, 5 mean / 36 max levels end to end), trained ones are not expected to.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from ldm_rt.export.progress import ItemCallback
from ldm_rt.export.parity import Case, ParityResult, compare, reference_cases
from ldm_rt.runtime.backends.base import BackendError, HostOptions
from ldm_rt.runtime.backends.openvino_backend import DEVICE, compile_config, has_bf16, import_openvino
from ldm_rt.runtime.contracts import ComponentContract

EMULATED_BACKEND = "torch-bf16-emulated"
OPENVINO_BACKEND = "openvino-cpu-bf16"


def _round(x: Any) -> Any:
    """A float32 tensor rounded to the nearest bf16 value (kept in float32); anything else as it is."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
        return x.to(torch.bfloat16).to(torch.float32)
    return x


class RoundToBf16(TorchDispatchMode):
    """Every aten operator reads its float32 inputs (activations and weights alike) rounded to bf16 and writes
    its outputs rounded to bf16; it computes in f32 in between. Views pass through (they make no new values);
    in-place operators round what they wrote."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        schema = func._schema
        written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        if written:
            out = func(*args, **kwargs)
            for arg, value in zip(schema.arguments, args):
                if arg in written and isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                    value.copy_(_round(value))
            return out
        if any(r.alias_info is not None for r in schema.returns):  # a view of its input
            return func(*args, **kwargs)
        return tree_map(_round, func(*tree_map(_round, args), **tree_map(_round, kwargs)))


def emulated_parity(
    wrapper: nn.Module, contract: ComponentContract, cases: Sequence[Case], progress: ItemCallback | None = None
) -> ParityResult:
    """The reference run under RoundToBf16 on every case, against the fp32 reference outputs."""
    with RoundToBf16():
        rounded = reference_cases(wrapper, contract, [case.inputs for case in cases], progress)
    return compare(contract, "bf16", EMULATED_BACKEND, cases, [r.outputs for r in rounded])


def openvino_bf16_unavailable() -> str | None:
    """Why OpenVINO cannot compute in bf16 here (None: it can)."""
    try:
        ov = import_openvino()
    except BackendError:
        return "OpenVINO is not installed (pip install 'ldm-rt[openvino]')"
    if not has_bf16(ov.Core()):
        return "this CPU has no bf16 OpenVINO can use (AVX512-BF16 or AMX)"
    return None


def openvino_parity(
    path: Path, contract: ComponentContract, cases: Sequence[Case], progress: ItemCallback | None = None
) -> ParityResult:
    """The fp32 ONNX file on OpenVINO in bf16, compiled as the runtime compiles it with --bf16 (no compile cache:
    the build's processes are not the user's)."""
    ov = import_openvino()
    core = ov.Core()
    config = compile_config(core, HostOptions(reduced_precision=True))
    compiled = core.compile_model(core.read_model(str(path)), DEVICE, config)
    request = compiled.create_infer_request()
    ports = [compiled.output(t.name) for t in contract.outputs]
    outputs = []
    for case in cases:
        result = request.infer(case.inputs)
        outputs.append([np.asarray(result[p], np.float32) for p in ports])
        if progress is not None:
            progress(case.label)
    return compare(contract, "bf16", OPENVINO_BACKEND, cases, outputs)


def bf16_record(emulated: ParityResult, measured: ParityResult | None, unavailable: str | None) -> dict[str, Any]:
    """What the manifest keeps under the fp32 parity's "bf16" key (runtime/manifest.py reads it): `passed` is
    OpenVINO's own verdict where it was measured, the emulation's elsewhere."""
    record: dict[str, Any] = {"passed": (measured or emulated).passed, "emulated": emulated.to_dict()}
    if measured is not None:
        record["openvino"] = measured.to_dict()
    else:
        record["openvino_not_measured"] = unavailable
    return record
