"""Peer: ldm-rt's runtime (`ldm_rt.runtime.Pipeline`: numpy + ONNX Runtime, or the backend the spec names) on
its exported artifacts. Stage times come from the pipeline's own `Result.timings`; no torch is imported."""

from __future__ import annotations

import importlib.metadata as md
import time

T_START = time.perf_counter()  # before the heavy imports: the worker reports its import time from here

from worker_common import StageClock, run_worker  # noqa: E402


def prepare(spec: dict):
    import numpy as np

    from ldm_rt.runtime.backends.base import physical_cores
    from ldm_rt.runtime.pipeline import Pipeline

    import_s = time.perf_counter() - T_START
    t0 = time.perf_counter()
    pipe = Pipeline.load(spec["model"], backend=spec.get("backend", "onnxruntime"), providers=spec.get("providers"),
                         compile_cache=spec.get("compile_cache") or False,  # never the user's cache folder
                         reduced_precision=spec.get("reduced_precision", False))
    load_s = time.perf_counter() - t0
    latents = np.load(spec["noise_file"]) if spec.get("noise_file") else None
    clock = StageClock()

    def generate():
        r = pipe.generate(
            spec["prompt"], negative_prompt=spec["negative_prompt"], steps=spec["steps"], guidance=spec["guidance"],
            scheduler=spec["scheduler"], seed=spec["seed"], batch=spec["batch"], height=spec["height"],
            width=spec["width"], latents=latents,
        )
        clock.add("text_encoder", r.timings.get("text_encoder", 0.0) + r.timings.get("text_encoder_2", 0.0))  # SDXL: both
        for seconds in r.timings["unet"]:
            clock.add("unet", seconds)
        clock.add("vae_decoder", r.timings["vae_decoder"])
        return r.images

    versions = {name: md.version(name) for name in ("onnxruntime", "numpy", "ldm-rt")}
    info = {"import_s": import_s, "load_s": load_s, "threads": physical_cores(), "versions": versions, "precision": precision(spec)}
    return generate, clock, info


def precision(spec: dict) -> str:
    """What the pipeline computes in: f32, or bf16 where OpenVINO was asked for reduced precision and the CPU has it
    (the OpenVINO backend's own rule, runtime/backends/openvino_backend.compile_config)."""
    if spec.get("backend") != "openvino" or not spec.get("reduced_precision"):
        return "f32"
    import openvino as ov

    from ldm_rt.runtime.backends.base import HostOptions
    from ldm_rt.runtime.backends.openvino_backend import compile_config

    return str(compile_config(ov.Core(), HostOptions(reduced_precision=True))["INFERENCE_PRECISION_HINT"])


if __name__ == "__main__":
    run_worker(prepare)
