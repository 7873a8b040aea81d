"""One process per device under torchrun (DistributedDataParallel: gloo on CPU, nccl on GPU).

torchrun tells each process its place through RANK / WORLD_SIZE / LOCAL_RANK (its documented contract);
without them the trainer is a single plain process. Only rank 0 logs, draws progress bars and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config_loading import TrainConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """device: "auto" (CUDA if present), "cpu" or "cuda"."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise TrainConfigError("device is 'cuda' but no CUDA GPU is visible; set device to 'cpu' or 'auto'")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistContext(rank, world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def wrap(module: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP-wrap a trained module when running distributed; gradients are averaged over ranks in backward."""
    if not ctx.enabled:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def mean_over_ranks(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Average logged scalars over processes, so rank 0 reports the whole batch."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.tolist())}


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's decision (e.g. "checkpoint now", taken on wall-clock time) for every rank."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([int(flag)], device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
