"""Peer: diffusers' StableDiffusionPipeline, or StableDiffusionXLPipeline (the spec's `pipeline`), PyTorch eager,
CPU, on a diffusers-layout folder.

Same prompt, steps, DDIM scheduler (eta 0), guidance and initial noise as ldm-rt: the noise is the .npy the
harness drew with numpy, passed as `latents` (diffusers multiplies it by init_noise_sigma, as ldm-rt does),
so the images can be compared. Stages are timed with forward hooks on the text encoder and the UNet and a
wrapper around `vae.decode`; SDXL's two text encoders count as one stage (their sum), as in every peer.
"""

from __future__ import annotations

import importlib.metadata as md
import time

T_START = time.perf_counter()

from worker_common import StageClock, run_worker, to_uint8  # noqa: E402


def hook_stage(module, clock: StageClock, stage: str) -> None:
    """Time every forward call of `module` as `stage` (pre- and post-forward hooks)."""
    started: list[float] = []
    module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    module.register_forward_hook(lambda *_: clock.add(stage, time.perf_counter() - started.pop()))


def prepare(spec: dict):
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    import_s = time.perf_counter() - T_START
    torch.set_num_threads(int(spec["threads"]))
    t0 = time.perf_counter()
    if spec.get("pipeline", "StableDiffusionPipeline") == "StableDiffusionXLPipeline":
        pipe = StableDiffusionXLPipeline.from_pretrained(spec["model"])  # no safety checker in SDXL's pipeline
    else:
        pipe = StableDiffusionPipeline.from_pretrained(spec["model"], safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0

    clock = StageClock()
    for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if encoder is not None:
            hook_stage(encoder, clock, "text_encoder")
    hook_stage(pipe.unet, clock, "unet")
    pipe.vae.decode = clock.wrap("vae_decoder", pipe.vae.decode)
    latents = torch.from_numpy(np.load(spec["noise_file"])) if spec.get("noise_file") else None

    @torch.inference_mode()
    def generate():
        out = pipe(
            spec["prompt"], negative_prompt=spec["negative_prompt"] or None, height=spec["height"], width=spec["width"],
            num_inference_steps=spec["steps"], guidance_scale=spec["guidance"], num_images_per_prompt=spec["batch"],
            eta=0.0, latents=latents, output_type="np",
        )
        return to_uint8(out.images)

    versions = {name: md.version(name) for name in ("torch", "diffusers", "transformers")}
    return generate, clock, {"import_s": import_s, "load_s": load_s, "threads": torch.get_num_threads(), "versions": versions}


if __name__ == "__main__":
    run_worker(prepare)
