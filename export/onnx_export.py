"""Trace one component's export wrapper to ONNX, with names and dynamic axes from its contract.

The TorchScript exporter (`dynamo=False`) is used on purpose: for these models it gives a plain graph
with the contract's input names and symbolic axes straight from `dynamic_axes`, exports in seconds,
and its output runs unchanged in ONNX Runtime and TensorRT. The dynamo exporter needs a
`dynamic_shapes` spec restating every constraint (latent sizes divisible by the UNet factor, the
image tied to the latent by the VAE factor) that the contract already states, for no gain here.
Opset 17 is the first with LayerNormalization, which keeps CLIP's and the transformers' norms as one
node (TensorRT fuses it).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ldm_rt.export.errors import OnnxExportError
from ldm_rt.export.graph_cleanup import clean_file
from ldm_rt.export.memory import ReleaseWhileRunning
from ldm_rt.export.progress import ItemCallback
from ldm_rt.runtime.contracts import ComponentContract

log = logging.getLogger(__name__)

OPSET = 17
TRACE_SEED = 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def trace_inputs(contract: ComponentContract) -> tuple[torch.Tensor, ...]:
    """Inputs at the profile's opt point, in contract order (the shapes traced are then made symbolic)."""
    rng = np.random.default_rng(TRACE_SEED)
    feeds = contract.sample_inputs({}, rng, vocab_size=int(contract.extra.get("vocab_size") or 0))
    return tuple(torch.from_numpy(feeds[t.name]) for t in contract.inputs)


def export_component(
    wrapper: nn.Module, contract: ComponentContract, path: Path, opset: int = OPSET, progress: ItemCallback | None = None
) -> list[Path]:
    """Write `path` (plus `<path>.data` when the weights pass 2 GiB), cleaned and checked.
    Returns the files written; `progress(step)` after the trace and after the clean-up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The tracer writes a >2 GiB model as one file per tensor beside its output: trace into a scratch
    # folder, so only the cleaned model (and at most one .data file) lands next to `path`.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as scratch:
        traced = Path(scratch) / path.name
        _trace(wrapper, contract, traced, opset)
        if progress is not None:
            progress("traced")
        files = clean_file(traced, path, check=lambda graph: _check_io(graph, path, contract))
    if progress is not None:
        progress("cleaned up and checked")
    log.info("exported %s -> %s", contract.name, path)
    return files


def _trace(wrapper: nn.Module, contract: ComponentContract, path: Path, opset: int) -> None:
    input_names = [t.name for t in contract.inputs]
    output_names = [t.name for t in contract.outputs]
    with warnings.catch_warnings():
        # The tracer warns about Python bools taken from shapes inside torch's own group_norm checks and
        # the legacy exporter announces its deprecation; the multi-shape parity check is what guards
        # against a shape frozen into the trace.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        try:
            # The weights' file pages are given back while the exporter runs (export/memory.py ReleaseWhileRunning).
            with torch.no_grad(), ReleaseWhileRunning(wrapper.parameters()):
                torch.onnx.export(
                    wrapper.eval(),
                    trace_inputs(contract),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=contract.dynamic_axes(),
                    do_constant_folding=True,
                )
        except OSError:
            raise  # a full or read-only disk is the user's to fix, not a bug: the CLI names the path
        except Exception as e:  # the exporter raises many unrelated types; all mean the same to the user
            raise OnnxExportError(
                f"torch.onnx.export failed for {contract.name} ({_first_line(e)}); report this with the model config"
            ) from None


def _check_io(model: onnx.ModelProto, path: Path, contract: ComponentContract) -> None:
    """The graph's inputs and outputs must be exactly the contract's, in order (an unused input would be
    dropped by the exporter and silently change the interface)."""
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    want_in = [t.name for t in contract.inputs]
    want_out = [t.name for t in contract.outputs]
    if got_in != want_in or got_out != want_out:
        raise OnnxExportError(
            f"{path.name}: graph I/O {got_in} -> {got_out} differs from the contract {want_in} -> {want_out}; "
            "the export wrapper must use every contract input"
        )
