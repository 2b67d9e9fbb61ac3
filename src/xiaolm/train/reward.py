"""Reward model training (Bradley–Terry): on preference records, the chosen answer must score above the rejected.

Each side of a pair is the conversation with its answer, ChatML-encoded and cut just after the answer's last token
(its `<|im_end|>`), which is where the scalar head reads the backbone's final hidden state (model/reward.py).
Loss: −log σ(r_chosen − r_rejected). A batch of B pairs is one forward of 2B right-padded rows, chosen first.
best/ is the highest held-out pairwise accuracy. Pairs are encoded as DPO's (tokenizer.chat.encode_pair), with the
same length rule and rejects.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.model.registry import get_arch
from xiaolm.model.reward import RewardModel, reward_batch
from xiaolm.tokenizer.chat import Pair
from xiaolm.train.config import TrainConfig
from xiaolm.train.dpo import evaluate_pairs, preference_splits
from xiaolm.train.objective import Metrics, Objective, RunContext
from xiaolm.train.sft import shuffled_index
from xiaolm.train.stage import run_stage


def bradley_terry(rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) from rewards [2B], chosen rows first."""
    chosen, rejected = rewards.chunk(2)
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    chosen, rejected, margin = chosen.detach(), rejected.detach(), margin.detach()
    return loss, {"accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
                  "rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean()}


class RewardObjective(Objective):
    """Shuffled epochs over preference pairs; the module trained is RewardModel(lm) (the head saved beside it)."""

    best_metric = "val_accuracy"
    higher_is_better = True
    val_loss_is_perplexity = False

    def __init__(self, train: list[Pair], val: list[Pair], batch_size: int, seed: int, pad_id: int,
                 eval_batches: int):
        self.train, self.val = train, val[:eval_batches * batch_size]
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id

    def setup(self, model: nn.Module, run: RunContext) -> nn.Module:
        """Wrap the language model with a scalar head (seeded: the same run gets the same head)."""
        torch.manual_seed(run.cfg.seed)
        return RewardModel(model).to(run.device)

    def _batch(self, pairs: list[Pair], rows: list[int]) -> dict[str, torch.Tensor]:
        return reward_batch([pairs[i][0] for i in rows] + [pairs[i][1] for i in rows], self.pad_id)

    def train_batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Pairs first … first+count-1 of per-epoch permutations: 2·count rows, the chosen ones first."""
        n = len(self.train)
        return self._batch(self.train, [shuffled_index(k % n, n, self.seed, k // n)
                                        for k in range(first, first + count)])

    def eval_batches(self):
        """The first eval_batches × batch_size validation pairs."""
        for i in range(0, len(self.val), self.batch_size):
            yield self._batch(self.val, list(range(i, min(i + self.batch_size, len(self.val)))))

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        loss, metrics = bradley_terry(module(batch["x"], batch["last"]))
        return loss, {k: float(v) for k, v in metrics.items()}

    def evaluate(self, module: nn.Module, run: RunContext) -> Metrics:
        """Held-out loss, pairwise accuracy, margin and mean rewards, averaged over pairs."""
        return evaluate_pairs(self, module, run)


def run_reward(cfg: TrainConfig, resume: bool = False) -> dict:
    """The `xiaolm reward` stage."""
    tokenizer_dir, vocab, train_set, val, pad_id = preference_splits(cfg, "reward")

    def objective(c: TrainConfig, ctx: Any) -> RewardObjective:
        if get_arch(c.model.arch).encoder_decoder:
            raise XiaolmError(f"init_from={c.init_from} is an encoder-decoder ({c.model.arch}) model; xiaolm's reward "
                              "models are decoder-only (a score on the last answer token, loadable as "
                              "AutoModelForSequenceClassification)", where="init_from",
                              hint="start the reward model from a decoder-only (llama) model; GRPO and PPO on a T5 "
                                   "policy can use it or reward functions")
        return RewardObjective(train_set, val, c.batch_size, c.seed, pad_id, c.eval_batches)

    return run_stage(cfg, "reward", tokenizer_dir, vocab, objective, resume)
