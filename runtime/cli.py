"""`ldm-rt`: sample images from built artifacts and inspect them.

    ldm-rt sample --prompt "a red cube" --steps 25 --seed 1 --out cube.png [--model DIR]
    ldm-rt sample --model SDXL_BASE --refiner SDXL_REFINER --refiner-start 0.8 --prompt "..." --out x.png
    ldm-rt info [--model DIR]
    ldm-rt bench [--model DIR] [--runs 3]

Bad input is one line on stderr ("ldm-rt: error: ..."), exit status 2, no traceback and no output file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import bench
from .atomic import NotAFileTarget, check_file_target
from .cli_support import USER_ERRORS, OneLineParser, run
from .images import ImageOutputError, output_format, output_paths, written_by_ldm_rt
from .embeddings import parse_embedding_arg
from .lora import parse_lora_arg
from .manifest import Manifest
from .params import AESTHETIC_SCORE, MICRO_CONDITIONING, NEGATIVE_AESTHETIC_SCORE, REFINER_START, check_image_count
from .params import IMAGE_INPUT_FLAGS, check_image_inputs
from .previews import PREVIEW_KINDS, check_preview_target, write_preview
from .scheduler_choice import FALLBACK as FALLBACK_SCHEDULER
from .schedulers import SCHEDULERS, SchedulerConfig, usable_schedulers

PROG = "ldm-rt"
BACKENDS = ("onnxruntime", "openvino", "tensorrt", "torch")


class CliError(ValueError):
    pass


PROVIDERS = ("cpu", "cuda")
# SDXL micro-conditioning flags (params.MICRO_CONDITIONING): what each holds, and its default for --help.
MICRO_FLAGS = {name: "score" if "aesthetic" in name else "crop" if "crops" in name else "size" for name in MICRO_CONDITIONING}
MICRO_DEFAULTS = {
    **{name: "the output size" for name in MICRO_FLAGS if MICRO_FLAGS[name] == "size"},
    **{name: "0 0" for name in MICRO_FLAGS if MICRO_FLAGS[name] == "crop"},
    "negative_original_size": "--original-size", "negative_target_size": "--target-size",
    "negative_crops_coords_top_left": "--crops-coords-top-left",
    "aesthetic_score": AESTHETIC_SCORE, "negative_aesthetic_score": NEGATIVE_AESTHETIC_SCORE,
}  # fmt: skip


def provider_choice(value: str) -> str:
    """--provider's value; OpenVINO, an onnxruntime provider before, is refused with where it went."""
    if value.lower() == "openvino":
        raise argparse.ArgumentTypeError("openvino is a backend now: use --backend openvino")
    return value


