"""Rollouts of the RL stages (`xiaolm grpo`, `xiaolm ppo`): prompt records, sampled answers, their token batch.

Prompt records: `{"messages": [... ending with a user turn]}` or `{"prompt": "..."}`, with an optional `answer`
(what the `exact` reward compares with); a chat whose last message is the assistant's gives that message as the
answer. Other fields (kind, id, …) travel to the reward functions. Length rule: the prompt's tokens plus
rl.max_new_tokens must fit in data.seq_len, else the record is rejected (`prompt_too_long`), so no rollout is cut.

Sampling runs the batched KV-cache engine (infer/generate.py) with one seeded generator per sample, the seed a
function of (run seed, rollout number, sample's row of the global batch): a resumed run draws the same samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from xiaolm.errors import Unusable
from xiaolm.infer.generate import Engine, GenerationConfig, chat_stop_ids
from xiaolm.model.loss import IGNORE
from xiaolm.model.registry import base_model
from xiaolm.tokenizer import encode_prompt
from xiaolm.tokenizer.chat import prompt_messages
from xiaolm.train.config import TrainConfig
from xiaolm.train.objective import eval_mode
from xiaolm.train.sft import record_splits

log = logging.getLogger(__name__)


@dataclass
class RLPrompt:
    """A usable prompt record: the conversation to answer, its token ids, and the record's fields."""

    messages: list[dict]
    ids: list[int]
    record: dict[str, Any]


def encode_rl_prompt(tokenizer: Any, record: dict, seq_len: int, max_new_tokens: int,
                     need_answer: bool) -> RLPrompt:
    """A prompt record as an RLPrompt; Unusable when it cannot be rolled out."""
    if not isinstance(record, dict):
        raise Unusable("bad_chat", "a prompt record must be a JSON object")
    record = dict(record)
    messages = record.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        record.setdefault("answer", messages[-1].get("content"))
        record["messages"] = messages[:-1]
    messages = prompt_messages(record)
    answer = record.get("answer")
    if need_answer and (not isinstance(answer, str | int | float) or not str(answer).strip()):
        raise Unusable("no_answer", "the exact reward needs an `answer` (or a final assistant message)")
    ids = encode_prompt(tokenizer, messages)
    if len(ids) + max_new_tokens > seq_len:
        raise Unusable("prompt_too_long", f"{len(ids)} prompt tokens + rl.max_new_tokens={max_new_tokens} exceed "
                                          f"data.seq_len={seq_len}")
    return RLPrompt(messages, ids, {k: v for k, v in record.items() if k not in ("messages", "prompt")})


def rl_splits(cfg: TrainConfig, stage: str, need_answer: bool) -> tuple[str, Any, list[RLPrompt], list[RLPrompt]]:
    """(tokenizer dir, tokenizer, training prompts, validation prompts) of an RL stage; bad records go to the
    run's rejects.jsonl."""
    return record_splits(cfg, stage, "prompt", '{"messages" or "prompt", "answer"}', "an SFT/DPO",
                         lambda tokenizer, record: encode_rl_prompt(tokenizer, record, cfg.data.seq_len,
                                                                    cfg.rl.max_new_tokens, need_answer))


def sample_seed(*keys: int) -> int:
    """A 63-bit generator seed from integers (run seed, rollout, sample)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass
class Completion:
    """One sampled answer: its tokens (ending with the stop id when it stopped by itself) and whether it did."""

    tokens: list[int]
    finished: bool


@torch.no_grad()
def sample(module: nn.Module, prompts: list[list[int]], gen: GenerationConfig, seeds: list[int] | None
           ) -> list[Completion]:
    """One completion per prompt (repeat a prompt for several), all rows decoding together in one KV cache."""
    model = base_model(module)  # LoRA layers live inside it: the adapters take part
    if not prompts:
        return []
    engine = Engine(model, slots=len(prompts), max_len=max(map(len, prompts)) + gen.max_new_tokens)
    cfgs = [replace(gen, seed=s) for s in seeds] if seeds is not None else [gen] * len(prompts)
    with eval_mode(module):
        slots = engine.add(prompts, cfgs)
        tokens: dict[int, list[int]] = {s: [] for s in slots}
        finished: dict[int, bool] = {}
        while engine.rows:
            for event in engine.step():
                if event.token is not None:
                    tokens[event.slot].append(event.token)
                if event.stop_id is not None:
                    tokens[event.slot].append(event.stop_id)  # trained on: the policy learns to end
                if event.finish is not None:
                    finished[event.slot] = event.finish == "stop"
    return [Completion(tokens[s], finished[s]) for s in slots]


def generation_config(cfg: TrainConfig, tokenizer: Any, greedy: bool = False) -> GenerationConfig:
    """The rollouts' sampling settings (rl.*), stopping at the end of the assistant turn."""
    rl = cfg.rl
    return GenerationConfig(max_new_tokens=rl.max_new_tokens, temperature=0.0 if greedy else rl.temperature,
                            top_k=rl.top_k, top_p=rl.top_p, stop_ids=chat_stop_ids(tokenizer))


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `x` [N,T] (prompt + completion, shifted) and targets `y` on the completion tokens only;
    `mask` marks those targets."""
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (p, row) in enumerate(zip(prompts, rows, strict=True)):
        x[i, :len(row) - 1] = torch.tensor(row[:-1])
        y[i, len(p) - 1:len(row) - 1] = torch.tensor(row[len(p):], dtype=torch.long)
    return {"x": x, "y": y, "mask": y != IGNORE}


@torch.no_grad()
def by_rows(fn: Callable[[torch.Tensor, torch.Tensor], Any], batch: dict[str, torch.Tensor], rows: int,
            device: torch.device) -> Any:
    """fn(x, y) over a completion batch `rows` rows at a time on the device; its tensor (or tuple of tensors)
    output in float32 on the CPU, the chunks joined."""
    outs = []
    for i in range(0, batch["x"].shape[0], rows):
        out = fn(batch["x"][i:i + rows].to(device), batch["y"][i:i + rows].to(device))
        outs.append(tuple(o.float().cpu() for o in out) if isinstance(out, tuple) else (out.float().cpu(),))
    joined = tuple(torch.cat(parts) for parts in zip(*outs, strict=True))
    return joined if len(joined) > 1 else joined[0]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is true (0 when none is)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def decode_replies(tokenizer: Any, completions: list[Completion]) -> list[str]:
    """The text of each completion, its stop id left out."""
    stops = set(chat_stop_ids(tokenizer))
    return [tokenizer.decode([t for t in c.tokens if t not in stops], skip_special_tokens=True)
            for c in completions]
