"""The export toolchain's errors: each one line naming the problem and the fix.

The CLI (`build_engines.py`) prints any `ExportError` as that one line and exits 2, except
`TensorRTUnavailable`, which ends an otherwise finished ONNX build with a note (exit 0), or with exit 1
when engines were asked for (--engines, or --fp16 without --onnx-only).
"""

from __future__ import annotations


class ExportError(ValueError):
    """Base of every export failure; the message is the whole story, one line."""


class SourceError(ExportError):
    """The model to export cannot be read (missing, corrupt, or of an unknown layout)."""


class OnnxExportError(ExportError):
    """torch.onnx.export or the ONNX checker failed on a component."""


class ParityError(ExportError):
    """An exported component differs from the reference beyond the contract's tolerance."""


class Fp16Error(ExportError):
    """No fp16 variant within tolerance could be found, even with fp32 islands."""


class TensorRTUnavailable(ExportError):
    """TensorRT or CUDA is missing; the ONNX artifacts are still usable with ONNX Runtime."""

    @classmethod
    def for_folder(cls, reason: str, folder: str) -> TensorRTUnavailable:
        return cls(
            f"TensorRT/CUDA not found: {reason}; the exported ONNX models in {folder} run with the "
            f"ONNX Runtime backend (`ldm-rt sample --model {folder}`)"
        )