def build_parser(help_schedulers: tuple[list[str], str] | None = None) -> argparse.ArgumentParser:
    """`help_schedulers`: for `sample --help`, the model's usable names and their description (schedulers_help)."""
    parser = OneLineParser(prog=PROG, description="Lean latent diffusion sampler (numpy + ONNX Runtime / TensorRT).")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="generate images from a prompt", description="Generate images from a prompt.")
    s.add_argument("--prompt", default="", help="what to draw")
    s.add_argument("--negative-prompt", default="", help="what to steer away from (the unconditional half of guidance)")
    s.add_argument(
        "--prompt-weighting", action="store_true",
        help="read A1111's emphasis in both prompts: (word) x1.1, [word] /1.1, (word:1.3), nesting multiplies, \\( \\) for "
        "literal brackets, BREAK starts a new chunk (default: brackets are plain text)",
    )  # fmt: skip
    s.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; 1.0 skips the unconditional pass (default 7.5)")
    s.add_argument(
        "--guidance-rescale", type=float, default=0.0,
        help="pull the guided prediction back to the conditional one's spread, 0..1 (Lin et al.: 0.7 for zero-SNR models; default 0)",
    )  # fmt: skip
    s.add_argument(
        "--scheduler", default=None, choices=list(SCHEDULERS) if help_schedulers is None else help_schedulers[0],
        help="sampler (default: the model's own, from its folder's scheduler class: euler for SDXL, euler-a for "
        "SDXL-Turbo, lcm for LCM models, ddim for the shipped model; `ldm-rt info` names it); `ldm-rt info` lists "
        "those the model can use (pndm and lms cannot sample zero-terminal-SNR models such as the default one)"
        + ("" if help_schedulers is None else f". This model: {help_schedulers[1]}"),
    )  # fmt: skip
    s.add_argument(
        "--eta", type=float, default=None,
        help="the sampler's noise, 0..1 (diffusers' eta): DDIM's eta (default 0), TCD's gamma (default 0.3), DPM++ 2S a's eta "
        "(default 1); other schedulers take none",
    )  # fmt: skip
    s.add_argument("--seed", type=int, default=None, help="random seed (default: random; written into the image file)")
    s.add_argument("--height", type=int, default=None, help="image height in pixels (default: the artifacts' optimum)")
    s.add_argument("--width", type=int, default=None, help="image width in pixels (default: the artifacts' optimum)")
    s.add_argument("--batch", type=int, default=1, help="images to generate (default 1)")
    s.add_argument("--latents", type=Path, default=None, help="FILE.npy of unit-variance initial noise (B, C, H/f, W/f) instead of drawing it")
    s.add_argument("--init-image", type=Path, default=None, help="image to start from (img2img; with --mask, inpainting)")
    s.add_argument("--strength", type=float, default=None, help="fraction of the schedule to run from the init image, in (0, 1] (default 0.8; 1.0 with --mask)")
    s.add_argument("--mask", type=Path, default=None, help="inpainting mask image: white = repaint, black = keep")
    s.add_argument(
        "--mask-blur", type=float, default=None, metavar="PX",
        help="with --mask: Gaussian radius in pixels of the seam where the kept pixels are pasted back (default 0: hard edge)",
    )  # fmt: skip
    s.add_argument(
        "--out", type=Path, default=Path("sample.png"),
        help="output image, .png, .jpg/.jpeg or .webp (parameters in PNG text chunks, else in EXIF); "
        "a batch writes NAME_0.png, NAME_1.png, ...; all or none are written (default sample.png)",
    )  # fmt: skip
    s.add_argument("--grid", action="store_true", help="write a batch as one grid image at --out")
    s.add_argument(
        "--preview", type=Path, default=None, metavar="FILE.png",
        help="write a preview of the image being sampled here (a batch as a grid), replaced atomically at each previewed step; "
        "the file must be new or an earlier preview (a user's file is never overwritten)",
    )  # fmt: skip
    s.add_argument("--preview-every", type=int, default=None, metavar="N", help="with --preview: every N steps, and the last (default 1)")
    s.add_argument(
        "--preview-kind", default=None, choices=PREVIEW_KINDS,
        help="with --preview: fast (the model's fitted latent -> RGB map, almost free; default) or full (a VAE decode each time, exact)",
    )  # fmt: skip
    s.add_argument(
        "--backend", default="onnxruntime", choices=BACKENDS,
        help="inference backend (default onnxruntime; openvino: OpenVINO's runtime on the CPU, needs ldm-rt[openvino])",
    )  # fmt: skip
    s.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="which built precision to run (default fp32)")
    s.add_argument(
        "--provider", default=None, type=provider_choice, choices=PROVIDERS,
        help="onnxruntime execution provider (default: cuda when present, else cpu)",
    )  # fmt: skip
    s.add_argument("--threads", type=int, default=None, help="CPU threads per operator (default: one per physical core; at most 4 per CPU)")
    s.add_argument(
        "--bf16", action="store_true",
        help="with --backend openvino: compute in bf16 where the CPU supports it (faster on CPUs with AMX; images within a few 8-bit levels)",
    )  # fmt: skip
    s.add_argument("--spin", action="store_true", help="with --backend onnxruntime: idle CPU threads spin-wait between operators (default: they sleep)")
    s.add_argument(
        "--no-compile-cache", action="store_true",
        help="do not keep compiled graphs (--backend openvino; ONNX Runtime's optimised graphs of large models) in "
        "~/.cache/ldm-rt for the next run",
    )  # fmt: skip
    s.add_argument("--model", type=Path, default=None, help="artifacts folder (default: the shipped default model)")
    s.add_argument(
        "--lora", action="append", default=[], metavar="FILE[:SCALE]",
        help="apply a LoRA (.safetensors, diffusers/PEFT or kohya layout) at SCALE (default 1) as the model opens; repeatable, scales add up",
    )  # fmt: skip
    s.add_argument(
        "--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
        help="a textual-inversion embedding (.safetensors, .pt or .bin; diffusers, A1111 or SDXL clip_l/clip_g) whose "
        "trigger word TOKEN (default: the file's own, else its name) then works in both prompts; repeatable",
    )  # fmt: skip
    xl = s.add_argument_group("SDXL", "base + refiner on latents, and the micro-conditioning (diffusers' names; sizes are HEIGHT WIDTH)")
    xl.add_argument("--refiner", type=Path, default=None, metavar="DIR",
                    help="an SDXL refiner's artifacts folder: it takes over from --model at --refiner-start of the schedule")
    xl.add_argument("--refiner-start", type=float, default=None, metavar="F",
                    help=f"with --refiner: the fraction of the schedule the base runs, in (0, 1) (default {REFINER_START})")
    for name, what in MICRO_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if what == "score":
            xl.add_argument(flag, type=float, default=None, metavar="S", help=f"{name} (refiner; default {MICRO_DEFAULTS[name]})")
        else:
            xl.add_argument(flag, type=int, nargs=2, default=None, metavar=("TOP", "LEFT") if what == "crop" else ("H", "W"),
                            help=f"{name} (default {MICRO_DEFAULTS[name]})")
    cn = s.add_argument_group("ControlNet", "artifacts built with --controlnet: one control image per ControlNet, in export order")
    cn.add_argument("--control-image", action="append", type=Path, default=[], metavar="IMG",
                    help="control image (canny edges, depth, pose, ...) of the next ControlNet; resized to the output size; repeatable")
    cn.add_argument("--controlnet-scale", action="append", type=float, default=[], metavar="S",
                    help="conditioning scale of the --control-image before it (default 1.0); give none or one per --control-image")
    cn.add_argument("--control-guidance-start", type=float, nargs="+", default=None, metavar="F",
                    help="fraction of the steps after which the ControlNets apply: one for all or one per ControlNet (default 0)")
    cn.add_argument("--control-guidance-end", type=float, nargs="+", default=None, metavar="F",
                    help="fraction of the steps until which the ControlNets apply: one for all or one per ControlNet (default 1)")
    cn.add_argument("--guess-mode", action="store_true",
                    help="ControlNets steer the conditional half only, coarse residuals weighted up (diffusers' guess_mode; for empty prompts)")
    s.add_argument("--verbose", action="store_true", help="log loading details and print per-stage timings")

    i = sub.add_parser("info", help="describe an artifacts folder", description="Describe an artifacts folder: components, precisions, profiles, parity.")
    i.add_argument("--model", type=Path, default=None, help="artifacts folder (default: the shipped default model)")
    i.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    i.add_argument(
        "--lora", action="append", default=[], type=Path, metavar="FILE_OR_FOLDER",
        help="also say what each LoRA file (a folder: its .safetensors files) adapts in this model, or why it cannot be applied; repeatable",
    )  # fmt: skip

    b = sub.add_parser("bench", help="time loading and sampling of this pipeline; peak memory", description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(b, BACKENDS)
    return parser


def check_writable(out: Path, paths: Sequence[Path]) -> None:
    """Before any work: the format `out` names, its folder, and every file the run will write (an existing file
    is replaced only when it is an image ldm-rt wrote; a file of the user's, a folder, device or FIFO never)."""
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise CliError(f"--out {out} is a folder; give a file name like {out / 'sample.png'}")
    try:
        for path in (out, *paths):
            check_file_target(path)
        output_format(out)
    except (NotAFileTarget, ImageOutputError) as e:
        raise CliError(f"--out {e}") from None
    if not parent.is_dir():
        raise CliError(f"--out {out}: folder {parent} does not exist; create it first")
    for path in paths:
        if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise CliError(f"--out {path} is not writable; choose another path")
        if path.exists() and not written_by_ldm_rt(path):
            raise CliError(f"--out {path} exists and is not an image ldm-rt wrote; choose a new file name (a file of yours is never replaced)")


def load_latents(path: Path) -> np.ndarray:
    """A .npy file, memory-mapped (no pickles; nothing is read into memory before the pipeline has checked
    its dtype and shape)."""
    try:
        latents = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read --latents {path}: {e}") from None
    if not isinstance(latents, np.ndarray):  # an .npz archive
        latents.close()
        raise CliError(f"--latents {path} is an .npz archive; save one array with numpy.save as FILE.npy")
    return latents


def sample(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline  # after argument parsing, so `--help` stays fast

    if args.refiner_start is not None and args.refiner is None:
        raise CliError("--refiner-start needs --refiner: the refiner takes over at that fraction of the schedule")

    loras = [parse_lora_arg(text) for text in args.lora]  # a scale that is not a number: one line, before any work
    embeddings = [parse_embedding_arg(text) for text in args.embedding]
    check_image_count(args.batch, "images (--batch)")  # before a file name is made for each
    check_writable(args.out, output_paths(args.out, max(args.batch, 1), args.grid))
    preview = preview_arguments(args)
    check_image_inputs(  # the API's rule, in the flags' names (an explicit --mask-blur 0 needs --mask too)
        init_image=args.init_image is not None, strength=args.strength is not None, mask=args.mask is not None,
        mask_blur=args.mask_blur is not None, names=IMAGE_INPUT_FLAGS,
    )  # fmt: skip
    control = control_arguments(args)
    latents = load_latents(args.latents) if args.latents is not None else None
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be at least 1, got {args.threads}; leave it out for one per physical core")
    if args.provider is not None and args.backend != "onnxruntime":
        raise CliError(f"--provider chooses an onnxruntime execution provider; drop it or use --backend onnxruntime (not {args.backend})")
    if args.bf16 and args.backend != "openvino":
        raise CliError(f"--bf16 needs --backend openvino (the {args.backend} backend computes in the artifacts' precision)")
    if args.spin and args.backend != "onnxruntime":  # the others' thread pools decide their own waiting
        raise CliError(f"--spin sets ONNX Runtime's thread pool and the {args.backend} backend ignores it; drop --spin or use --backend onnxruntime")
    if args.refiner is not None and args.mask is not None:
        raise CliError("--refiner does not inpaint; drop --refiner or --mask")
    options = dict(
        backend=args.backend,
        precision=args.precision,
        providers=None if args.provider is None else [args.provider],
        threads=args.threads,
        spin=args.spin,
        compile_cache=not args.no_compile_cache,
        reduced_precision=args.bf16,
    )
    # The base model's LoRAs, not the refiner's; the embeddings in both (the refiner reads the same prompts).
    with_embeddings = {"embeddings": embeddings} if embeddings else {}
    pipe = Pipeline.load(args.model, **options, **({"loras": loras} if loras else {}), **with_embeddings)
    refiner = Pipeline.load(args.refiner, **options, **with_embeddings) if args.refiner is not None else None
    micro = {name: tuple(v) if isinstance(v := getattr(args, name), list) else v for name in MICRO_CONDITIONING}

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
            eta=args.eta,
            prompt_weighting=args.prompt_weighting,
            scheduler=args.scheduler,
            seed=args.seed,
            batch=args.batch,
            height=args.height,
            width=args.width,
            latents=latents,
            init_image=args.init_image,
            strength=args.strength,
            mask=args.mask,
            mask_blur=0.0 if args.mask_blur is None else args.mask_blur,
            callback=progress,
            **preview,
            refiner=refiner,
            refiner_start=args.refiner_start,
            **micro,
            **control,
        )
    finally:
        if bar is not None:
            bar.close()

    for path in result.save(args.out, as_grid=args.grid):
        print(path)
    if args.verbose:
        print(format_timings(result.timings), file=sys.stderr)
    return 0


def preview_arguments(args: argparse.Namespace) -> dict:
    """Pipeline.generate's preview arguments from the flags; the --preview file checked before any work."""
    if args.preview is None:
        given = [flag for flag, value in (("--preview-every", args.preview_every), ("--preview-kind", args.preview_kind)) if value is not None]
        if given:
            raise CliError(f"{given[0]} needs --preview FILE.png: where the previews are written")
        return {}
    if args.preview_every is not None and args.preview_every < 1:
        raise CliError(f"--preview-every must be at least 1 (a preview every N steps), got {args.preview_every}")
    path = check_preview_target(args.preview)
    if path.resolve() in {p.resolve() for p in output_paths(args.out, max(args.batch, 1), args.grid)}:
        raise CliError(f"--preview {path} is also an output image (--out); give the preview its own file name")
    kind = args.preview_kind or "fast"
    return {
        "preview": lambda i, n, images: write_preview(path, images, i, n),
        "preview_every": 1 if args.preview_every is None else args.preview_every,
        "preview_kind": kind,
    }


def control_arguments(args: argparse.Namespace) -> dict:
    """Pipeline.generate's ControlNet arguments from the flags (only those given, so its defaults and checks apply)."""
    images, scales = args.control_image, args.controlnet_scale
    if scales and len(scales) != len(images):
        raise CliError(f"{len(scales)} --controlnet-scale values for {len(images)} --control-image; give one after each --control-image, or none")
    control: dict = {"control_image": list(images)} if images else {}
    if scales:
        control["controlnet_conditioning_scale"] = scales
    for name in ("control_guidance_start", "control_guidance_end"):
        values = getattr(args, name)
        if values is not None:
            control[name] = values[0] if len(values) == 1 else values
    if args.guess_mode:
        control["guess_mode"] = True
    return control


def format_timings(timings: dict) -> str:
    """One line: seconds per stage in pipeline order; the UNet as total, steps and mean per step."""
    parts = []
    for stage in ("text_encoder", "text_encoder_2", "vae_encoder", "controlnet", "unet", "vae_decoder", "preview", "total"):
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
        *[f"controlnet_{k}: {c.get('kind', '?')} {c.get('path', '')} sha256 {str(c.get('sha256', '?'))[:16]} (--control-image {k + 1})"
          for k, c in enumerate(manifest.source.get("controlnets") or []) if isinstance(c, dict)],
        f"latents: {f.latent_channels} channels, factor {f.latent_factor}, scale {f.scale_factor}; "
        f"UNet in/out {f.unet_in_channels}/{f.unet_out_channels}; autoencoder {f.autoencoder_kind}",
        f"text: context length {f.context_length}, dim {f.context_dim}, vocab {f.vocab_size}"
        + (f"; SDXL: second encoder width {f.text_encoder_2_dim}, pooled {f.pooled_dim}, {f.time_ids} time ids"
           f"{', empty negative = zeros' if f.force_zeros_for_empty_prompt else ''}" if f.time_ids is not None else ""),
        f"profile: batch {':'.join(map(str, prof.batch))}, height {':'.join(map(str, prof.height))}, "
        f"width {':'.join(map(str, prof.width))} (min:opt:max; multiple of {f.pixel_multiple}){' static' if prof.is_static else ''}"
        + (f"; prompts up to {prof.prompt_chunks} chunks of {f.context_length} tokens" if prof.prompt_chunks > 1 else ""),
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
            if isinstance(bf16 := par.get("bf16"), dict):  # export/bf16.py: OpenVINO's own where measured, else emulated
                r = bf16.get("openvino") if isinstance(bf16.get("openvino"), dict) else bf16.get("emulated")
                if isinstance(r, dict):
                    lines.append(
                        f"      computed in bf16 (--bf16, {r.get('backend')}): max |err| {worst(r.get('max_abs_err'))} "
                        f"(bound {worst(r.get('bound'))}) {'passed' if bf16.get('passed') else 'FAILED'}"
                    )
        if entry.engines:
            lines.append(f"    tensorrt engines: {', '.join(sorted(entry.engines))}")
    lines.append(f"tensorrt: {manifest.tensorrt.get('status', 'not built') if manifest.tensorrt else 'not built'}")
    lines.append("tools: " + ", ".join(f"{k} {v}" for k, v in manifest.tools.items()))
    return lines


def describe_schedulers(manifest: Manifest, root: Path) -> str:
    """One line: the --scheduler names this model can use, and why the others cannot."""
    from .artifacts import read_scheduler_config

    try:
        config: SchedulerConfig = read_scheduler_config(Path(root), manifest)
    except USER_ERRORS as e:
        return f"schedulers: unknown ({e})"
    usable, unusable = usable_schedulers(config)
    names = [f"{name} ({s.fewest_sound_steps}+ steps)" if s.fewest_sound_steps else name for name, s in usable.items()]
    refused = "".join(f"; not {name}: {reason}" for name, reason in unusable.items())
    return f"schedulers: {', '.join(names)}{refused}"


def describe_default_scheduler(manifest: Manifest) -> str:
    """What `sample` uses without --scheduler: the model folder's own, recorded by export (older builds: ddim)."""
    default = manifest.default_scheduler or f"{FALLBACK_SCHEDULER} (built before models named their own; rebuild for theirs)"
    return f"default scheduler: {default}"


def info(args: argparse.Namespace) -> int:
    from .artifacts import default_artifacts_dir

    root = args.model if args.model is not None else default_artifacts_dir()
    manifest = Manifest.read(root)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
    else:
        print("\n".join([*describe(manifest, root), describe_schedulers(manifest, root), describe_default_scheduler(manifest), describe_previews(manifest, root), *describe_embeddings(manifest), *describe_loras(manifest, root, args.lora)]))
    return 0


def describe_previews(manifest: Manifest, root: Path) -> str:
    """One line: whether fast step previews have their fitted map here, and how well it fits (runtime/previews.py)."""
    from .previews import PreviewFactors

    if manifest.preview_factors is None:
        return "previews: full only (no fast preview factors: built before step previews; rebuild or refresh_preview_factors)"
    try:
        fit = PreviewFactors.read(Path(root), manifest).fit
    except USER_ERRORS as e:
        return f"previews: fast factors unreadable ({e})"
    return f"previews: fast (latent -> RGB map fitted on this VAE, {fit.get('psnr_db', '?')} dB on held-out images) or full"


def describe_embeddings(manifest: Manifest) -> list[str]:
    """The textual-inversion embeddings baked in at export (build_engines.py --embedding), one line each."""
    baked = [r for r in manifest.source.get("embeddings") or [] if isinstance(r, dict)]
    if not baked:
        return ["embeddings: none baked in (add them at run time: --embedding FILE[:TOKEN])"]
    return ["embeddings baked in (their triggers work in every prompt):", *(
        f"  {r.get('token', '?')}: {r.get('vectors', '?')} vector(s), {Path(str(r.get('path', r.get('file', '?')))).name} sha256 {str(r.get('sha256', '?'))[:16]}"
        for r in baked
    )]  # fmt: skip


def describe_loras(manifest: Manifest, root: Path, loras: Sequence[Path]) -> list[str]:
    """What LoRAs can adapt in this model at run time, and what each of `loras` adapts (runtime/lora.py)."""
    from .lora import LoraTargets, describe_lora, describe_targets, lora_files

    if manifest.lora_targets is None:
        return ["loras: no LoRA targets recorded (built before LoRA support): rebuild to apply LoRAs at run time"]
    targets = LoraTargets.read(Path(root), manifest)
    return ["loras (modules a LoRA may adapt):", *describe_targets(targets), *(describe_lora(p, targets) for p in lora_files(loras))]


def schedulers_help(argv: Sequence[str]) -> tuple[list[str], str] | None:
    """For `sample --help` (with --model DIR, or the shipped model): the schedulers that model can take (the
    help's choices) and "a, b, ...; not x: reason; ..."; None for anything else or an unreadable model (the
    help then lists every name, and sampling a refused one names the reason)."""
    from .artifacts import default_artifacts_dir, read_scheduler_config

    if not argv or argv[0] != "sample" or not {"-h", "--help"} & set(argv):
        return None
    model = next((v for k, v in zip(argv, argv[1:]) if k == "--model"), None)
    model = next((a.split("=", 1)[1] for a in argv if a.startswith("--model=")), model)
    try:
        root = Path(model) if model is not None else default_artifacts_dir()
        config = read_scheduler_config(root, Manifest.read(root))
    except USER_ERRORS:
        return None
    usable, unusable = usable_schedulers(config)
    return list(usable), ", ".join(usable) + "".join(f"; not {name}: {reason}" for name, reason in unusable.items())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(schedulers_help(list(sys.argv[1:] if argv is None else argv))).parse_args(argv)
    verbose = getattr(args, "verbose", False)
    # The library logs under "ldm_rt" (truncated prompts, loading details); show that on stderr for this
    # call only, so main() can be called repeatedly in one process without stacking handlers.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    library = logging.getLogger("ldm_rt")

    def body() -> int:
        try:
            with warnings.catch_warnings():
                # Pillow warns about images past its size bound; here that is an error with one line (images.py).
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return {"sample": sample, "info": info, "bench": bench.bench_command}[args.command](args)
        except USER_ERRORS as e:
            if verbose and not isinstance(e, BrokenPipeError):
                library.exception("details of the error below")
            raise

    previous_level = library.level
    library.addHandler(handler)
    library.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        return run(PROG, body)
    finally:
        library.removeHandler(handler)
        library.setLevel(previous_level)


if __name__ == "__main__":
    sys.exit(main())
