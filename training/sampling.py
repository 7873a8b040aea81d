"""A minimal text-to-image sampling loop for the trainers' preview grids: latent diffusion (Rombach et al.
2022, Sec. 3.3) through our numpy schedulers, with classifier-free guidance (Ho & Salimans 2022, eq. 6).

Randomness follows the runtime pipeline's convention: one `np.random.default_rng(seed)`, the initial
latents drawn first as float32 standard normals, then each stochastic step's noise.
"""

from __future__ import annotations

import numpy as np
import torch

from ldm_rt.reference.ldm import LatentDiffusion
from ldm_rt.runtime.schedulers.base import Scheduler
from ldm_rt.runtime.tokenizer import PromptTokenizer


@torch.no_grad()
def sample(
    model: LatentDiffusion,
    scheduler: Scheduler,
    latent_shape: tuple[int, int, int],
    steps: int,
    guidance: float,
    seed: int,
    tokenizer: PromptTokenizer | None = None,
    prompts: list[str] | None = None,
    labels: list[int] | None = None,
    null_label: int | None = None,
) -> torch.Tensor:
    """Images (B, 3, H, W) in about [-1, 1] for `prompts` (text model) or class `labels` (class model).

    Guidance runs the UNet once on 2B rows ordered [unconditional, conditional]: the empty prompt or
    `null_label`, as the model saw them under condition dropout in training.
    """
    device = next(model.unet.parameters()).device
    if prompts is not None:
        assert tokenizer is not None, "a text-conditional model samples with its tokenizer"
        ids = torch.from_numpy(tokenizer(list(prompts) + [""] * len(prompts)).ids).to(device)
        context = model.encode_text(ids)  # (2B, L, D): conditional then unconditional
        b = len(prompts)
        cond_kwargs = {"context": torch.cat([context[b:], context[:b]])}  # [uncond, cond]
    else:
        assert labels is not None and null_label is not None, "a class-conditional model samples with labels and a null label"
        b = len(labels)
        cond_kwargs = {"y": torch.tensor([null_label] * b + list(labels), device=device)}

    rng = np.random.default_rng(seed)
    run = scheduler.set_timesteps(steps)
    x = rng.standard_normal((b, *latent_shape), dtype=np.float32) * np.float32(run.init_noise_sigma)
    for i, t in enumerate(run.timesteps):
        x_in = torch.from_numpy(run.scale_model_input(x, i)).to(device)
        out = model.unet(torch.cat([x_in, x_in]), torch.tensor(float(t), device=device), **cond_kwargs)
        eps_uncond, eps_cond = out.float().cpu().numpy().astype(np.float32).reshape(2, b, *latent_shape)
        x = run.step(eps_uncond + np.float32(guidance) * (eps_cond - eps_uncond), i, x, generator=rng)
    return model.decode_latent(torch.from_numpy(x).to(device))
