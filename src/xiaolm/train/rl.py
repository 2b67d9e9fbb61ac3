"""What the RL objectives (`xiaolm grpo`, `xiaolm ppo`) share over the one loop: rollouts in `before_step`,
a buffer of them sliced into micro-batches, greedy held-out evaluation by reward, and the KL guard.

Each optimizer step, every process samples answers to its own prompts (batch_size × grad_accum rows; GRPO's groups
never span processes), scores them, and keeps the rows with what the method's loss needs (old and reference
log-probs, advantages); a method that oversamples (GRPO's grpo.oversample) samples k times the prompts and keeps
the rows its `select_rows` picks. With rl.epochs = k the same rollouts serve k optimizer steps (the ratio clip then
acts); the buffer is saved in checkpoints for that case, so a resumed run continues the same trajectory. Prompts
are drawn by position from per-epoch permutations; a sample's seed depends on (seed, rollout, its row of the global
batch), never on a global RNG or the number of processes, so 2 processes draw the samples 1 process would.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.train.config import TrainConfig
from xiaolm.train.distributed import DistContext
from xiaolm.train.objective import Metrics, Objective, RunContext, eval_mode
from xiaolm.train.reference import Reference
from xiaolm.train.rewards import Rewards, load_rewards
from xiaolm.train.rollout import (
    Completion,
    RLPrompt,
    by_rows,
    completion_batch,
    decode_replies,
    generation_config,
    sample,
    sample_seed,
)
from xiaolm.train.sft import shuffled_index

log = logging.getLogger(__name__)


class RolloutObjective(Objective):
    """Rollout scheduling, buffer and evaluation; a method defines `score_rollouts` and `loss`."""

    best_metric = "val_reward"
    higher_is_better = True
    val_loss_is_perplexity = False
    samples_per_prompt = 1
    oversample = 1  # prompts sampled per step ÷ prompts trained on (select_rows picks the rows kept)
    computes_old = False  # score_rollouts itself stores the rollout policy's log-probs as batch["old"]

    def __init__(self, cfg: TrainConfig, ctx: DistContext, train: list[RLPrompt], val: list[RLPrompt],
                 tokenizer: Any, pad_id: int, accum: int):
        self.cfg, self.rl, self.ctx = cfg, cfg.rl, ctx
        self.train, self.val = train, val[:cfg.rl.eval_prompts]
        self.tokenizer, self.pad_id = tokenizer, pad_id
        self.rows = cfg.batch_size * accum  # rows of one optimizer step in this process
        self.global_batch = self.rows * ctx.world
        if self.rows % self.samples_per_prompt:
            raise XiaolmError(f"batch_size × grad_accum = {self.rows} rows per process is not a multiple of "
                              f"{self.samples_per_prompt} samples per prompt", where="batch_size",
                              hint="pick batch_size and grad_accum so each process holds whole groups")
        if self.rl.epochs < 1:
            raise XiaolmError(f"rl.epochs={self.rl.epochs} must be at least 1", where="rl.epochs")
        self.rewards: Rewards | None = None
        self.reference: Reference | None = None
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_rollout = -1
        self.rollout_metrics: Metrics = {}

    # what a method decides
    def needs_reference(self) -> bool:
        """Whether rollouts need the reference's log-probs (a KL term, or the guard)."""
        return self.rl.kl_stop > 0

    def select_rows(self, rewards: torch.Tensor) -> tuple[list[int], Metrics]:
        """Which sampled rows the step trains on (all of them unless oversampling), and metrics of the choice."""
        return list(range(len(rewards))), {}

    def score_rollouts(self, module: nn.Module, batch: dict[str, torch.Tensor], rewards: torch.Tensor,
                       run: RunContext) -> Metrics:
        """Add the method's tensors (advantages, …) to the rollout batch; return its metrics."""
        raise NotImplementedError

    # the shared machinery
    def setup(self, model: nn.Module, run: RunContext) -> nn.Module:
        """The rewards on the run's device, and the reference when the method needs one."""
        self.rewards = load_rewards(self.rl.rewards, self.rl.reward_weights, self.rl.reward_model,
                                    self.rl.reward_model_weight, run.device)
        if self.needs_reference():
            self.reference = Reference(self.rl.ref, "rl.ref")
            self.reference.setup(model)
        return model

    def _prompts(self, rollout: int) -> list[RLPrompt]:
        n = len(self.train)
        per = self.rows // self.samples_per_prompt * self.oversample
        first = (rollout * self.ctx.world + self.ctx.rank) * per
        return [self.train[shuffled_index(k % n, n, self.cfg.seed, k // n)] for k in range(first, first + per)]

    def before_step(self, module: nn.Module, step: int, run: RunContext) -> None:
        """Sample and score this step's rollouts (or keep the last ones while rl.epochs lasts)."""
        rollout = step // self.rl.epochs
        if rollout == self.buffer_rollout:
            return
        prompts = [p for p in self._prompts(rollout) for _ in range(self.samples_per_prompt)]
        first = self.ctx.rank * len(prompts)  # a sample's seed follows its row of the global batch, not the layout
        seeds = [sample_seed(self.cfg.seed, rollout, first + i) for i in range(len(prompts))]
        completions = sample(module, [p.ids for p in prompts], generation_config(self.cfg, self.tokenizer), seeds)
        rewards, metrics = self._score(prompts, completions)
        keep, chosen = self.select_rows(rewards)
        if len(keep) < len(prompts):
            prompts, completions = [prompts[i] for i in keep], [completions[i] for i in keep]
            rewards = rewards[keep]
            metrics.update(chosen)
        batch = completion_batch([p.ids for p in prompts], [c.tokens for c in completions], self.pad_id)
        rows = self.cfg.batch_size
        if self.rl.epochs > 1 and not self.computes_old:  # the sampling policy's: the ratio's denominator later
            with eval_mode(module):
                batch["old"] = by_rows(lambda x, y: module(x, y, output="logprobs"), batch, rows, run.device)
        if self.reference is not None:
            batch["ref"] = by_rows(lambda x, y: self.reference.logprobs(module, x, y), batch, rows, run.device)
        metrics.update(self.score_rollouts(module, batch, rewards, run))
        mask = batch["mask"]
        metrics["response_length"] = float(mask.sum(-1).float().mean())
        metrics["finished"] = sum(c.finished for c in completions) / len(completions)
        self.buffer, self.buffer_rollout, self.rollout_metrics = batch, rollout, metrics

    def _score(self, prompts: list[RLPrompt], completions: list[Completion]) -> tuple[torch.Tensor, Metrics]:
        replies = decode_replies(self.tokenizer, completions)
        rewards, metrics = self.rewards.score(replies, [p.record for p in prompts],
                                              [c.finished for c in completions], [p.messages for p in prompts])
        return rewards, {"reward": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1
                         else 0.0, **metrics}

    def train_batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """This process's rows of the current rollouts for the micro-batch that starts at global row `first`."""
        micro = ((first % self.global_batch) // count - self.ctx.rank) // self.ctx.world
        return {k: v[micro * count:(micro + 1) * count] for k, v in self.buffer.items()}

    @torch.no_grad()
    def evaluate(self, module: nn.Module, run: RunContext) -> Metrics:
        """Greedy answers to the held-out prompts: mean reward (val_reward) and each part, answer length."""
        completions = sample(module, [p.ids for p in self.val], generation_config(self.cfg, self.tokenizer, True),
                             None)
        rewards, metrics = self._score(self.val, completions)
        lengths = [len(c.tokens) for c in completions]
        return {"val_reward": float(rewards.mean()), **{f"val_{k}": v for k, v in metrics.items()
                                                         if k.startswith("reward_") and k != "reward_failures"},
                "val_response_length": sum(lengths) / max(1, len(lengths))}

    def should_stop(self, step_metrics: Metrics) -> str | None:
        """The KL guard: the step's mean KL to the reference passed rl.kl_stop."""
        kl = step_metrics.get("kl")
        if self.rl.kl_stop > 0 and kl is not None and kl > self.rl.kl_stop:
            return f"KL guard: KL to the reference {kl:.4f} passed rl.kl_stop={self.rl.kl_stop}"
        return None

    @property
    def rollback_on_stop(self) -> bool:  # type: ignore[override]
        return self.rl.kl_guard == "rollback"

    def state_dict(self) -> dict[str, Any] | None:
        """With rl.epochs > 1 the current rollouts (later steps reuse them); else nothing to keep."""
        if self.rl.epochs == 1:
            return None
        return {"rollout": self.buffer_rollout, "buffer": dict(self.buffer), "metrics": dict(self.rollout_metrics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_rollout, self.buffer = state["rollout"], state["buffer"]
        self.rollout_metrics = state["metrics"]
