"""PPO for language models (Ouyang et al., 2022; the DeepSpeed-Chat / TRL recipe), over the one loop.

The module trained is the policy with a value head (a [dim, 1] linear on the policy's final hidden states, saved
beside the weights as a head; it reads them detached, so the value loss trains the head only and never moves the
policy: on toy runs a shared trunk drifted from the reference under the value errors' gradients alone).
Each rollout: sampled answers, their scores (reward functions and/or a reward model),
and per answer token the reward r_t = −ppo.kl_coef · (log π_old − log π_ref) with the score added at the answer's
last token. Advantages by GAE (ppo.gamma, ppo.lam) over the answer tokens with the rollout's values, whitened over
the batch (ppo.whiten); returns = advantages + values. Loss per answer token, averaged over them: PPO's clipped
surrogate −min(ρA, clip(ρ, 1 ± rl.clip)A) + ppo.vf_coef · ½ max((V − R)², (V_clipped − R)²), the value kept within
ppo.value_clip of the rollout's. rl.epochs optimizer steps reuse each rollout. The reference is a frozen copy, or the
adapter-disabled base under LoRA (no second copy). The KL guard (rl.kl_stop, rl.kl_guard) watches the logged `kl`:
the mean over answer tokens of log π_old − log π_ref on the rollout's own samples (an unbiased estimate of the
per-token KL of the sampling policy to the reference, the quantity the reward penalizes).
"""

from __future__ import annotations

import torch
from torch import nn

from xiaolm.model.loss import linear_token_logprobs
from xiaolm.model.registry import base_model
from xiaolm.train.config import TrainConfig
from xiaolm.train.grpo import clipped_surrogate
from xiaolm.train.loop import resolve_accum
from xiaolm.train.objective import Metrics, RunContext, eval_mode
from xiaolm.train.rl import RolloutObjective
from xiaolm.train.rollout import by_rows, masked_mean, rl_splits
from xiaolm.train.sft import pad_token_id
from xiaolm.train.stage import run_stage


