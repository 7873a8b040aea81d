"""The language-neutral sampler spec: everything a native port of the sampling loop needs besides the
networks, as plain JSON, plus golden vectors that pin every scheduler's arithmetic.

    spec = sampler_spec(SchedulerConfig(), step_counts=(25,), manifest=manifest)   # -> dict (JSON-ready)
    python -m ldm_rt.runtime.sampler_spec --write-vectors tests/golden/sampler_vectors.json
    python -m ldm_rt.runtime.sampler_spec --model DIR --out spec.json

The loop a port implements, with the formulas of every scheduler, is in docs/sampler_spec.md. Tables are
produced by the runtime's own numpy schedulers (`SchedulerRun.tables()`), so the spec cannot drift from
what `Pipeline.generate` runs. Every real number in a table or vector is a float32 value written in its
shortest float32 form (`0.1` means float32(0.1)): a port parses it as float32 to get the exact bits.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_text
from .cli_support import OneLineParser, run
from .manifest import GUIDANCE, Manifest
from .params import TIME_ID_LAYOUTS
from .schedulers import SCHEDULERS, Scheduler, SchedulerConfig, SchedulerConfigError, SchedulerRun, make_scheduler

SPEC_FORMAT = "ldm-rt-sampler-spec"
VECTORS_FORMAT = "ldm-rt-sampler-vectors"
FORMAT_VERSION = 1
DEFAULT_STEP_COUNTS = (10, 20, 25, 30, 50)

# How a seed becomes numbers; the runtime, the torch reference and every backend follow it.
RANDOMNESS = {
    "generator": "numpy.random.default_rng(seed): PCG64 seeded through SeedSequence(seed)",
    "normal": "Generator.standard_normal(shape, dtype=float32): numpy's float32 ziggurat, filled in C order",
    "order": [
        "initial noise, shape (B, latent_channels, H / latent_factor, W / latent_factor), unless latents are given",
        "then, for each step in order, one draw shaped like the sample if that step uses noise (noise_steps)",
    ],
    "initial_latents": "float32(noise * float32(init_noise_sigma))",
    "port_note": (
        "to reproduce a seed bit for bit a port must replicate PCG64 + SeedSequence + the float32 ziggurat; "
        "otherwise take the initial noise and the per-step noise as inputs, as the golden vectors do"
    ),
}

# Golden vectors: a fixed "model" a port evaluates without a network, on a tiny latent.
VECTOR_SEED = 0
VECTOR_SHAPE = (1, 4, 2, 2)  # (B, C, h, w)
VECTOR_CONFIGS = {
    "sd-v1": SchedulerConfig(),  # Stable Diffusion v1's scheduler_config.json
    "v-prediction": replace(SchedulerConfig(), prediction_type="v_prediction"),  # SD 2 (768 px) style
}
VECTOR_STEP_COUNTS = {"sd-v1": (4, 20), "v-prediction": (4,)}
MODEL_OUTPUT_FORMULA = "float32(0.1 * x_in + 0.01 * t / 1000), evaluated in float64 from float32 x_in and float32 t"


class SamplerSpecError(ValueError):
    """The spec cannot be built for these arguments; the message names the argument and the fix."""


def vector_model_output(x_in: np.ndarray, t: float | np.ndarray) -> np.ndarray:
    """The golden vectors' stand-in for the UNet (MODEL_OUTPUT_FORMULA), elementwise in t if t is an array."""
    t64 = np.asarray(t, dtype=np.float32).astype(np.float64)
    if t64.ndim == 1:
        t64 = t64[:, None, None, None]  # (B, 1, 1, 1): one timestep per batch row
    return (0.1 * np.asarray(x_in, dtype=np.float32).astype(np.float64) + 0.01 * t64 / 1000.0).astype(np.float32)


def f32(values: Any) -> Any:
    """float32 numbers (scalar or nested array) as Python floats in their shortest float32 form."""
    a = np.asarray(values, dtype=np.float32)
    if a.ndim == 0:
        return float(str(a[()]))
    return [f32(v) for v in a] if a.ndim > 1 else [float(str(v)) for v in a]


