"""Direct preference optimization (Rafailov et al., 2023) on preference records, against a frozen reference.

A pair is the prompt with its chosen and with its rejected answer, ChatML-encoded with labels on that answer only
(content + <|im_end|>). A batch of B pairs is one forward of 2B rows, chosen first, so DDP sees one forward.
A sequence's log-prob is the sum of its answer tokens' log-probs, as in TRL. The reference is a frozen copy
(ref=copy), the adapter-free base of a LoRA run (ref=adapter, no second model), or log-probs computed once before
training and cached in the run dir (ref=precompute).

Length rule (tokenizer.chat.encode_pair): sequences keep their start and are cut to data.seq_len + 1 tokens (as
SFT, and TRL's keep_start); a pair where either answer keeps fewer than min(its length, MIN_ANSWER_TOKENS) tokens
is rejected (`prompt_too_long`), so no pair trains on a stub of an answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.eval.preference import sequence_logps
from xiaolm.io import atomic_open
from xiaolm.records.read import convert_records
from xiaolm.records.rejects import RejectLog
from xiaolm.tokenizer.chat import IGNORE, Pair, collate, encode_pair
from xiaolm.train.config import DPOSettings, TrainConfig
from xiaolm.train.objective import Metrics, Objective, RunContext, eval_mode, to_device
from xiaolm.train.reference import Reference, peft_inside
from xiaolm.train.sft import pad_token_id, record_splits, shuffled_index
from xiaolm.train.stage import run_stage

log = logging.getLogger(__name__)

def load_pairs(inputs: list[str], tokenizer: Any, seq_len: int, rejects: RejectLog | None) -> list[Pair]:
    """Encode preference records; bad ones go to rejects with file:line and reason."""
    return convert_records(inputs, lambda record: encode_pair(tokenizer, record, seq_len), rejects)


def dpo_loss(token_logps: torch.Tensor, ref_logps: torch.Tensor, answer: torch.Tensor, settings: DPOSettings
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) from per-token log-probs [2B,T] (chosen rows first), reference sequence log-probs [2B]
    and the answer-token mask [2B,T]."""
    beta = settings.beta
    chosen_ratio, rejected_ratio = (token_logps.sum(-1) - ref_logps).chunk(2)
    if settings.loss == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif settings.loss == "ipo":  # log-ratios averaged over answer tokens, as TRL (IPO's authors confirmed it)
        n_chosen, n_rejected = answer.sum(-1).clamp(min=1).chunk(2)
        losses = (chosen_ratio / n_chosen - rejected_ratio / n_rejected - 1 / (2 * beta)) ** 2
    else:
        raise XiaolmError(f"dpo.loss={settings.loss!r}", where="dpo.loss", hint="use sigmoid or ipo")
    loss = losses.mean()
    if settings.sft_weight:
        chosen_tokens, chosen_mask = token_logps.chunk(2)[0], answer.chunk(2)[0]
        loss = loss - settings.sft_weight * chosen_tokens[chosen_mask].mean()
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return loss, {"rewards_chosen": chosen_reward.mean(), "rewards_rejected": rejected_reward.mean(),
                  "margin": (chosen_reward - rejected_reward).mean(),
                  "accuracy": (chosen_reward > rejected_reward).float().mean()}


