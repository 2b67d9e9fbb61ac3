"""Group relative policy optimization (Shao et al., 2024) with verifiable rewards, over the one loop.

Each prompt gets G sampled answers (grpo.group_size); an answer's advantage is its reward minus its group's mean,
divided by the group's std (+1e-4) unless grpo.scale_rewards is false (Dr. GRPO). Per answer token the loss is
PPO's clipped surrogate −min(ρA, clip(ρ, 1−ε, 1+ε_high)A), ρ = π/π_old (1 with rl.epochs = 1, as TRL's default,
where only the gradient of ρ acts), plus grpo.beta × the k3 estimate of KL to the reference when beta > 0 (default
off, as TRL). Aggregation (grpo.loss), over the answer tokens of one optimizer step in this process:
  grpo     the mean over each answer's tokens, then over answers
  dapo     the sum over all tokens ÷ their count (TRL's default: long answers weigh by their length)
  dr_grpo  the sum over all tokens ÷ (answers × rl.max_new_tokens), a constant
Under torchrun each process normalizes by its own rows, and DDP averages the gradients.
With grpo.oversample = k > 1 (DAPO's dynamic sampling), each step samples k times its prompts and trains on the
groups whose answers scored differently, in the order drawn, filling up with groups scored alike only when too few
differ: where most groups are scored alike, the step's compute goes to those that carry a gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.train.config import TrainConfig
from xiaolm.train.loop import resolve_accum
from xiaolm.train.objective import Metrics, RunContext
from xiaolm.train.rl import RolloutObjective
from xiaolm.train.rollout import masked_mean, rl_splits
from xiaolm.train.sft import pad_token_id
from xiaolm.train.stage import run_stage

LOSSES = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """Each reward minus its group's mean (consecutive groups of group_size), ÷ the group's std + 1e-4 if scale."""
    groups = rewards.view(-1, group_size)
    adv = groups - groups.mean(-1, keepdim=True)
    if scale:
        adv = adv / (groups.std(-1, keepdim=True) + 1e-4) if group_size > 1 else adv
    return adv.reshape(-1)


def scored_alike(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group of group_size consecutive rewards: whether all are equal (its advantages are 0, no gradient)."""
    groups = rewards.view(-1, group_size)
    return groups.std(-1) == 0 if group_size > 1 else torch.ones(len(groups), dtype=torch.bool)


def clipped_surrogate(logps: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, low: float, high: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss −min(ρA, clip(ρ)A), whether the clip bound the token) for log-probs [N,T], advantages
    [N] or [N,T]."""
    ratio = torch.exp(logps - old)
    adv = adv[:, None] if adv.dim() == 1 else adv
    clipped = ratio.clamp(1 - low, 1 + high)
    loss = -torch.min(ratio * adv, clipped * adv)
    return loss, (ratio * adv > clipped * adv)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, step_tokens: float, accum: int,
              max_new_tokens: int) -> torch.Tensor:
    """The micro-batch's share of the step's loss (the loop divides each micro-batch's loss by accum)."""
    mask = mask.to(per_token.dtype)
    if how == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if how == "dapo":
        return (per_token * mask).sum() * accum / max(step_tokens, 1.0)
    return (per_token * mask).sum() / (per_token.shape[0] * max_new_tokens)


class GRPOObjective(RolloutObjective):
    """G samples per prompt, group-relative advantages, the clipped surrogate; best/ is the highest val_reward."""

    def __init__(self, cfg: TrainConfig, *args, **kwargs):
        if cfg.grpo.group_size < 1:
            raise XiaolmError(f"grpo.group_size={cfg.grpo.group_size} must be positive", where="grpo.group_size")
        if cfg.grpo.loss not in LOSSES:
            raise XiaolmError(f"grpo.loss={cfg.grpo.loss!r}", where="grpo.loss", hint=f"use one of {', '.join(LOSSES)}")
        if cfg.grpo.oversample < 1:
            raise XiaolmError(f"grpo.oversample={cfg.grpo.oversample} must be at least 1", where="grpo.oversample")
        self.samples_per_prompt = cfg.grpo.group_size
        self.oversample = cfg.grpo.oversample
        self.settings = cfg.grpo
        super().__init__(cfg, *args, **kwargs)
        self.accum = self.rows // cfg.batch_size

    def needs_reference(self) -> bool:
        return self.settings.beta > 0 or super().needs_reference()

    def select_rows(self, rewards: torch.Tensor) -> tuple[list[int], Metrics]:
        """With oversampling: the step's share of groups, those whose answers scored differently first."""
        if self.oversample == 1:
            return super().select_rows(rewards)
        g = self.settings.group_size
        alike = scored_alike(rewards, g).tolist()
        order = [k for k, a in enumerate(alike) if not a] + [k for k, a in enumerate(alike) if a]
        groups = sorted(order[:len(alike) // self.oversample])
        return [k * g + i for k in groups for i in range(g)], \
            {"sampled_groups_without_signal": sum(alike) / len(alike)}

    def score_rollouts(self, module: nn.Module, batch: dict[str, torch.Tensor], rewards: torch.Tensor,
                       run: RunContext) -> Metrics:
        """Group-relative advantages."""
        batch["adv"] = group_advantages(rewards, self.settings.group_size, self.settings.scale_rewards)
        # of the trained groups: every answer scored alike, no gradient
        return {"groups_without_signal": float(scored_alike(rewards, self.settings.group_size).float().mean())}

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        logps = module(batch["x"], batch["y"], output="logprobs").float()
        old = batch["old"] if "old" in batch else logps.detach()
        eps = self.rl.clip
        per_token, clipped = clipped_surrogate(logps, old, batch["adv"], eps, self.settings.clip_high or eps)
        metrics = dict(self.rollout_metrics)
        if "ref" in batch:  # this micro-batch's mean per-token KL to the reference (k3), what the guard watches
            d = batch["ref"] - logps.detach()
            metrics["kl"] = float(masked_mean(d.exp() - d - 1, batch["mask"]))
        if self.settings.beta > 0:
            d = batch["ref"] - logps
            per_token = per_token + self.settings.beta * (d.exp() - d - 1)
        step_tokens = float(self.buffer["mask"].sum())  # the answer tokens of this process's step: dapo's divisor
        loss = aggregate(per_token, batch["mask"], self.settings.loss, step_tokens, self.accum,
                         self.rl.max_new_tokens)
        metrics["clip_fraction"] = float(masked_mean(clipped.float(), batch["mask"]))
        return loss, metrics


def run_grpo(cfg: TrainConfig, resume: bool = False) -> dict:
    """The `xiaolm grpo` stage."""
    tokenizer_dir, tokenizer, train_set, val = rl_splits(cfg, "grpo", need_answer="exact" in cfg.rl.rewards)
    pad_id = pad_token_id(tokenizer, tokenizer_dir)
    return run_stage(cfg, "grpo", tokenizer_dir, len(tokenizer), lambda c, ctx: GRPOObjective(
        c, ctx, train_set, val, tokenizer, pad_id, resolve_accum(c, ctx.world)[0]), resume)
