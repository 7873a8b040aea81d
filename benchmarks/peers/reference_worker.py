"""Peer: ldm-rt's PyTorch reference pipeline (eager, CPU), loaded from the same source folder ldm-rt exported.

torch_pipeline is the runtime's own sampling loop over the PyTorch networks (numpy noise drawn first, DDIM
from the model's scheduler config, one batched UNet call of [uncond, cond]), so with the same seed its images
match ldm-rt's up to float error. Stages are timed with forward hooks on the export wrappers it samples through.
"""

from __future__ import annotations

import importlib.metadata as md
import time

T_START = time.perf_counter()

from worker_common import StageClock, run_worker  # noqa: E402


def prepare(spec: dict):
    import numpy as np
    import torch

    from ldm_rt.reference.torch_backend import torch_pipeline

    import_s = time.perf_counter() - T_START
    torch.set_num_threads(int(spec["threads"]))
    t0 = time.perf_counter()
    pipe = torch_pipeline(spec["model"])
    load_s = time.perf_counter() - t0

    clock = StageClock()
    # SDXL's second text encoder counts in the text encoder's stage (their sum), as in every peer.
    for component, stage in (("text_encoder", "text_encoder"), ("text_encoder_2", "text_encoder"), ("unet", "unet"), ("vae_decoder", "vae_decoder")):
        if component in pipe.components:
            started: list[float] = []
            module = pipe.components[component].module  # the export wrapper the TorchComponent runs
            module.register_forward_pre_hook(lambda *_, s=started: s.append(time.perf_counter()))
            module.register_forward_hook(lambda *_, s=started, name=stage: clock.add(name, time.perf_counter() - s.pop()))
    latents = np.load(spec["noise_file"]) if spec.get("noise_file") else None

    def generate():
        return pipe.generate(
            spec["prompt"], negative_prompt=spec["negative_prompt"], steps=spec["steps"], guidance=spec["guidance"],
            scheduler=spec["scheduler"], seed=spec["seed"], latents=latents, height=spec["height"], width=spec["width"],
            batch=spec["batch"],
        ).images

    versions = {name: md.version(name) for name in ("torch", "transformers")}
    return generate, clock, {"import_s": import_s, "load_s": load_s, "threads": torch.get_num_threads(), "versions": versions}


if __name__ == "__main__":
    run_worker(prepare)