# ---- the spec ------------------------------------------------------------------------------------------
def sampler_spec(
    scheduler_config: SchedulerConfig | dict[str, Any],
    step_counts: Sequence[int] | None = None,
    schedulers: Sequence[str] = tuple(SCHEDULERS),
    manifest: Manifest | None = None,
) -> dict[str, Any]:
    """Per scheduler and step count: timesteps, sigmas / alpha_bar per step, init_noise_sigma, which steps
    draw noise, and the formula parameters; with a manifest also the model facts, tokenizer file,
    component contracts and guidance convention. JSON-ready (strict: no NaN or Infinity).
    `step_counts` defaults to those of DEFAULT_STEP_COUNTS the config's num_train_timesteps allows."""
    config = scheduler_config if isinstance(scheduler_config, SchedulerConfig) else SchedulerConfig.from_dict(scheduler_config)
    unknown = [name for name in schedulers if name not in SCHEDULERS]
    if unknown:
        raise SamplerSpecError(f"unknown schedulers {unknown}; choose from {', '.join(SCHEDULERS)}")
    if step_counts is None:
        step_counts = [n for n in DEFAULT_STEP_COUNTS if n <= config.num_train_timesteps] or [config.num_train_timesteps]
    counts = [int(n) for n in step_counts]
    if not counts or any(not 1 <= n <= config.num_train_timesteps for n in counts):
        raise SamplerSpecError(f"step_counts must be ints in [1, {config.num_train_timesteps}], got {list(step_counts)}")
    base_alphas = make_scheduler("ddim", config).alphas_cumprod
    spec: dict[str, Any] = {
        "format": SPEC_FORMAT,
        "format_version": FORMAT_VERSION,
        "doc": "docs/sampler_spec.md",
        "config": config.to_dict(),
        "alphas_cumprod": f32(base_alphas),  # (num_train_timesteps,) alpha_bar_t, t = 0 .. T-1
        "randomness": RANDOMNESS,
        "guidance": dict(GUIDANCE),
        "schedulers": {name: _scheduler_entry(name, config, counts, base_alphas) for name in schedulers},
    }
    if manifest is not None:
        spec["guidance"] = dict(manifest.guidance)
        spec["model"] = _model_entry(manifest)
    return spec


def _scheduler_entry(name: str, config: SchedulerConfig, counts: list[int], base_alphas: np.ndarray) -> dict[str, Any]:
    try:
        scheduler = make_scheduler(name, config)
    except SchedulerConfigError as e:
        return {"unsupported": str(e)}
    first = scheduler.set_timesteps(1)  # every scheduler takes one step; counts[0] may be refused (below)
    shared = config.to_dict()
    entry: dict[str, Any] = {
        "diffusers_class": scheduler.diffusers_class,
        # Fields this name sets over the shared config (dpmpp-2m* fix solver_order and Karras sigmas).
        "config_overrides": {k: v for k, v in scheduler.config.to_dict().items() if v != shared[k]},
        "stochastic": scheduler.is_stochastic,
        "multistep": first.multistep,
    }
    if name in ("ddim", "dpmpp-2s-a"):
        entry["eta"] = scheduler.eta
    if name == "tcd":
        entry["gamma"] = scheduler.gamma
    if not np.array_equal(scheduler.alphas_cumprod, base_alphas):
        entry["alphas_cumprod"] = f32(scheduler.alphas_cumprod)  # zero-SNR floor of the sigma schedulers
    runs = {}
    for n in counts:
        try:
            runs[str(n)] = _run_entry(scheduler.set_timesteps(n))
        except (SchedulerConfigError, ZeroDivisionError) as e:  # the runtime refuses (or fails) this run too
            runs[str(n)] = {"unsupported": str(e) or type(e).__name__}
    entry["runs"] = runs
    return entry


# Keys of SchedulerRun.tables() that the spec states once per scheduler or that a fresh run makes redundant.
_SHARED_KEYS = {"scheduler", "diffusers_class", "config", "alphas_cumprod", "all_timesteps", "begin_index", "eta", "gamma"}


