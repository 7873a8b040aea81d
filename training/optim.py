"""AdamW with linear learning-rate warm-up (Loshchilov & Hutter 2019; warm-up as the LDM repo's
LambdaLinearScheduler, then constant) and global-norm gradient clipping."""

from __future__ import annotations

import math

import torch
from torch import nn


class TrainingDiverged(ValueError):
    """The loss, the gradients or the weights went NaN or infinite; the message names the step."""


def check_finite_step(step: int, **values: float) -> None:
    """Stop at the first step whose loss or gradient norm is not finite (AdamW would carry it into every
    weight); with DDP the averaged gradient norm is the same on every rank, so all ranks stop together."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"step {step}: {name} is {value}, so training stopped (nothing after the last checkpoint is kept); "
                "lower lr or set grad_clip, then resume with --resume or start over"
            )


def make_adamw(params, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(params), lr=lr, betas=betas, weight_decay=weight_decay)


def warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear from base_lr / warmup_steps at step 0 to base_lr at step warmup_steps - 1, then constant."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_and_step(optimizer: torch.optim.Optimizer, module: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (skipped when max_norm <= 0), step; returns the norm before clipping."""
    params = [p for p in module.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))) if params else 0.0
    optimizer.step()
    return norm
