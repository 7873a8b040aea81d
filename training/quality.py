"""Measure a text-to-image model on the shapes task (issue 3): prompt adherence on fresh prompts, with
classifier-free guidance (Ho & Salimans 2022), and the first stage's reconstruction PSNR on held-out images
(the first stage of Rombach et al. 2022, Sec. 3.1, whose appendix reports the same metric for its autoencoders).

    python -m ldm_rt.training.quality --model RUN/model --out RUN/quality             # an ldm-rt model folder (torch)
    python -m ldm_rt.training.quality --model engines/default/artifacts --out quality  # built artifacts (onnxruntime)

Targets: the generated shape's colour matches the prompt in >= 90 % of images, the background colour in
>= 95 %, the position in >= 80 %; autoencoder PSNR on held-out images >= 30 dB. Shape and size accuracy
are reported, not targets.

Prompts are fresh draws from the caption grammar (data_shapes.py), taken from `np.random.default_rng(seed)`
(default seed 1234): one sequential stream, independent of the trainers' data, where sample i of a run is
`default_rng([data_seed, i])` (data seed 0, held-out seed 0 + 1_000_003). "Fresh" means fresh draws: the
grammar has only 810 distinct prompts naming colour, shape, position and background, and training sees all
of them. Every prompt names those four (size in about half), so all three targets are checked on every
image. Image i uses seed `seed + i` for its initial noise, drawn exactly as `Pipeline.generate(seed=...)`
draws it for one image, so any image is reproduced alone by `ldm-rt sample --prompt P --seed S` with the
same --steps, --guidance and --scheduler (for ddim and the other deterministic samplers).

Each image is read back with `data_shapes.classify_image`; accuracy per attribute is the fraction of images
whose classified attribute equals the one the prompt names.

Writes DIR/quality.json (settings, accuracies, targets, per-prompt records), DIR/quality.md (a table for the
README) and DIR/samples.png (a grid of generated images, each prompt printed under its image).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ldm_rt.runtime.atomic import atomic_write_text
from ldm_rt.runtime.cli_support import OneLineParser, run, summary
from ldm_rt.runtime.images import write_png
from ldm_rt.runtime.manifest import MANIFEST, weights_sha256
from ldm_rt.runtime.schedulers import SCHEDULERS

from .data_shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, ShapeAttributes, caption_for, classify_image, sample_attributes
from .datasets import DataConfig, get_batch, make_dataset

logger = logging.getLogger(__name__)

MODEL_JSON = "ldm_rt_model.json"  # reference/model_folder.py's marker file
TARGETS = {"color": 0.90, "background": 0.95, "position": 0.80}  # fraction of images, from the issue
AE_PSNR_TARGET = 30.0  # dB
ATTRIBUTES = ("color", "background", "position", "shape", "size")  # scored; the last two are reported only
DISTINCT_PROMPTS = len(COLORS) * len(SHAPES) * len(POSITIONS) * len(BACKGROUNDS) * (len(SIZES) + 1)  # size said or not
SAY_SIZE_PROBABILITY = 0.5
GRID_IMAGES = 36  # 6 x 6 in samples.png
GRID_CELL = 128  # pixels per image in the grid (nearest-neighbour upscaled)

# (prompts, seeds) -> uint8 (N, H, W, 3): one image per prompt, image i from seed i. Swappable, so the
# scoring is tested with generators that draw known attributes.
ImageGenerator = Callable[[Sequence[str], Sequence[int]], np.ndarray]


class QualityError(ValueError):
    """Bad input to the quality script; the message names the problem and the fix."""


# ---- prompts ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    attributes: ShapeAttributes  # what was drawn from the grammar (size too, when the prompt does not say it)
    says_size: bool
    seed: int  # the image's noise seed


def fresh_prompts(count: int, seed: int = 1234) -> list[PromptSpec]:
    """`count` distinct prompts naming colour, shape, position and background (size with probability 1/2),
    from `np.random.default_rng(seed)`: a stream separate from every trainer's `default_rng([seed, index])`."""
    if not 1 <= count <= DISTINCT_PROMPTS:
        raise QualityError(f"count must be in [1, {DISTINCT_PROMPTS}] (the grammar's distinct full prompts), got {count}")
    rng = np.random.default_rng(seed)
    specs: list[PromptSpec] = []
    seen: set[str] = set()
    while len(specs) < count:
        attrs = sample_attributes(rng)
        says_size = bool(rng.random() < SAY_SIZE_PROBABILITY)
        prompt = caption_for(attrs, say_size=says_size)
        if prompt not in seen:  # redraw repeats: every image tests a different prompt
            seen.add(prompt)
            specs.append(PromptSpec(prompt, attrs, says_size, seed + len(specs)))
    return specs


