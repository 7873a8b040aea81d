"""`ldm-rt`: sample images from built artifacts and inspect them.

    ldm-rt sample --prompt "a red cube" --steps 25 --seed 1 --out cube.png [--model DIR]
    ldm-rt info [--model DIR]

Bad input is one line on stderr ("ldm-rt: error: ..."), exit status 2, no traceback and no output file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import bench
from .images import grid, write_png
from .manifest import Manifest
from .schedulers import SCHEDULERS

PROG = "ldm-rt"
BACKENDS = ("onnxruntime", "tensorrt", "torch")
# Everything the library raises for bad input or bad artifacts is a ValueError subclass with a one-line
# message; OSError covers unreadable/unwritable files.
USER_ERRORS = (ValueError, OSError)


class CliError(ValueError):
    pass


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (the usage text is in --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(message)


def fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Lean latent diffusion sampler (numpy + ONNX Runtime / TensorRT).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    s = sub.add_parser("sample", help="generate images from a prompt", description="Generate images from a prompt.")
    s.add_argument("--prompt", default="", help="what to draw")
    s.add_argument("--negative-prompt", default="", help="what to steer away from (the unconditional half of guidance)")
    s.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; 1.0 skips the unconditional pass (default 7.5)")
    s.add_argument(
        "--guidance-rescale", type=float, default=0.0,
        help="pull the guided prediction back to the conditional one's spread, 0..1 (Lin et al.: 0.7 for zero-SNR models; default 0)",
    )  # fmt: skip
    s.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS), help="sampler (default ddim)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default: random; written into the PNG)")
    s.add_argument("--height", type=int, default=None, help="image height in pixels (default: the artifacts' optimum)")
    s.add_argument("--width", type=int, default=None, help="image width in pixels (default: the artifacts' optimum)")
    s.add_argument("--batch", type=int, default=1, help="images to generate (default 1)")
    s.add_argument("--latents", type=Path, default=None, help="FILE.npy of unit-variance initial noise (B, C, H/f, W/f) instead of drawing it")
    s.add_argument("--init-image", type=Path, default=None, help="image to start from (img2img; with --mask, inpainting)")
    s.add_argument("--strength", type=float, default=None, help="fraction of the schedule to run from the init image, in (0, 1] (default 0.8; 1.0 with --mask)")
    s.add_argument("--mask", type=Path, default=None, help="inpainting mask image: white = repaint, black = keep")
    s.add_argument("--out", type=Path, default=Path("sample.png"), help="output PNG; a batch writes NAME_0.png, NAME_1.png, ... (default sample.png)")
    s.add_argument("--grid", action="store_true", help="write a batch as one grid image at --out")
    s.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="inference backend (default onnxruntime)")
    s.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="which built precision to run (default fp32)")
    s.add_argument(
        "--provider", default=None, choices=("cpu", "cuda", "openvino"),
        help="onnxruntime execution provider (default: cuda when present, else cpu; openvino needs ldm-rt[openvino])",
    )  # fmt: skip
    s.add_argument("--threads", type=int, default=None, help="CPU threads per operator (default: one per physical core)")
    s.add_argument("--spin", action="store_true", help="idle CPU threads spin-wait between operators (default: they sleep)")
    s.add_argument(
        "--no-compile-cache", action="store_true",
        help="do not keep compiled graphs (openvino) in ~/.cache/ldm-rt for the next run",
    )  # fmt: skip
    s.add_argument("--model", type=Path, default=None, help="artifacts folder (default: the shipped default model)")
    s.add_argument("--verbose", action="store_true", help="log loading details and print per-stage timings")

    i = sub.add_parser("info", help="describe an artifacts folder", description="Describe an artifacts folder: components, precisions, profiles, parity.")
    i.add_argument("--model", type=Path, default=None, help="artifacts folder (default: the shipped default model)")
    i.add_argument("--json", action="store_true", help="print the whole manifest as JSON")

    b = sub.add_parser("bench", help="speed and memory against the PyTorch pipelines", description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(b)
    return parser


def output_paths(out: Path, count: int, as_grid: bool) -> list[Path]:
    if count == 1 or as_grid:
        return [out]
    return [out.with_name(f"{out.stem}_{k}{out.suffix or '.png'}") for k in range(count)]


def check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CliError(f"--out {path} is a folder; give a file name like {path / 'sample.png'}")
    if not parent.is_dir():
        raise CliError(f"--out {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CliError(f"--out {path} is not writable; choose another path")


def load_latents(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read --latents {path}: {e}") from None


def sample(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline  # after argument parsing, so `--help` stays fast

    check_writable(args.out)
    latents = load_latents(args.latents) if args.latents is not None else None
    if args.mask is not None and args.init_image is None:
        raise CliError("--mask needs --init-image: inpainting repaints part of an image")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be at least 1, got {args.threads}; leave it out for one per physical core")
    if args.provider is not None and args.backend != "onnxruntime":
        raise CliError(f"--provider chooses an onnxruntime execution provider; drop it or use --backend onnxruntime (not {args.backend})")
    pipe = Pipeline.load(
        args.model,
        backend=args.backend,
        precision=args.precision,
        providers=None if args.provider is None else [args.provider],
        threads=args.threads,
        spin=args.spin,
        compile_cache=not args.no_compile_cache,
    )

    bar: tqdm | None = None

    def progress(i: int, n: int, t: float, x: np.ndarray) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=n, desc="sampling", unit="step", file=sys.stderr, leave=False)
        bar.update(1)

    try:
        result = pipe.generate(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance=args.guidance,
            guidance_rescale=args.guidance_rescale,
            scheduler=args.scheduler,
            seed=args.seed,
            batch=args.batch,
            height=args.height,
            width=args.width,
            latents=latents,
            init_image=args.init_image,
            strength=args.strength,
            mask=args.mask,
            callback=progress,
        )
    finally:
        if bar is not None:
            bar.close()

    text = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "seed": result.params["seed"],
        "steps": result.params["steps"],
        "scheduler": result.params["scheduler"],
        "guidance": result.params["guidance"],
        "guidance_rescale": result.params["guidance_rescale"],
        "model_hash": result.params["model_hash"],
        "parameters": json.dumps(result.params, sort_keys=True),
        "Software": "ldm-rt",
    }
    images = [grid(result.images)] if args.grid else list(result.images)
    paths = output_paths(args.out, len(images), args.grid)
    for k, (path, image) in enumerate(zip(paths, images)):
        write_png(path, image, text | ({"batch_index": k} if len(images) > 1 else {}))
        print(path)
    if args.verbose:
        print(format_timings(result.timings), file=sys.stderr)
    return 0


def format_timings(timings: dict) -> str:
    """One line: seconds per stage in pipeline order; the UNet as total, steps and mean per step."""
    parts = []
    for stage in ("text_encoder", "vae_encoder", "unet", "vae_decoder", "total"):
        if stage not in timings:
            continue
        value = timings[stage]
        if isinstance(value, list):
            parts.append(f"{stage} {sum(value):.3f}s ({len(value)} steps, {sum(value) / max(len(value), 1):.3f}s/step)")
        else:
            parts.append(f"{stage} {value:.3f}s")
    return "timings: " + ", ".join(parts)


def worst(value: object) -> str:
    """The largest of a parity figure recorded per shape (or a single figure), for display."""
    values = value if isinstance(value, list) else [value]
    numbers = [v for v in values if isinstance(v, (int, float))]
    return f"{max(numbers):.2e}" if numbers else "?"


def describe(manifest: Manifest, root: Path) -> list[str]:
    f, prof = manifest.facts, manifest.profile
    lines = [
        f"artifacts: {root}",
        f"source: {manifest.source.get('kind', '?')} {manifest.source.get('path', '')} sha256 {manifest.source.get('sha256', '?')[:16]}",
        f"created: {manifest.created or '?'}",
        f"latents: {f.latent_channels} channels, factor {f.latent_factor}, scale {f.scale_factor}; "
        f"UNet in/out {f.unet_in_channels}/{f.unet_out_channels}; autoencoder {f.autoencoder_kind}",
        f"text: context length {f.context_length}, dim {f.context_dim}, vocab {f.vocab_size}",
        f"profile: batch {':'.join(map(str, prof.batch))}, height {':'.join(map(str, prof.height))}, "
        f"width {':'.join(map(str, prof.width))} (min:opt:max; multiple of {f.pixel_multiple}){' static' if prof.is_static else ''}",
        "components:",
    ]
    for name, entry in manifest.components.items():
        ins = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in entry.contract.inputs)
        outs = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in entry.contract.outputs)
        lines.append(f"  {name}: ({ins}) -> ({outs})")
        for precision, pe in entry.precisions.items():
            par = pe.parity
            status = "passed" if par.get("passed") else "FAILED" if par.get("passed") is False else "not checked"
            kept = f", kept fp32: {', '.join(pe.kept_fp32)}" if pe.kept_fp32 else ""
            lines.append(
                f"    {precision}: {pe.onnx.file} ({pe.onnx.bytes / 1e6:.1f} MB), parity max |err| "
                f"{worst(par.get('max_abs_err'))} (bound {worst(par.get('bound'))}) {status}{kept}"
            )
        if entry.engines:
            lines.append(f"    tensorrt engines: {', '.join(sorted(entry.engines))}")
    lines.append(f"tensorrt: {manifest.tensorrt.get('status', 'not built') if manifest.tensorrt else 'not built'}")
    lines.append("tools: " + ", ".join(f"{k} {v}" for k, v in manifest.tools.items()))
    return lines


def info(args: argparse.Namespace) -> int:
    from .artifacts import default_artifacts_dir

    root = args.model if args.model is not None else default_artifacts_dir()
    manifest = Manifest.read(root)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
    else:
        print("\n".join(describe(manifest, root)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    # The library logs under "ldm_rt" (truncated prompts, loading details); show that on stderr for this
    # call only, so main() can be called repeatedly in one process without stacking handlers.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    library = logging.getLogger("ldm_rt")
    previous_level = library.level
    library.addHandler(handler)
    library.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        return {"sample": sample, "info": info, "bench": bench.bench_command}[args.command](args)
    except USER_ERRORS as e:
        if verbose:
            library.exception("details of the error below")
        fail(str(e) or type(e).__name__)
    finally:
        library.removeHandler(handler)
        library.setLevel(previous_level)
    return 2


if __name__ == "__main__":
    sys.exit(main())
