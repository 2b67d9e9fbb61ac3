"""torch.distributed plumbing for the training loop: one process per device, launched by torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank among world processes; rank 0 writes every file."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> DistContext:
    """Join the process group torchrun describes in the environment (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world=world, local_rank=local)


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """Each process drives its own GPU (cuda:LOCAL_RANK); CPU processes share the CPU."""
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" and ctx.world > 1 else device


def mean_across(value: float, ctx: DistContext, device: torch.device) -> float:
    """Average a scalar over all processes."""
    if ctx.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / ctx.world


def barrier(ctx: DistContext) -> None:
    """Wait for every process (e.g. until rank 0 has written a checkpoint)."""
    if ctx.world > 1:
        dist.barrier()
