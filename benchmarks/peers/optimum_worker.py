"""Peer: Hugging Face Optimum's ORTStableDiffusionPipeline, or ORTStableDiffusionXLPipeline (the spec's `pipeline`
with "ORT" in front), ONNX Runtime, CPU, in its own virtual environment.

Runs with benchmarks/.venv-optimum/bin/python (made by optimum_env.py) on the ONNX folder Optimum's own
exporter wrote from the same diffusers-layout weights. Session options are Optimum's defaults (what a user
gets). Same prompt, steps, DDIM (eta 0), guidance and initial noise as ldm-rt; stages are timed by wrapping
the `forward` of the text encoder, UNet and VAE decoder sessions.
"""

from __future__ import annotations

import importlib.metadata as md
import time

T_START = time.perf_counter()

from worker_common import StageClock, run_worker, to_uint8  # noqa: E402


def prepare(spec: dict):
    import numpy as np
    import torch
    from diffusers import DDIMScheduler
    from optimum.onnxruntime import ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline

    import_s = time.perf_counter() - T_START
    torch.set_num_threads(int(spec["threads"]))  # the pipeline's own tensor math between sessions
    t0 = time.perf_counter()
    sdxl = spec.get("pipeline", "StableDiffusionPipeline") == "StableDiffusionXLPipeline"
    pipe = (ORTStableDiffusionXLPipeline if sdxl else ORTStableDiffusionPipeline).from_pretrained(spec["model"], provider="CPUExecutionProvider")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0

    clock = StageClock()
    for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):  # SDXL's two: one stage, their sum
        if encoder is not None:
            encoder.forward = clock.wrap("text_encoder", encoder.forward)
    pipe.unet.forward = clock.wrap("unet", pipe.unet.forward)
    pipe.vae_decoder.forward = clock.wrap("vae_decoder", pipe.vae_decoder.forward)
    latents = torch.from_numpy(np.load(spec["noise_file"])) if spec.get("noise_file") else None

    def generate():
        out = pipe(
            spec["prompt"], negative_prompt=spec["negative_prompt"] or None, height=spec["height"], width=spec["width"],
            num_inference_steps=spec["steps"], guidance_scale=spec["guidance"], num_images_per_prompt=spec["batch"],
            eta=0.0, latents=latents, output_type="np",
        )
        return to_uint8(out.images)

    versions = {name: md.version(name) for name in ("optimum-onnx", "optimum", "onnxruntime", "diffusers", "transformers", "torch")}
    threads = pipe.unet.session.get_session_options().intra_op_num_threads or "ORT default (physical cores)"
    return generate, clock, {"import_s": import_s, "load_s": load_s, "threads": threads, "versions": versions}


if __name__ == "__main__":
    run_worker(prepare)
