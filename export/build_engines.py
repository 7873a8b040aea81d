"""Command line of the export build: `python export/build_engines.py --model SRC --out DIR [--fp16] ...`
(installed as the console script `ldm-rt-export`).

Without --model it exports the shipped default model; without --out it writes ldm-rt-artifacts/<source name>
in the current folder (never into the installed package; to refresh the shipped artifacts in a checkout,
pass --out engines/default/artifacts).

Exit codes: 0 finished: everything asked for was built (TensorRT engines are built when TensorRT and a GPU
are present; without them one line says they were skipped); 1 the ONNX artifacts are finished but engines
were asked for (--engines, or --fp16 without --onnx-only) and TensorRT/CUDA is missing; 2 nothing was built
(bad arguments, an output that is not ours to replace, unreadable source, failed export or parity, a full
or read-only disk, the export extra not installed), with one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ldm_rt.runtime.atomic import explain_os_error
from ldm_rt.runtime.cli_support import OneLineParser, error_line, run
from ldm_rt.runtime.contracts import MAX_PROMPT_CHUNKS, ContractError, ShapeProfile
from ldm_rt.runtime.embeddings import EmbeddingError, parse_embedding_arg
from ldm_rt.runtime.lora import LoraError, parse_lora_arg
from ldm_rt.runtime.manifest import ArtifactError
from ldm_rt.runtime.schedulers import PREDICTION_TYPES

try:  # a runtime-only install (`pip install ldm-rt`) has no torch or onnx: main() says which extra to install
    import onnxruntime

    from ldm_rt.export import progress
    from ldm_rt.export.build import BuildOptions, build
    from ldm_rt.export.errors import ExportError
    from ldm_rt.export.onnx_export import OPSET
    from ldm_rt.export.parity import format_table
except ImportError as e:
    if (e.name or "").partition(".")[0] == "ldm_rt":
        raise  # our own package is broken: that is a bug, not a missing extra
    MISSING = e
else:
    MISSING = None

# `python export/build_engines.py` (the design's command line) or its console script `ldm-rt-export`: errors
# and usage name the command the user typed.
SCRIPT = "ldm-rt-export"
PROG = SCRIPT if Path(sys.argv[0]).name == SCRIPT else "build_engines.py"
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


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: need a positive number of GiB")
    return value


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Export a latent diffusion model to ONNX (fp32, optionally fp16), check parity against the "
        "PyTorch reference, build TensorRT engines when TensorRT and a GPU are present, and write an "
        "artifacts folder with manifest.json. With no arguments it exports the shipped default model to "
        "ldm-rt-artifacts/default in the current folder.",
        epilog="Exit status: 0 done (engines skipped with a note when TensorRT/CUDA is missing and they were not "
        "asked for); 1 ONNX artifacts done but the engines asked for (--engines, or --fp16 without --onnx-only) "
        "could not be built; 2 error (nothing built).",
    )
    src = p.add_argument_group("source")
    src.add_argument("--model", type=Path, metavar="SRC", help="ldm-rt model folder, diffusers folder or SD single file "
                     "(.safetensors/.ckpt); default: the shipped default model")
    src.add_argument("--tokenizer", type=Path, metavar="PATH",
                     help="tokenizer for a single file (diffusers tokenizer/ folder or tokenizer.json); overrides a folder's own")
    src.add_argument("--tokenizer-2", type=Path, metavar="PATH",
                     help="SDXL's second tokenizer for a single file (diffusers tokenizer_2/ folder or tokenizer.json: it "
                          "pads with its own token); an SDXL refiner file takes this one alone; overrides a folder's own")
    src.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                     help="fuse a LoRA (.safetensors, diffusers/PEFT or kohya layout; .pt/.ckpt tensors only) at SCALE "
                          "(default 1) into the weights before export; repeatable, scales add up; the manifest records each")
    src.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                     help="bake a textual-inversion embedding (.safetensors, .pt or .bin; diffusers, A1111 or SDXL "
                          "clip_l/clip_g) into the text encoders and tokenizers, trigger word TOKEN (default: the file's own, "
                          "else its name); repeatable; for TensorRT engines and the native runtime, which cannot add it at run time")
    src.add_argument("--controlnet", action="append", default=[], type=Path, metavar="CN_SRC",
                     help="add a ControlNet (diffusers ControlNetModel folder or original control_*.safetensors/.pth "
                          "file) made for this base model as the component controlnet_<k>; repeatable, in the order "
                          "`ldm-rt sample --control-image` takes their images")
    src.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                     help="what the UNet predicts; single files cannot tell (SD 2.x 768-v: v_prediction)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, metavar="DIR", help="artifacts folder: new, empty, or an earlier artifacts "
                     "folder (replaced atomically; any other folder or a file is refused); default: "
                     "ldm-rt-artifacts/<source name> in the current folder (<source name>: \"default\" for the "
                     "shipped model, else the folder name or file stem)")
    out.add_argument("--triton-repo", type=Path, metavar="DIR", help="also write a Triton model repository here (new, "
                     "empty, or one written by this tool)")
    prec = p.add_argument_group("precision and engines")
    prec.add_argument("--fp16", action="store_true", help="also export fp16 ONNX (fp32 islands where fp16 overflows) "
                      "and fp16 engines; asks for engines (exit 1 without TensorRT) unless --onnx-only")
    prec.add_argument("--engines", action="store_true", help="require TensorRT engines: exit 1 when they cannot be "
                      "built (without it they are built when TensorRT and a GPU are present, else skipped with a note)")
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
    shape.add_argument("--prompt-chunks", type=int, default=DEFAULT.prompt_chunks, metavar="N",
                       help=f"prompts of up to N text-encoder lengths (N x 75 tokens for SD's CLIP; each chunk encoded on "
                       f"its own and concatenated, as A1111 and compel do); 1 to {MAX_PROMPT_CHUNKS}, default %(default)s: "
                       "longer prompts are truncated with a warning. With --static-shape every prompt takes N chunks")
    shape.add_argument("--parity-memory", type=_gib, metavar="GIB", help="memory one parity run may use; a profile "
                       "point estimated to need more is checked at the largest size that fits (said, and recorded in "
                       "the manifest); default: 85%% of the available memory")
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
    if not 1 <= args.prompt_chunks <= MAX_PROMPT_CHUNKS:
        p.error(f"--prompt-chunks must be 1 to {MAX_PROMPT_CHUNKS}, got {args.prompt_chunks}")
    profile = replace(profile, prompt_chunks=args.prompt_chunks)
    if args.engines and args.onnx_only:
        p.error("--engines and --onnx-only contradict each other; choose one")
    try:
        loras = tuple(parse_lora_arg(text) for text in args.lora)
    except LoraError as e:
        p.error(str(e))
    try:
        embeddings = tuple(parse_embedding_arg(text) for text in args.embedding)
    except EmbeddingError as e:
        p.error(str(e))
    return BuildOptions(
        model=args.model,
        out=args.out,
        profile=profile,
        static_shape=args.static_shape,
        fp16=args.fp16,
        onnx_only=args.onnx_only,
        triton_repo=args.triton_repo,
        tokenizer=args.tokenizer,
        tokenizer_2=args.tokenizer_2,
        prediction_type=args.prediction_type,
        refit=args.refit,
        timing_cache=args.timing_cache,
        opset=args.opset,
        engines=args.engines,
        parity_memory=None if args.parity_memory is None else int(args.parity_memory * 2**30),
        loras=loras,
        embeddings=embeddings,
        controlnets=tuple(args.controlnet),
    )


def _error(message: str) -> int:
    print(error_line(PROG, message), file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """The exit status (module docstring); Ctrl-C and a closed stdout as every ldm-rt command (runtime/cli_support.py)."""
    return run(PROG, lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    if MISSING is not None:
        what = MISSING.name or (str(MISSING).splitlines() or [type(MISSING).__name__])[0]
        return _error(f"the export toolchain needs {what}, which cannot be imported (a runtime-only install?); "
                      "pip install 'ldm-rt[export]'")  # fmt: skip
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # ONNX Runtime's own notices (fp16 nodes it cannot constant-fold, unsqueezes it keeps) are not the user's concern.
    onnxruntime.set_default_logger_severity(1 if args.verbose else 3)
    options = options_from_args(args, p)
    # Progress lines (export/progress.py) go to stderr whatever the log level: a build takes minutes.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    progress_log = logging.getLogger(progress.__name__)
    progress_log.addHandler(handler)
    progress_log.setLevel(logging.INFO)
    progress_log.propagate = False
    try:
        result = build(options)
    except (ExportError, ContractError, ArtifactError) as e:
        return _error(str(e))
    except OSError as e:  # a full or read-only disk, a path that cannot be created: the user's to fix
        where = "" if e.filename is not None else f"writing {options.out or 'the artifacts'}: "
        return _error(where + explain_os_error(e))
    finally:
        progress_log.removeHandler(handler)
    print(format_table(result.parity))
    print(f"artifacts: {result.out}")
    if result.triton_models:
        print(f"triton repository: {options.triton_repo} ({', '.join(result.triton_models)})")
    for note in result.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    if result.tensorrt_error is not None:
        if options.engines_required:
            asked = "--engines" if options.engines else "--fp16 (without --onnx-only)"
            print(error_line(PROG, f"{asked} asks for TensorRT engines, but {result.tensorrt_error}"), file=sys.stderr)
            return 1
        print(f"{PROG}: note: engines skipped: {result.tensorrt_error}; pass --engines to make this an error", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
