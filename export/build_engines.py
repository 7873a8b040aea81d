"""Command line of the export build: `python export/build_engines.py --model SRC --out DIR [--fp16] ...`.

With no --model and no --out it rebuilds the shipped default model's artifacts in place
(engines/default/model -> engines/default/artifacts, replaced atomically); with --model and no --out it
writes engines/build/<source name>.

Exit codes: 0 finished (with engines, or ONNX only with --onnx-only); 1 the ONNX artifacts are finished
but TensorRT/CUDA is missing, so no engines were built; 2 nothing was built (bad arguments, unreadable
source, failed export or parity), with one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import onnxruntime

from ldm_rt.export.build import BuildOptions, build
from ldm_rt.export.errors import ExportError
from ldm_rt.export.onnx_export import OPSET
from ldm_rt.export.parity import format_table
from ldm_rt.runtime.artifacts import default_artifacts_dir
from ldm_rt.runtime.contracts import ContractError, ShapeProfile
from ldm_rt.runtime.manifest import ArtifactError

PROG = "build_engines.py"
DEFAULT = ShapeProfile()


def _range(text: str) -> tuple[int, int, int]:
    """`min:opt:max` (or a single N for a fixed size) -> (min, opt, max)."""
    parts = text.split(":")
    if len(parts) == 1:
        parts = parts * 3
    try:
        lo, opt, hi = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:OPT:MAX (three integers, e.g. 64:64:128)") from None
    if not 1 <= lo <= opt <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one --help away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog=PROG,
        description="Export a latent diffusion model to ONNX (fp32, optionally fp16), check parity against the "
        "PyTorch reference, build TensorRT engines when TensorRT and a GPU are present, and write an "
        "artifacts folder with manifest.json. With no arguments it rebuilds the shipped default model's "
        "artifacts in place (engines/default/model -> engines/default/artifacts).",
        epilog="Exit status: 0 done; 1 ONNX artifacts done but TensorRT/CUDA not found; 2 error (nothing built).",
    )
    src = p.add_argument_group("source")
    src.add_argument("--model", type=Path, metavar="SRC", help="ldm-rt model folder, diffusers folder or SD single file "
                     "(.safetensors/.ckpt); default: the shipped default model")
    src.add_argument("--tokenizer", type=Path, metavar="PATH",
                     help="tokenizer for a single file (diffusers tokenizer/ folder or tokenizer.json); overrides a folder's own")
    src.add_argument("--prediction-type", choices=("epsilon", "v_prediction", "sample"),
                     help="what the UNet predicts; single files cannot tell (SD 2.x 768-v: v_prediction)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, metavar="DIR", help="artifacts folder (replaced atomically); default: "
                     "without --model, the shipped artifacts engines/default/artifacts (a rebuild in place); with "
                     "--model, engines/build/<source name>; both in the ldm_rt.engines package")
    out.add_argument("--triton-repo", type=Path, metavar="DIR", help="also write a Triton model repository here")
    prec = p.add_argument_group("precision and engines")
    prec.add_argument("--fp16", action="store_true", help="also export fp16 ONNX (fp32 islands where fp16 overflows) "
                      "and fp16 engines")
    prec.add_argument("--onnx-only", action="store_true", help="stop after the ONNX export and parity checks (exit 0)")
    prec.add_argument("--refit", action="store_true", help="build refittable TensorRT engines (weights replaceable)")
    prec.add_argument("--timing-cache", type=Path, metavar="FILE", help="TensorRT timing cache to read and update")
    prec.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    shape = p.add_argument_group("shape profile (images per request, pixels)")
    shape.add_argument("--batch-range", type=_range, default=DEFAULT.batch, metavar="MIN:OPT:MAX",
                       help="images per prompt (default %(default)s); the UNet gets twice this under guidance")
    shape.add_argument("--height-range", type=_range, default=DEFAULT.height, metavar="MIN:OPT:MAX",
                       help="image height in pixels (default %(default)s)")
    shape.add_argument("--width-range", type=_range, default=DEFAULT.width, metavar="MIN:OPT:MAX",
                       help="image width in pixels (default %(default)s)")
    shape.add_argument("--static-shape", action="store_true",
                       help="one fixed shape (--batch, --height, --width): TensorRT profiles with min = opt = max")
    shape.add_argument("--batch", type=int, help="with --static-shape: images per prompt (default: OPT of --batch-range)")
    shape.add_argument("--height", type=int, help="with --static-shape: height (default: OPT of --height-range)")
    shape.add_argument("--width", type=int, help="with --static-shape: width (default: OPT of --width-range)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return p


def options_from_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> BuildOptions:
    fixed = (args.batch, args.height, args.width)
    if args.static_shape:
        batch, height, width = (
            v if v is not None else r[1] for v, r in zip(fixed, (args.batch_range, args.height_range, args.width_range))
        )
        if min(batch, height, width) < 1:
            p.error("--batch, --height and --width must be positive")
        profile = ShapeProfile.static(batch, height, width)
    else:
        if any(v is not None for v in fixed):
            p.error("--batch/--height/--width need --static-shape; for a dynamic profile use --batch-range etc.")
        profile = ShapeProfile(args.batch_range, args.height_range, args.width_range)
    out = args.out
    if out is None and args.model is None:
        out = default_artifacts_dir()  # the shipped model's artifacts are rebuilt where the runtime finds them
    return BuildOptions(
        model=args.model,
        out=out,
        profile=profile,
        static_shape=args.static_shape,
        fp16=args.fp16,
        onnx_only=args.onnx_only,
        triton_repo=args.triton_repo,
        tokenizer=args.tokenizer,
        prediction_type=args.prediction_type,
        refit=args.refit,
        timing_cache=args.timing_cache,
        opset=args.opset,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # ONNX Runtime's own notices (fp16 nodes it cannot constant-fold, unsqueezes it keeps) are not the user's concern.
    onnxruntime.set_default_logger_severity(1 if args.verbose else 3)
    options = options_from_args(args, p)
    try:
        result = build(options)
    except (ExportError, ContractError, ArtifactError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result.parity))
    print(f"artifacts: {result.out}")
    if result.triton_models:
        print(f"triton repository: {options.triton_repo} ({', '.join(result.triton_models)})")
    if result.tensorrt_error is not None:
        print(str(result.tensorrt_error), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
