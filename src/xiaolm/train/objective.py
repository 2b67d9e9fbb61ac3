"""The objective interface: what a training method plugs into the one loop (train/loop.py).

An objective gives deterministic batches by position, a loss with metrics, the real tokens of a batch, an
evaluation with the metric that picks `best/`, and hooks: `setup` builds what the method needs (a frozen
reference, a head, …) and returns the module to train; `before_step` runs once per optimizer step before the
micro-batches (rollouts); `should_stop` may end the run early after a step (a guard), saying why. The loop
owns precision, accumulation, clipping, schedule, checkpoints and logs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xiaolm.train.config import TrainConfig
from xiaolm.train.distributed import DistContext

Metrics = dict[str, float]


@dataclass
class RunContext:
    """Where and how the run computes: handed to the objective's hooks."""

    cfg: TrainConfig
    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None for fp32
    dist: DistContext
    run_dir: Path

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's mixed precision, for forward passes an objective makes itself."""
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over targets != -100 (within documents when the batch numbers them)."""
    return model(batch["x"], batch["y"], doc_ids=batch.get("doc"))[1]


class Objective:
    """Next-token loss on `{x, y[, doc]}` batches; a method overrides what it does differently."""

    best_metric = "val_loss"  # the evaluation metric that picks best/
    higher_is_better = False
    val_loss_is_perplexity = True  # val_loss is a next-token loss: the progress line adds exp(val_loss)

    def setup(self, model: nn.Module, run: RunContext) -> nn.Module:
        """Build what the method needs on the run's device; return the module to train (model, or a wrapper
        keeping it as `.lm` beside heads)."""
        return model

    def trainable(self, module: nn.Module) -> list[nn.Parameter]:
        """The parameters the optimizer, clipping and checkpoints see."""
        return [p for p in module.parameters() if p.requires_grad]

    def train_batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Rows first … first+count-1 of the training stream: a pure function of (seed, row)."""
        raise NotImplementedError

    def eval_batches(self) -> Iterable[dict[str, torch.Tensor]]:
        """Held-out batches for the default evaluation."""
        return ()

    def before_step(self, module: nn.Module, step: int, run: RunContext) -> None:
        """Once per optimizer step, before its micro-batches, under no_grad and autocast (e.g. rollouts)."""

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        """(loss to minimize, metrics to log) for one micro-batch."""
        return lm_loss(module, batch), {}

    def batch_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the batch really holds (padding not counted): tokens/s and MFU count these."""
        return int(batch["mask"].sum()) if "mask" in batch else int(batch["x"].numel())

    @torch.no_grad()
    def evaluate(self, module: nn.Module, run: RunContext) -> Metrics:
        """Named validation metrics; the default is the mean loss over eval_batches()."""
        losses = []
        for batch in self.eval_batches():
            batch = to_device(batch, run.device)
            with run.autocast():
                losses.append(float(self.loss(module, batch)[0]))
        return {"val_loss": sum(losses) / max(1, len(losses))}

    def should_stop(self, step_metrics: Metrics) -> str | None:
        """After each step, given its metrics (the same on every process): why the run must stop now, or None."""
        return None

    rollback_on_stop = False  # when should_stop stops the run: put the best/ weights back into the last checkpoint

    def state_dict(self) -> dict[str, Any] | None:
        """A streaming objective's data position (saved per process in each checkpoint); None when stateless."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the data position saved by state_dict()."""


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch's tensors to the device (other values pass through)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """module.eval() inside the block, its training flag restored after."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)