class DPOObjective(Objective):
    """Shuffled epochs over preference pairs (rows are pairs); best/ is the lowest held-out DPO loss."""

    val_loss_is_perplexity = False

    def __init__(self, train: list[Pair], val: list[Pair], settings: DPOSettings, batch_size: int, seed: int,
                 pad_id: int, eval_batches: int):
        if settings.beta <= 0:
            raise XiaolmError(f"dpo.beta={settings.beta} must be positive", where="dpo.beta")
        self.train, self.val = train, val[:eval_batches * batch_size]
        self.settings, self.batch_size, self.seed, self.pad_id = settings, batch_size, seed, pad_id
        self.ref_mode = settings.ref
        self.reference: Reference | None = None  # ref=copy / adapter
        self.cached: dict[str, torch.Tensor] = {}  # ref=precompute: "train" / "val" → [pairs, 2] log-probs

    def setup(self, model: nn.Module, run: RunContext) -> nn.Module:
        """Build the reference: a frozen copy, nothing (adapters off), or cached log-probs."""
        if self.ref_mode == "precompute":
            self._precompute(model, run)
        else:
            self.reference = Reference(self.ref_mode, "dpo.ref")
            self.ref_mode = self.reference.setup(model)
        log.info("dpo: reference = %s", self.ref_mode)
        return model

    def _precompute(self, model: nn.Module, run: RunContext) -> None:
        digest = hashlib.sha256(f"{run.cfg.init_from}|{run.amp}".encode())
        with torch.no_grad():  # the weights' content too: the same path may later hold another model
            for name, param in model.state_dict().items():
                digest.update(f"{name}{tuple(param.shape)}{float(param.double().sum())!r}".encode())
        for ids, labels in (side for pairs in (self.train, self.val) for pair in pairs for side in pair):
            digest.update(ids.tobytes() + b"|" + labels.tobytes())
        # keyed by data, init_from, its weights and the autocast dtype
        path = run.run_dir / f"ref_logps-{digest.hexdigest()[:16]}.safetensors"
        from safetensors.torch import load_file, save

        if path.is_file():
            self.cached = load_file(str(path))
            log.info("dpo: reference log-probs reused from %s", path)
            return
        peft = peft_inside(model)
        adapters_off = peft.disable_adapter() if peft is not None else contextlib.nullcontext()
        with torch.no_grad(), eval_mode(model), run.autocast(), adapters_off:
            for name, pairs in (("train", self.train), ("val", self.val)):
                logps = [sequence_logps(model, to_device(batch, run.device)).float().cpu()
                         for batch in self._batches(pairs)]
                both = torch.cat([torch.stack(row.chunk(2), 1) for row in logps]) if logps else torch.zeros(0, 2)
                self.cached[name] = both  # [pairs, 2]: chosen, rejected
        if run.dist.is_main:
            with atomic_open(path, "wb") as f:
                f.write(save({k: v.contiguous() for k, v in self.cached.items()}))
        log.info("dpo: reference log-probs of %d + %d pairs cached in %s", len(self.train), len(self.val), path)

    def _batch(self, pairs: list[Pair], rows: list[int], split: str = "") -> dict[str, torch.Tensor]:
        batch = collate([pairs[i][0] for i in rows] + [pairs[i][1] for i in rows], self.pad_id)
        if split in self.cached:
            ref = self.cached[split][rows]
            batch["ref"] = torch.cat([ref[:, 0], ref[:, 1]])
        return batch

    def train_batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Pairs first … first+count-1 of per-epoch permutations: 2·count rows, the chosen ones first."""
        n = len(self.train)
        rows = [shuffled_index(k % n, n, self.seed, k // n) for k in range(first, first + count)]
        return self._batch(self.train, rows, "train")

    def _batches(self, pairs: list[Pair], split: str = "") -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(pairs), self.batch_size):
            yield self._batch(pairs, list(range(i, min(i + self.batch_size, len(pairs)))), split)

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The first eval_batches × batch_size validation pairs."""
        return self._batches(self.val, "val")

    def reference_logps(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference model's sequence log-probs for the batch's rows [2B]."""
        if "ref" in batch:
            return batch["ref"]
        return self.reference.logprobs(module, batch["x"], batch["y"]).sum(-1)

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        ref = self.reference_logps(module, batch)
        token_logps = module(batch["x"], batch["y"], output="logprobs")  # chosen and rejected in one forward
        loss, metrics = dpo_loss(token_logps, ref.to(token_logps.dtype), batch["y"] != IGNORE, self.settings)
        return loss, {k: float(v) for k, v in metrics.items()}

    def evaluate(self, module: nn.Module, run: RunContext) -> Metrics:
        """Held-out loss, rewards, margin and reward accuracy, averaged over pairs."""
        return evaluate_pairs(self, module, run)


@torch.no_grad()
def evaluate_pairs(objective: Objective, module: nn.Module, run: RunContext) -> Metrics:
    """`val_` + each of the objective's loss metrics, averaged over the pairs of its eval batches (2 rows a pair)."""
    sums: dict[str, float] = {}
    count = 0
    for batch in objective.eval_batches():
        batch = to_device(batch, run.device)
        with run.autocast():
            loss, metrics = objective.loss(module, batch)
        n = batch["x"].shape[0] // 2
        for key, value in {"loss": float(loss), **metrics}.items():
            sums[key] = sums.get(key, 0.0) + value * n
        count += n
    return {f"val_{k}": v / max(1, count) for k, v in sums.items()}


def preference_splits(cfg: TrainConfig, stage: str) -> tuple[str | Path, int, list[Pair], list[Pair], int]:
    """(tokenizer dir, vocabulary size, training pairs, validation pairs, pad id) of a stage on preference
    records; bad records go to the run's rejects.jsonl."""
    tokenizer_dir, tokenizer, train_set, val = record_splits(
        cfg, stage, "pair", '{"prompt", "chosen", "rejected"}', "an SFT",
        lambda tokenizer, record: encode_pair(tokenizer, record, cfg.data.seq_len))
    return tokenizer_dir, len(tokenizer), train_set, val, pad_token_id(tokenizer, tokenizer_dir)


def run_dpo(cfg: TrainConfig, resume: bool = False) -> dict:
    """The `xiaolm dpo` stage."""
    tokenizer_dir, vocab, train_set, val, pad_id = preference_splits(cfg, "dpo")
    return run_stage(cfg, "dpo", tokenizer_dir, vocab,
                     lambda c, ctx: DPOObjective(train_set, val, c.dpo, c.batch_size, c.seed, pad_id,
                                                 c.eval_batches), resume)