def _run_entry(run: SchedulerRun) -> dict[str, Any]:
    """One run's tables; arrays indexed by step i (begin_index is 0), sigmas have one more entry (the tail)."""
    out: dict[str, Any] = {}
    for key, value in run.tables().items():
        if key in _SHARED_KEYS:
            continue
        key = key.removeprefix("all_")  # a fresh run starts at 0, so "all_*" tables are per step
        if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
            value = f32(value)
        out[key] = value
    out["timesteps"] = f32(run.timesteps) if run.timesteps.dtype.kind == "f" else run.timesteps.tolist()
    out["noise_steps"] = noise_steps(run)
    return out


class RecordingGenerator:
    """A stand-in for np.random.Generator that draws from `rng` and remembers each draw."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.draws: list[np.ndarray] = []

    def standard_normal(self, size: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        z = self.rng.standard_normal(size, dtype=dtype)
        self.draws.append(z)
        return z


def noise_steps(run: SchedulerRun) -> list[int]:
    """The step indices at which this run draws noise (stepped on a one-element sample by the scheduler itself)."""
    if not run.scheduler.is_stochastic:
        return []
    probe = run.scheduler.set_timesteps(run.num_inference_steps)
    recorder = RecordingGenerator(np.random.default_rng(0))
    x = np.ones((1, 1, 1, 1), np.float32)
    drawn = []
    for i, t in enumerate(probe.timesteps):
        before = len(recorder.draws)
        x = probe.step(vector_model_output(probe.scale_model_input(x, i), t), i, x, generator=recorder)
        if len(recorder.draws) > before:
            drawn.append(i)
    return drawn


def _model_entry(manifest: Manifest) -> dict[str, Any]:
    facts = manifest.facts
    tokenizer = None
    if manifest.tokenizer is not None:
        tokenizer = {"file": manifest.tokenizer.file, "sha256": manifest.tokenizer.sha256, "max_length": facts.context_length}
    return {
        "latent_channels": facts.latent_channels,
        "latent_factor": facts.latent_factor,  # image pixels per latent pixel
        "unet_factor": facts.unet_factor,  # latent sizes must divide by this
        "scale_factor": facts.scale_factor,  # UNet latents = autoencoder latents * scale_factor
        "autoencoder_kind": facts.autoencoder_kind,
        "num_classes": facts.num_classes,
        "tokenizer": tokenizer,
        **_sdxl_entry(manifest),
        "scheduler_config_file": manifest.scheduler.file,
        "profile": {"batch": list(manifest.profile.batch), "height": list(manifest.profile.height), "width": list(manifest.profile.width)},
        "components": {name: entry.contract.to_dict() for name, entry in manifest.components.items()},
    }


def _sdxl_entry(manifest: Manifest) -> dict[str, Any]:
    """SDXL's extra model facts (docs/sampler_spec.md, SDXL): the second tokenizer, the time-id layout, and
    whether an empty negative prompt means zero embeddings; nothing for SD 1.x/2.x."""
    facts = manifest.facts
    if facts.time_ids is None and manifest.tokenizer_2 is None:
        return {}
    tokenizer_2 = None
    if manifest.tokenizer_2 is not None:
        tokenizer_2 = {"file": manifest.tokenizer_2.file, "sha256": manifest.tokenizer_2.sha256, "max_length": facts.context_length}
    return {
        "tokenizer_2": tokenizer_2,
        "time_ids": list(TIME_ID_LAYOUTS.get(facts.time_ids, ())),  # the names, in order; sizes are (height, width)
        "force_zeros_for_empty_prompt": facts.force_zeros_for_empty_prompt,
    }


# ---- golden vectors ------------------------------------------------------------------------------------
def golden_vectors() -> dict[str, Any]:
    """Full loops of every scheduler on VECTOR_SHAPE with the fixed model output, as Pipeline runs them
    (txt2img, no guidance needed: the model is the same for both halves)."""
    cases = []
    for config_name, config in VECTOR_CONFIGS.items():
        for name in SCHEDULERS:
            try:
                scheduler = make_scheduler(name, config)
            except SchedulerConfigError:
                continue  # e.g. a prediction type the scheduler does not take
            for n in VECTOR_STEP_COUNTS[config_name]:
                cases.append(_vector_case(config_name, name, scheduler, n))
    return {
        "format": VECTORS_FORMAT,
        "format_version": FORMAT_VERSION,
        "generated_by": "python -m ldm_rt.runtime.sampler_spec --write-vectors PATH",
        "doc": "docs/sampler_spec.md",
        "model_output": MODEL_OUTPUT_FORMULA,
        "seed": VECTOR_SEED,
        "shape": list(VECTOR_SHAPE),
        "layout": "arrays are flattened in C order (B, C, h, w); numbers are float32",
        "suggested_tolerance": {"rtol": 1e-5, "atol": 1e-6},
        "configs": {k: v.to_dict() for k, v in VECTOR_CONFIGS.items()},
        "cases": cases,
    }


def _vector_case(config_name: str, name: str, scheduler: Scheduler, n: int) -> dict[str, Any]:
    rng = np.random.default_rng(VECTOR_SEED)
    noise = rng.standard_normal(VECTOR_SHAPE, dtype=np.float32)  # drawn first, as Pipeline.generate
    run = scheduler.set_timesteps(n)
    x = noise * np.float32(run.init_noise_sigma)
    recorder = RecordingGenerator(rng)
    steps = []
    for i, t in enumerate(run.timesteps):
        x_in = run.scale_model_input(x, i)
        m = vector_model_output(x_in, t)
        before = len(recorder.draws)
        x = run.step(m, i, x, generator=recorder)
        drew = len(recorder.draws) > before
        steps.append({
            "t": f32(t),
            "model_input": f32(x_in.ravel()),
            "model_output": f32(m.ravel()),
            "noise": f32(recorder.draws[-1].ravel()) if drew else None,
            "sample": f32(x.ravel()),
        })
    return {
        "config": config_name,
        "scheduler": name,
        "steps": n,
        "init_noise_sigma": f32(run.init_noise_sigma),
        "timesteps": f32(run.timesteps),
        "initial_noise": f32(noise.ravel()),
        "loop": steps,
        "final": f32(x.ravel()),
    }


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=1, allow_nan=False) + "\n")


def write_vectors(path: str | Path) -> None:
    """The golden vectors as JSON with one case per line (readable, and diffs name the case that moved)."""
    data = golden_vectors()
    cases = data.pop("cases")
    head = json.dumps(data, indent=1, allow_nan=False)[:-2]  # without the closing "\n}"
    body = ",\n".join("  " + json.dumps(case, allow_nan=False) for case in cases)
    atomic_write_text(Path(path), f'{head},\n "cases": [\n{body}\n ]\n}}\n')


# ---- command line --------------------------------------------------------------------------------------
PROG = "sampler_spec"  # errors: `sampler_spec: error: ...`; usage: how it is run


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m ldm_rt.runtime.sampler_spec",
        error_prog=PROG,
        description="Write the language-neutral sampler spec of an artifacts folder, or the golden vectors.",
    )
    parser.add_argument("--write-vectors", type=Path, metavar="PATH", help="write the golden vectors (JSON) to PATH")
    parser.add_argument("--model", type=Path, help="artifacts folder whose spec to write (default: the shipped default model)")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help=f"step counts to tabulate (default {' '.join(map(str, DEFAULT_STEP_COUNTS))})")
    parser.add_argument("--out", type=Path, help="spec output file (default: stdout)")
    args = parser.parse_args(argv)
    return run(PROG, lambda: write(args))


def write(args: argparse.Namespace) -> int:
    if args.write_vectors is not None:
        write_vectors(args.write_vectors)
        print(args.write_vectors)
        return 0
    from .artifacts import Artifacts

    artifacts = Artifacts.open(args.model)
    spec = sampler_spec(artifacts.scheduler_config, args.steps, manifest=artifacts.manifest)
    if args.out is None:
        print(json.dumps(spec, indent=1, allow_nan=False))
    else:
        write_json(args.out, spec)
        print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