def named_attributes(prompt: str) -> dict[str, str]:
    """The attributes a grammar prompt names (size only if it says one), read from its words."""
    found: dict[str, str] = {}
    for name, values in (("size", SIZES), ("color", COLORS), ("shape", SHAPES), ("position", POSITIONS)):
        for value in values:
            if f" {value} " in f" {prompt} ":
                found[name] = value
    for value in BACKGROUNDS:
        if f" on a {value} background" in prompt:
            found["background"] = value
    return found


# ---- scoring ------------------------------------------------------------------------------------------------
def classify(image: np.ndarray) -> ShapeAttributes | None:
    """classify_image, or None when the image holds no shape at all (e.g. a flat image): scored as wrong."""
    try:
        return classify_image(image)
    except ValueError:
        return None


def score(prompts: Sequence[str], images: np.ndarray) -> list[dict[str, Any]]:
    """One record per image: the attributes its prompt names, what the classifier reads, and which match."""
    records = []
    for prompt, image in zip(prompts, images, strict=True):
        expected = named_attributes(prompt)
        got = classify(image)
        classified = got.to_dict() if got is not None else None
        correct = {k: classified is not None and classified[k] == v for k, v in expected.items()}
        records.append({"prompt": prompt, "expected": expected, "classified": classified, "correct": correct})
    return records


def accuracies(records: Sequence[dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, int]]:
    """-> (accuracy per attribute over the images whose prompt names it, how many images that is)."""
    acc: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for name in ATTRIBUTES:
        hits = [r["correct"][name] for r in records if name in r["correct"]]
        counts[name] = len(hits)
        acc[name] = sum(hits) / len(hits) if hits else None
    return acc, counts


def generate_all(generator: ImageGenerator, specs: Sequence[PromptSpec], batch: int, progress: bool = True) -> np.ndarray:
    """All images, `batch` prompts per generator call -> uint8 (N, H, W, 3)."""
    chunks = []
    for start in tqdm(range(0, len(specs), batch), desc="quality", unit="batch", disable=not progress, dynamic_ncols=True):
        part = specs[start : start + batch]
        images = np.asarray(generator([s.prompt for s in part], [s.seed for s in part]))
        if images.dtype != np.uint8 or images.shape[0] != len(part) or images.ndim != 4 or images.shape[3] != 3:
            raise QualityError(f"the generator returned {images.dtype} {images.shape} for {len(part)} prompts; it must return uint8 (N, H, W, 3)")
        chunks.append(images)
    return np.concatenate(chunks)


def per_image_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """(N, C, h, w): image i's noise drawn as the pipelines draw it for a single image with seed i."""
    return np.concatenate([np.random.default_rng(s).standard_normal((1, *shape), dtype=np.float32) for s in seeds])


# ---- the two kinds of model ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampler:
    kind: str  # "model_folder" (torch reference) or "artifacts" (onnxruntime)
    generate: ImageGenerator
    resolution: int  # images are resolution x resolution; the held-out images too
    weights_sha256: str | None
    info: dict[str, Any]  # the model folder's training info (step, data config, ...) or the manifest's source
    ae_psnr: Callable[[DataConfig, int, int], float]  # (held-out data, images, batch) -> mean dB


def model_kind(path: Path) -> str:
    if not path.exists():
        raise QualityError(f"{path} does not exist; pass --model with an ldm-rt model folder (RUN/model) or an artifacts folder")
    if (path / MODEL_JSON).is_file():
        return "model_folder"
    if (path / MANIFEST).is_file():
        return "artifacts"
    raise QualityError(
        f"{path} is neither an ldm-rt model folder ({MODEL_JSON}) nor an artifacts folder ({MANIFEST}); "
        "pass --model RUN/model or a folder built by ldm_rt.export"
    )


def torch_ae_psnr(ae_path: Path) -> Callable[[DataConfig, int, int], float]:
    """Held-out PSNR exactly as train_autoencoder reports it (its `evaluate`), for an autoencoder folder or
    an ldm-rt model folder's autoencoder."""

    def run(data: DataConfig, count: int, batch: int) -> float:
        from .autoencoder_folder import load_autoencoder
        from .train_autoencoder import evaluate

        ae, _ = load_autoencoder(ae_path)
        return evaluate(ae, make_dataset(data, "heldout"), count, torch.device("cpu"), batch)

    return run


