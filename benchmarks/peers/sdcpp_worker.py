"""Peer: stable-diffusion.cpp (ggml, CPU) through stable-diffusion-cpp-python, in its own virtual environment.

Runs with benchmarks/.venv-sdcpp/bin/python (sdcpp_env.py) on the single-file original-layout checkpoint that
benchmarks/single_file.py wrote from the same diffusers folder, in f16 as its users' SD 1.5 files are
(`wtype="default"` keeps the file's types). It loads SD 1.x/2.x/XL shapes only (it recognises the model by
its tensor names and sizes and has CLIP's BPE vocabulary built in), so it runs on the SD 1.5-sized workload.

What differs from the other peers, and why the image is not compared with ldm-rt's: its scheduler closest to
our DDIM (eta 0, leading spacing) is `ddim_trailing` (DDIM with trailing timestep spacing), it draws its own
initial noise (no latents argument) and it tokenizes with CLIP's BPE, not the workload's word-level
tokenizer. Same prompt, steps, guidance and size. Per-step times come from its progress callback (the time
of each sampling step: both guidance rows of the UNet); it reports no text-encoder or VAE times.
"""

from __future__ import annotations

import importlib.metadata as md
import time

T_START = time.perf_counter()

from worker_common import StageClock, run_worker  # noqa: E402

SAMPLER = "ddim_trailing"  # stable-diffusion.cpp's DDIM; its timesteps are spaced from the end of the schedule
SCHEDULER = "discrete"


def step_recorder(clock: StageClock, steps: int):
    """The progress callback: (step, steps, seconds of that step) for each sampling step; other progress
    (tensor loading reports its own counts) is ignored."""

    def record(step: int, total: int, seconds: float) -> None:
        if total == steps and seconds > 0:
            clock.add("unet", float(seconds))

    return record


def prepare(spec: dict):
    import numpy as np
    from stable_diffusion_cpp import StableDiffusion

    import_s = time.perf_counter() - T_START
    t0 = time.perf_counter()
    sd = StableDiffusion(model_path=spec["model"], n_threads=int(spec["threads"]), wtype="default", vae_decode_only=True,
                         flash_attn=bool(spec.get("flash_attn", False)), verbose=False)
    load_s = time.perf_counter() - t0
    clock = StageClock()
    record = step_recorder(clock, int(spec["steps"]))

    def generate():
        images = sd.generate_image(spec["prompt"], negative_prompt=spec["negative_prompt"], width=spec["width"], height=spec["height"],
                                   cfg_scale=spec["guidance"], sample_method=SAMPLER, scheduler=SCHEDULER, sample_steps=spec["steps"],
                                   eta=0.0, seed=int(spec["seed"]), batch_count=spec["batch"], progress_callback=record)
        return np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])

    versions = {name: md.version(name) for name in ("stable-diffusion-cpp-python",)}
    info = {"import_s": import_s, "load_s": load_s, "threads": int(spec["threads"]), "versions": versions, "precision": "f16",
            "sampler": f"{SAMPLER} ({SCHEDULER})"}
    return generate, clock, info


if __name__ == "__main__":
    run_worker(prepare)
