"""Rewards for RL stages (`xiaolm grpo`, `xiaolm ppo`): verifiable reward functions and reward models.

A reward function is `fn(reply: str, record: dict) -> float`: the model's decoded reply and the prompt record it
answered (with its `answer`, when the record has one). Built-in ones, by name:
  exact   1 when the reply equals the record's `answer` after normalization (whitespace and sentence punctuation
          stripped at both ends: eval/qa.py's normalize_answer, the demo's exact-match rule), else 0
  format  1 when the reply ended by itself (a stop token within the budget, not cut at max_new_tokens), is not
          empty and holds one line, else 0
Any other name is `module:function`, imported (the module must be importable, e.g. on PYTHONPATH).
A function that raises, or returns NaN, None, or no number, is counted per function and reason (the first
sample of each is logged with the reply), and that sample gets 0 from that function; the run goes on.

A reward model (`rl.reward_model`: a `xiaolm reward` run dir or any HF sequence-classification dir with a
tokenizer) scores the conversation with the reply. When its tokenizer differs from the policy's, the text is
re-tokenized with the reward model's own (the conversation is rendered as ChatML text, then encoded): ids never
cross tokenizers.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from xiaolm.errors import XiaolmError
from xiaolm.eval.qa import normalize_answer

log = logging.getLogger(__name__)

RewardFn = Callable[[str, dict], float]


def exact_reward(reply: str, record: dict) -> float:
    """1.0 when the reply equals the record's answer after normalize_answer, else 0.0."""
    return float(normalize_answer(reply) == normalize_answer(str(record["answer"])))


def format_reward(reply: str, record: dict) -> float:
    """1.0 for a non-empty one-line reply that ended by itself (record["_finished"]), else 0.0."""
    text = reply.strip()
    return float(bool(record.get("_finished")) and bool(text) and "\n" not in text)


BUILTIN: dict[str, RewardFn] = {"exact": exact_reward, "format": format_reward}
NEEDS_ANSWER = {"exact"}


def resolve_reward(name: str) -> RewardFn:
    """A built-in reward function by name, or `module:function` imported."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, _, fn_name = name.partition(":")
    if not module_name or not fn_name:
        raise XiaolmError(f"unknown reward function {name!r}", where="rl.rewards",
                          hint=f"use a built-in one ({', '.join(BUILTIN)}) or module:function")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise XiaolmError(f"cannot load reward function {name!r}: {e}", where="rl.rewards",
                          hint="the module must be importable (on PYTHONPATH) and define that function") from None
    if not callable(fn):
        raise XiaolmError(f"{name} is not a function", where="rl.rewards")
    return fn


@dataclass
class Rewards:
    """The weighted sum of reward functions (and a reward model) for a batch of replies; counts what failed."""

    names: list[str]
    weights: list[float]
    model: torch.nn.Module | None = None  # a RewardModel in eval mode
    model_tokenizer: object | None = None
    model_weight: float = 1.0
    failures: Counter = field(default_factory=Counter)  # (function, reason) → count, over the whole run
    fns: list[RewardFn] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.weights:
            self.weights = [1.0] * len(self.names)
        if len(self.weights) != len(self.names):
            raise XiaolmError(f"{len(self.weights)} reward weights for {len(self.names)} reward functions",
                              where="rl.reward_weights", hint="give one weight per entry of rl.rewards, or none")
        if not self.names and self.model is None:
            raise XiaolmError("no reward: rl.rewards is empty and no rl.reward_model", where="rl.rewards",
                              hint="name reward functions (exact, format, module:function) or a reward model")
        self.fns = [resolve_reward(n) for n in self.names]

    @property
    def needs_answer(self) -> bool:
        """Whether prompt records must carry an `answer` (a built-in function compares against it)."""
        return any(n in NEEDS_ANSWER for n in self.names)

    def _call(self, name: str, fn: RewardFn, reply: str, record: dict) -> float:
        try:
            value = fn(reply, record)
        except Exception as e:  # a user's function: count it, log its first sample, go on
            return self._fail(name, f"raised {type(e).__name__}: {e}", reply)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return self._fail(name, f"returned {type(value).__name__}, not a number", reply)
        if not math.isfinite(value):
            return self._fail(name, f"returned {value}", reply)
        return float(value)

    def _fail(self, name: str, reason: str, reply: str) -> float:
        key = (name, reason.split(":")[0])
        if not self.failures[key]:
            log.warning("reward function %s %s (sample reply %r); such samples get 0 and are counted",
                        name, reason, reply[:200])
        self.failures[key] += 1
        return 0.0

    @torch.no_grad()
    def score(self, replies: Sequence[str], records: Sequence[dict], finished: Sequence[bool],
              conversations: Sequence[list[dict]] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(total reward per reply [N], metrics: the mean of each part, `reward_failures` so far)."""
        total = torch.zeros(len(replies))
        metrics: dict[str, float] = {}
        for name, fn, weight in zip(self.names, self.fns, self.weights, strict=True):
            part = torch.tensor([self._call(name, fn, reply, {**record, "_finished": done})
                                 for reply, record, done in zip(replies, records, finished, strict=True)])
            total += weight * part
            metrics[f"reward_{name.rsplit(':', 1)[-1]}"] = float(part.mean()) if len(part) else 0.0
        if self.model is not None:
            if conversations is None:
                raise XiaolmError("a reward model needs the conversations", hint="pass conversations to score()")
            part = self.model_scores(conversations, replies)
            total += self.model_weight * part
            metrics["reward_model"] = float(part.mean()) if len(part) else 0.0
        metrics["reward_failures"] = float(sum(self.failures.values()))
        return total, metrics

    def model_scores(self, conversations: Sequence[list[dict]], replies: Sequence[str],
                     batch_size: int = 16) -> torch.Tensor:
        """The reward model's score of each conversation followed by its reply, in its own tokenizer."""
        from xiaolm.model.registry import base_model
        from xiaolm.model.reward import reward_batch
        from xiaolm.tokenizer.chat import encode_chat

        device = next(self.model.parameters()).device
        pad = self.model_tokenizer.pad_token_id or 0
        max_len = base_model(self.model).cfg.max_seq_len
        out = []
        for i in range(0, len(replies), batch_size):
            examples = []
            for messages, reply in zip(conversations[i:i + batch_size], replies[i:i + batch_size], strict=True):
                ids, labels = encode_chat(self.model_tokenizer, [*messages, {"role": "assistant", "content": reply}])
                # cut from the left: the reply's end, where the head reads, always stays
                examples.append((np.asarray(ids[-max_len:]), np.asarray(labels[-max_len:])))
            batch = reward_batch(examples, pad)
            out.append(self.model(batch["x"].to(device), batch["last"].to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def load_rewards(names: list[str], weights: list[float], reward_model: str, model_weight: float,
                 device: torch.device) -> Rewards:
    """Rewards from the rl.* settings: functions by name, and the reward model at `reward_model` if set."""
    model = tokenizer = None
    if reward_model:
        from xiaolm.model.export import load_reward_model

        model, tokenizer = load_reward_model(reward_model, device)
        if tokenizer is None:
            raise XiaolmError("the reward model has no tokenizer", where=reward_model,
                              hint="use a `xiaolm reward` run dir or an exported dir with tokenizer files")
        model.requires_grad_(False)
    return Rewards(list(names), list(weights), model, tokenizer, model_weight)