def model_folder_sampler(path: Path, steps: int, guidance: float, scheduler: str) -> Sampler:
    from ldm_rt.reference.model_folder import read_model_json
    from ldm_rt.reference.torch_backend import torch_pipeline

    config, info = read_model_json(path)
    if config.text_encoder is None or config.unet.num_classes is not None:
        raise QualityError(f"{path} is not prompt-conditioned (no text encoder or class labels); the quality script scores prompts")
    data = info.get("data") or {}
    resolution = int(data.get("resolution") or config.autoencoder.resolution)
    pipe = torch_pipeline(path)
    f = pipe.facts.latent_factor
    noise_shape = (pipe.facts.latent_channels, resolution // f, resolution // f)

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        latents = per_image_noise(seeds, noise_shape)
        out = pipe.generate(list(prompts), steps=steps, guidance=guidance, scheduler=scheduler, seed=seeds[0], latents=latents, height=resolution, width=resolution)
        return out.images

    return Sampler("model_folder", generate, resolution, weights_sha256(path), dict(info), torch_ae_psnr(path))


def artifacts_sampler(path: Path, steps: int, guidance: float, scheduler: str) -> Sampler:
    """Sample with the runtime Pipeline on onnxruntime (fp32): what ships. The autoencoder is measured
    through the same artifacts' vae_encoder / vae_decoder ONNX graphs."""
    from ldm_rt.runtime.pipeline import Pipeline

    from .train_autoencoder import psnr

    pipe = Pipeline.load(path, backend="onnxruntime")
    if "text_encoder" not in pipe.components or pipe.num_classes is not None:
        raise QualityError(f"{path} is not prompt-conditioned (no text encoder or class labels); the quality script scores prompts")
    facts, profile = pipe.facts, pipe.artifacts.manifest.profile
    resolution = profile.height[1]  # the size the artifacts are built for (their profile's optimum)
    max_batch = profile.batch[2]
    noise_shape = (facts.latent_channels, resolution // facts.latent_factor, resolution // facts.latent_factor)

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        out = []
        for i in range(0, len(prompts), max_batch):  # the artifacts take at most max_batch images per call
            p, s = list(prompts[i : i + max_batch]), list(seeds[i : i + max_batch])
            result = pipe.generate(
                p, steps=steps, guidance=guidance, scheduler=scheduler, seed=s[0],
                latents=per_image_noise(s, noise_shape), height=resolution, width=resolution,
            )  # fmt: skip
            out.append(result.images)
        return np.concatenate(out)

    def ae_psnr(data: DataConfig, count: int, batch: int) -> float:
        heldout = make_dataset(data, "heldout")
        step = min(batch, max_batch)
        values = []
        for start in range(0, count, step):
            x = get_batch(heldout, range(start, min(count, start + step))).images  # (B, 3, H, W) in [-1, 1]
            params = pipe.components["vae_encoder"].run({"image": x.numpy()})["latent_parameters"]
            mean = params[:, : facts.latent_channels]  # KL: [mean, logvar]; the mode, as train_autoencoder's reconstruct
            decoded = pipe.components["vae_decoder"].run({"latent": (mean * np.float32(facts.scale_factor)).astype(np.float32)})["image"]
            values.append(psnr(torch.from_numpy(decoded), x))
        return float(torch.cat(values).mean())

    source = dict(pipe.artifacts.manifest.source)
    return Sampler("artifacts", generate, resolution, source.get("sha256"), {"source": source}, ae_psnr)


def heldout_data(info: dict[str, Any], resolution: int) -> DataConfig:
    """The held-out split train_autoencoder evaluates on: the shapes data's held-out stream (data seed from
    the model's training info when it has one) at the resolution the model generates."""
    data = info.get("data") or {}
    seed = int(data.get("seed", 0)) if data.get("kind", "shapes") == "shapes" else 0
    return DataConfig(kind="shapes", resolution=resolution, seed=seed)


# ---- report -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    prompts: int = 200
    seed: int = 1234
    steps: int = 25
    guidance: float = 5.0
    scheduler: str = "ddim"
    batch: int = 25
    heldout: int = 256


def measure(
    generator: ImageGenerator, settings: Settings, ae_psnr: float | None = None, progress: bool = True
) -> tuple[dict[str, Any], list[PromptSpec], np.ndarray]:
    """Generate and score: -> (report without the model section, the prompts, their images)."""
    specs = fresh_prompts(settings.prompts, settings.seed)
    start = time.perf_counter()
    images = generate_all(generator, specs, settings.batch, progress)
    records = [{"prompt": s.prompt, "seed": s.seed, **r} for s, r in zip(specs, score([s.prompt for s in specs], images))]
    acc, counts = accuracies(records)
    met: dict[str, bool | None] = {k: acc[k] is not None and acc[k] >= t for k, t in TARGETS.items()}
    met["ae_psnr_db"] = None if ae_psnr is None else ae_psnr >= AE_PSNR_TARGET
    report = {
        "settings": {**asdict(settings), "prompt_stream": f"np.random.default_rng({settings.seed}), distinct prompts; image i seed {settings.seed} + i"},
        "accuracy": acc,
        "scored_images": counts,
        "unreadable_images": sum(r["classified"] is None for r in records),
        "ae_psnr_db": ae_psnr,
        "targets": {**TARGETS, "ae_psnr_db": AE_PSNR_TARGET},
        "met": met,
        "all_met": all(v is True for v in met.values()),
        "generation_seconds": round(time.perf_counter() - start, 2),
        "records": records,
    }
    return report, specs, images


def markdown_table(report: dict[str, Any]) -> str:
    rows = ["| attribute | measured | target | met |", "|---|---|---|---|"]
    for name in ATTRIBUTES:
        value = report["accuracy"][name]
        measured = "n/a" if value is None else f"{100 * value:.1f} % (of {report['scored_images'][name]})"
        target = f">= {100 * TARGETS[name]:.0f} %" if name in TARGETS else "reported"
        met = ("yes" if report["met"][name] else "**no**") if name in TARGETS else ""
        rows.append(f"| {name} | {measured} | {target} | {met} |")
    psnr = report["ae_psnr_db"]
    met = "" if report["met"]["ae_psnr_db"] is None else "yes" if report["met"]["ae_psnr_db"] else "**no**"
    rows.append(f"| autoencoder PSNR (held-out) | {'n/a' if psnr is None else f'{psnr:.2f} dB'} | >= {AE_PSNR_TARGET:.0f} dB | {met} |")
    return "\n".join(rows) + "\n"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def captioned_grid(images: np.ndarray, prompts: Sequence[str], columns: int | None = None, cell: int = GRID_CELL) -> np.ndarray:
    """Images upscaled to `cell` pixels (nearest) with each prompt printed under its image -> uint8 (H, W, 3)."""
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, line_height = 4, int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 2
    captions = [_wrap(probe, p, font, cell) for p in prompts]
    text_height = line_height * max(len(c) for c in captions) + pad
    cw, ch = cell + 2 * pad, cell + text_height + 2 * pad
    canvas = Image.new("RGB", (columns * cw, rows * ch), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (image, lines) in enumerate(zip(images, captions)):
        r, q = divmod(k, columns)
        x, y = q * cw + pad, r * ch + pad
        canvas.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + cell + pad // 2 + j * line_height), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def write_outputs(out: Path, report: dict[str, Any], specs: Sequence[PromptSpec], images: np.ndarray) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shown = min(GRID_IMAGES, len(images))
    grid = captioned_grid(images[:shown], [s.prompt for s in specs[:shown]])
    meta = {"model": report["model"]["path"], "weights_sha256": report["model"]["weights_sha256"], "settings": json.dumps(report["settings"])}
    write_png(out / "samples.png", grid, meta)
    atomic_write_text(out / "quality.json", json.dumps(report, indent=2) + "\n")
    model = report["model"]
    sha = (model["weights_sha256"] or "unknown")[:12]
    s = report["settings"]
    header = (
        f"Quality of `{model['path']}` ({model['kind']}, weights sha256 {sha}): {s['prompts']} fresh prompts, "
        f"{s['scheduler']} {s['steps']} steps, guidance {s['guidance']}, seed {s['seed']}; "
        f"autoencoder PSNR on {s['heldout']} held-out images.\n\n"
    )
    atomic_write_text(out / "quality.md", header + markdown_table(report))


# ---- command line -------------------------------------------------------------------------------------------
PROG = "ldm-rt-quality"  # its console script (pyproject.toml); also `python -m ldm_rt.training.quality`


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    d = Settings()
    p = OneLineParser(
        prog=PROG,
        description=summary(__doc__),
        epilog=(
            "PATH with ldm_rt_model.json is sampled with the torch reference pipeline and its autoencoder is measured "
            "in torch; PATH with manifest.json is sampled with the runtime on onnxruntime (fp32) and its autoencoder is "
            "measured through the artifacts' vae_encoder/vae_decoder ONNX. --ae-model measures another autoencoder "
            "(an autoencoder folder or an ldm-rt model folder) instead. Exit 0 when the script ran (missed targets are "
            "printed), 1 with --require-targets when a target is missed, 2 on bad input."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="an ldm-rt model folder (e.g. RUN/model) or an artifacts folder")
    p.add_argument("--prompts", type=int, default=d.prompts, help=f"fresh prompts, one image each (default {d.prompts})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"prompt stream and image seeds (default {d.seed}; the trainers never use it)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"denoising steps (default {d.steps})")
    p.add_argument("--guidance", type=float, default=d.guidance, help=f"classifier-free guidance scale (default {d.guidance})")
    p.add_argument("--scheduler", default=d.scheduler, choices=list(SCHEDULERS), help=f"sampler (default {d.scheduler})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"prompts per generation call (default {d.batch})")
    p.add_argument("--heldout", type=int, default=d.heldout, help=f"held-out images for the autoencoder PSNR (default {d.heldout})")
    p.add_argument("--ae-model", type=Path, default=None, help="measure this autoencoder (folder or model folder) instead of the model's own")
    p.add_argument("--out", type=Path, default=Path("quality"), help="output folder (default ./quality)")
    p.add_argument("--require-targets", action="store_true", help="exit 1 when a target is missed")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> str:
    """Validate everything before any work or output; -> the model kind."""
    for name in ("prompts", "steps", "batch", "heldout"):
        if getattr(args, name) < 1:
            raise QualityError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        raise QualityError(f"--seed must be >= 0, got {args.seed}")
    if not math.isfinite(args.guidance):
        raise QualityError(f"--guidance must be a finite number, got {args.guidance}")
    if args.out.exists() and not args.out.is_dir():
        raise QualityError(f"--out {args.out} is a file; pass a folder")
    if args.ae_model is not None and not args.ae_model.is_dir():
        raise QualityError(f"--ae-model {args.ae_model} is not a folder; pass an autoencoder folder or an ldm-rt model folder")
    if args.prompts > DISTINCT_PROMPTS:
        raise QualityError(f"--prompts must be at most {DISTINCT_PROMPTS} (the grammar's distinct full prompts), got {args.prompts}")
    return model_kind(args.model)


def measure_and_write(args: argparse.Namespace) -> dict[str, Any]:
    kind = check_args(args)
    settings = Settings(args.prompts, args.seed, args.steps, args.guidance, args.scheduler, args.batch, args.heldout)
    make = model_folder_sampler if kind == "model_folder" else artifacts_sampler
    sampler = make(args.model, settings.steps, settings.guidance, settings.scheduler)
    data = heldout_data(sampler.info, sampler.resolution)
    ae = sampler.ae_psnr if args.ae_model is None else torch_ae_psnr(args.ae_model)
    ae_psnr = ae(data, settings.heldout, settings.batch)
    logger.info("autoencoder PSNR on %d held-out images: %.2f dB", settings.heldout, ae_psnr)
    report, specs, images = measure(sampler.generate, settings, ae_psnr)
    report = {
        "model": {"path": str(args.model.resolve()), "kind": kind, "weights_sha256": sampler.weights_sha256, "info": sampler.info},
        "resolution": sampler.resolution,
        "ae_source": str(args.ae_model.resolve()) if args.ae_model is not None else f"the model's own ({kind})",
        "heldout_data": asdict(data),
        **report,
    }
    write_outputs(args.out, report, specs, images)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def body() -> int:
        report = measure_and_write(args)
        print(markdown_table(report), end="")
        missed = [k for k, v in report["met"].items() if v is False]
        print(f"wrote {args.out}/quality.json, quality.md, samples.png; " + (f"missed: {', '.join(missed)}" if missed else "all targets met"))
        return 1 if missed and args.require_targets else 0

    return run(PROG, body)  # every error of ours is a ValueError with a one-line message


if __name__ == "__main__":
    raise SystemExit(main())
