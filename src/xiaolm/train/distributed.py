"""torch.distributed plumbing for the training loop: one process per device, launched by torchrun.

Two ways to spread a model: DDP (every process holds the whole model; gradients are averaged) and FSDP2
(`fully_shard`: parameters, gradients and optimizer state are split across processes, each block gathered
just in time). Optimizer state is saved with torch distributed checkpoint, which reshards on load, so a run
can resume on a different number of processes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from xiaolm.errors import XiaolmError

PARALLEL_MODES = ("ddp", "fsdp")


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
        # torn down before the interpreter's own teardown: a gloo group left to it can abort the process at exit
        # ("terminate called without an active exception") after a run that finished well
        atexit.register(dist.destroy_process_group)
    return DistContext(rank=rank, world=world, local_rank=local)


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """Each process drives its own GPU (cuda:LOCAL_RANK); CPU processes share the CPU."""
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" and ctx.world > 1 else device


def wrap_model(model: torch.nn.Module, ctx: DistContext, parallel: str) -> torch.nn.Module:
    """The module the loop runs forward/backward through: the model, DDP around it, or the model sharded."""
    if parallel not in PARALLEL_MODES:
        raise XiaolmError(f"unknown parallel={parallel!r}", where="parallel", hint="use ddp or fsdp")
    if ctx.world == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from xiaolm.model.registry import arch_of, base_model

        for block in arch_of(model).blocks(base_model(model)):  # one all-gather per block at a time
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for micro-batches before the last one of an accumulation step."""
    if enabled:
        yield
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole weights on the CPU for rank 0 (every process must call it: under FSDP it gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_optimizer(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the optimizer state as a distributed checkpoint (each process writes its shard)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    with _single_process_quiet():
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path))


def load_optimizer(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore optimizer state saved by save_optimizer, resharded for this run's process count."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # shapes and sharding to fill in
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # a single process is the normal case here, not a mistake to warn about
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def sum_across(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum each scalar over all processes, in one collective (the values themselves for a single process)."""
    if ctx.world == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(obj: object, ctx: DistContext) -> list:
    """Every process's `obj`, in rank order (a list of one for a single process)."""
    if ctx.world == 1:
        return [obj]
    out: list = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for every process (e.g. until rank 0 has written a checkpoint)."""
    if ctx.world > 1:
        dist.barrier()