class PolicyWithValue(nn.Module):
    """`lm` (the registry model, perhaps with adapters) and `value`, a [dim, 1] head on its hidden states."""

    def __init__(self, lm: nn.Module, detach_value: bool = True):
        super().__init__()
        self.lm, self.detach_value = lm, detach_value
        self.value = nn.Linear(base_model(lm).cfg.dim, 1)
        nn.init.normal_(self.value.weight, std=0.02)
        nn.init.zeros_(self.value.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, output: str = "logprobs"
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """log π(y|x) per token [B,T]; with output="both" also the values [B,T] (float32)."""
        if output == "logprobs":
            return self.lm(x, y, output="logprobs")
        hidden = self.lm(x, y, output="hidden")  # with y: an encoder-decoder model tells source from answer
        head = base_model(self.lm).lm_head.weight
        logps = linear_token_logprobs(hidden.reshape(-1, hidden.shape[-1]), head, y.reshape(-1)).view(y.shape)
        return logps, self.value(hidden.detach() if self.detach_value else hidden).squeeze(-1).float()


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [N,T] by generalized advantage estimation over each row's masked (answer) tokens,
    which are contiguous; the value after the last one is 0."""
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0])
    next_adv = torch.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        on = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(on, a, 0.0)
        next_value = torch.where(on, values[:, t], next_value)
        next_adv = torch.where(on, a, next_adv)
    return adv, (adv + values) * mask


@torch.no_grad()
def masked_entropy(module: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, chunk: int = 1024
                   ) -> float:
    """Mean entropy of the policy's next-token distribution at the masked positions (logits in chunks)."""
    hidden = module.lm(x, y, output="hidden")[mask]
    head = base_model(module.lm).lm_head.weight
    total = 0.0
    for i in range(0, hidden.shape[0], chunk):
        logp = torch.log_softmax((hidden[i:i + chunk] @ head.t()).float(), -1)
        total += float(-(logp.exp() * logp).sum())
    return total / max(1, hidden.shape[0])


class PPOObjective(RolloutObjective):
    """Sampled answers, KL-penalized per-token rewards, GAE, clipped policy and value losses; best/ by val_reward."""

    computes_old = True

    def __init__(self, cfg: TrainConfig, *args, **kwargs):
        self.settings = cfg.ppo
        super().__init__(cfg, *args, **kwargs)

    def needs_reference(self) -> bool:
        return self.settings.kl_coef > 0 or super().needs_reference()

    def setup(self, model: nn.Module, run: RunContext) -> nn.Module:
        """Rewards and reference from the policy, then the value head (seeded: the same run gets the same head)."""
        super().setup(model, run)
        torch.manual_seed(run.cfg.seed)
        return PolicyWithValue(model).to(run.device)

    def score_rollouts(self, module: nn.Module, batch: dict[str, torch.Tensor], rewards: torch.Tensor,
                       run: RunContext) -> Metrics:
        """The rollout policy's log-probs and values, per-token rewards with the KL penalty, GAE."""
        rows = self.cfg.batch_size
        with eval_mode(module), run.autocast():
            logps, values = by_rows(lambda x, y: module(x, y, "both"), batch, rows, run.device)
        mask = batch["mask"]
        batch["old"], batch["values"] = logps, values * mask
        kl = (batch["old"] - batch["ref"]) * mask if "ref" in batch else torch.zeros_like(batch["old"])
        token_rewards = -self.settings.kl_coef * kl
        last = mask.long().cumsum(-1).argmax(-1)  # each row's last answer token
        token_rewards[torch.arange(len(last)), last] += rewards
        adv, batch["returns"] = gae(token_rewards, batch["values"], mask, self.settings.gamma, self.settings.lam)
        if self.settings.whiten:
            mean, std = adv[mask].mean(), adv[mask].std()
            adv = (adv - mean) / (std + 1e-8) * mask
        batch["adv"] = adv
        return {"kl": float(masked_mean(kl, mask)),  # per answer token, k1 on the policy's own samples: E[log π/π_ref]
                "kl_penalty": float(-(self.settings.kl_coef * kl).sum(-1).mean()),
                "value": float(masked_mean(batch["values"], mask)),
                "entropy": masked_entropy(module, batch["x"][:rows].to(run.device), batch["y"][:rows].to(run.device),
                                          batch["mask"][:rows].to(run.device))}

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        logps, values = module(batch["x"], batch["y"], "both")
        logps, mask = logps.float(), batch["mask"]
        old = batch["old"] if self.rl.epochs > 1 else logps.detach()
        per_token, clipped = clipped_surrogate(logps, old, batch["adv"], self.rl.clip, self.rl.clip)
        policy_loss = masked_mean(per_token, mask)
        vc, old_values, returns = self.settings.value_clip, batch["values"], batch["returns"]
        values_clipped = old_values + (values - old_values).clamp(-vc, vc)
        value_losses = torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
        value_loss = 0.5 * masked_mean(value_losses, mask)
        metrics = dict(self.rollout_metrics)  # its KL is the rollout's, the one the reward penalizes
        metrics.update(policy_loss=float(policy_loss.detach()), value_loss=float(value_loss.detach()),
                       clip_fraction=float(masked_mean(clipped.float(), mask)),
                       value_clip_fraction=float(masked_mean(((values - returns) ** 2 < (values_clipped - returns) ** 2)
                                                             .float(), mask)))
        return policy_loss + self.settings.vf_coef * value_loss, metrics


def run_ppo(cfg: TrainConfig, resume: bool = False) -> dict:
    """The `xiaolm ppo` stage."""
    tokenizer_dir, tokenizer, train_set, val = rl_splits(cfg, "ppo", need_answer="exact" in cfg.rl.rewards)
    pad_id = pad_token_id(tokenizer, tokenizer_dir)
    return run_stage(cfg, "ppo", tokenizer_dir, len(tokenizer), lambda c, ctx: PPOObjective(
        c, ctx, train_set, val, tokenizer, pad_id, resolve_accum(c, ctx.world)[0]), resume)
