"""Exponential moving average of model weights (Polyak averaging), as LitEma in the LDM repo: the decay
ramps up as min(decay, (1 + n) / (10 + n)) over the first updates so early weights are forgotten fast."""

from __future__ import annotations

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copies of a module's floating-point parameters and buffers, kept as buffers of this module
    (so they land in checkpoints under the same keys as the model's own state dict)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.shadow = nn.ParameterDict()
        for name, value in model.state_dict().items():
            self.shadow[name.replace(".", "__")] = nn.Parameter(value.detach().clone(), requires_grad=False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        n = int(self.num_updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for name, value in model.state_dict().items():
            shadow = self.shadow[name.replace(".", "__")]
            if value.is_floating_point():
                shadow.lerp_(value.detach(), 1.0 - decay)
            else:
                shadow.copy_(value)

    def state_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The averaged weights as a state dict of `model`."""
        return {name: self.shadow[name.replace(".", "__")].detach().clone() for name in model.state_dict()}
