"""Peer: OpenVINO GenAI's Text2ImagePipeline (C++ pipeline, OpenVINO CPU plugin), in its own virtual environment.

Runs with benchmarks/.venv-ovgenai/bin/python (openvino_genai_env.py) on the OpenVINO IR that optimum-intel
exported from the same diffusers folder (fp32 weights). `precision` in the spec: "default" is what a user gets
(the CPU plugin's own inference precision: bf16 on CPUs with AVX512-BF16 or AMX, f32 elsewhere), "f32" asks for
f32 through INFERENCE_PRECISION_HINT; the precision that actually ran is reported. Same prompt, steps, DDIM
(the scheduler_config.json of the export), guidance and initial noise: the pipeline draws its latents from a
`Generator`, which here hands it the harness's noise. Stage times come from the pipeline's own performance
metrics (text encoder, every UNet call, VAE decoder). No torch is imported.
"""

from __future__ import annotations

import importlib.metadata as md
import time

T_START = time.perf_counter()

from worker_common import StageClock, run_worker  # noqa: E402

PRECISIONS = ("default", "f32", "bf16")


def plugin_config(precision: str) -> dict[str, str]:
    """The CPU plugin properties for a spec's precision ("default": none, the plugin chooses)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    return {} if precision == "default" else {"INFERENCE_PRECISION_HINT": precision}


def us_to_s(values) -> list[float]:
    """GenAI's raw per-call durations (microseconds; its get_*_duration() summaries are milliseconds)."""
    return [float(v) / 1e6 for v in values]


def prepare(spec: dict):
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    import_s = time.perf_counter() - T_START
    config = {**plugin_config(spec.get("precision", "default")), "INFERENCE_NUM_THREADS": int(spec["threads"])}
    t0 = time.perf_counter()
    pipe = ov_genai.Text2ImagePipeline(spec["model"], "CPU", **config)
    load_s = time.perf_counter() - t0
    # The plugin's default where none is asked for: bf16 on CPUs it can run bf16 on, f32 elsewhere.
    ran = config.get("INFERENCE_PRECISION_HINT") or ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    noise = np.load(spec["noise_file"]) if spec.get("noise_file") else None

    class HarnessNoise(ov_genai.Generator):
        """The harness's initial noise as the pipeline's latents (eta 0: DDIM asks for no other draws)."""

        def next(self) -> float:
            raise RuntimeError("the pipeline asked for a scalar random number; only the initial latents are provided")

        def randn_tensor(self, shape):
            if tuple(shape) != noise.shape:
                raise RuntimeError(f"the pipeline asked for latents of shape {tuple(shape)}, the harness drew {noise.shape}")
            return ov.Tensor(np.ascontiguousarray(noise))

    clock = StageClock()

    def generate():
        kwargs = {"generator": HarnessNoise()} if noise is not None else {"rng_seed": int(spec["seed"])}
        if spec["negative_prompt"]:
            kwargs["negative_prompt"] = spec["negative_prompt"]
        image = pipe.generate(spec["prompt"], width=spec["width"], height=spec["height"], num_inference_steps=spec["steps"],
                              guidance_scale=spec["guidance"], num_images_per_prompt=spec["batch"], **kwargs)
        metrics = pipe.get_performance_metrics()
        clock.add("text_encoder", sum(metrics.get_text_encoder_infer_duration().values()) / 1e3)
        for seconds in us_to_s(metrics.raw_metrics.unet_inference_durations):
            clock.add("unet", seconds)
        clock.add("vae_decoder", metrics.get_vae_decoder_infer_duration() / 1e3)
        return np.asarray(image.data)

    versions = {name: md.version(name) for name in ("openvino-genai", "openvino", "openvino-tokenizers")}
    return generate, clock, {"import_s": import_s, "load_s": load_s, "threads": int(spec["threads"]), "versions": versions, "precision": ran}


if __name__ == "__main__":
    run_worker(prepare)
