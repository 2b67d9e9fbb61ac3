"""Chats as token ids: ChatML (xiaolm.chat_format) encoded with assistant-only labels; preference pairs; batches."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from xiaolm.chat_format import IM_END, IM_START, normalize_chat, render_chat
from xiaolm.errors import Unusable

IGNORE = -100  # label of tokens the loss skips


def _trained_spans(messages: list[dict]) -> list[tuple[int, int]]:
    """Character spans of the rendered chat that carry labels: assistant content plus its <|im_end|>."""
    spans, pos = [], 0
    for m in messages:
        start = pos + len(IM_START) + len(m["role"]) + 1
        end = start + len(m["content"]) + len(IM_END)
        if m["role"] == "assistant":
            spans.append((start, end))
        pos = end + 1
    return spans


def encode_chat(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are -100 except on assistant content and its closing <|im_end|>."""
    enc = tokenizer(render_chat(messages), add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    spans = _trained_spans(messages)
    labels, k = [], 0
    for tok, (a, b) in zip(ids, offsets, strict=True):
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        # a token overlapping trained text is trained on (offsets are exact: trim_offsets is off)
        inside = k < len(spans) and a < spans[k][1] and max(b, a + 1) > spans[k][0]
        labels.append(tok if inside else IGNORE)
    return ids, labels


def encode_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of the conversation followed by `<|im_start|>assistant\\n`, ready for generation."""
    text = render_chat(messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


Example = tuple[np.ndarray, np.ndarray]  # int32 input_ids and labels of one chat
Pair = tuple[Example, Example]  # a preference record: (prompt + chosen, prompt + rejected), labels on the answer
MIN_ANSWER_TOKENS = 8  # a preference answer cut shorter than this (or than itself) by seq_len is rejected


def encode_example(tokenizer, record: dict, seq_len: int) -> Example:
    """A chat record as (input_ids, labels) int32 arrays cut to seq_len + 1; Unusable when it cannot train."""
    try:
        ids, labels = encode_chat(tokenizer, normalize_chat(record))
    except ValueError as e:
        raise Unusable("bad_chat", str(e)) from None
    ids, labels = ids[:seq_len + 1], labels[:seq_len + 1]
    if all(label == -100 for label in labels[1:]):
        raise Unusable("no_assistant_tokens", "no assistant tokens within data.seq_len")
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)


def _answer(record: dict, key: str) -> str:
    """The answer text of `chosen` / `rejected`: a string, a {role, content} dict or a one-message list."""
    value = record.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value.strip():
        raise Unusable("empty_answer", f"'{key}' is missing or empty")
    return value


def prompt_messages(record: dict) -> list[dict]:
    """The conversation before the answer (`messages`, a `prompt` string or TRL's list), ending with a user turn."""
    messages = record.get("messages", record.get("prompt"))
    messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
    if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") == "user"
                                                 and str(m.get("content") or "").strip() for m in messages):
        raise Unusable("no_user_turn", "the prompt has no non-empty user turn")
    try:
        messages = normalize_chat({"messages": messages})
    except ValueError as e:
        raise Unusable("bad_chat", str(e)) from None
    if messages[-1]["role"] != "user":
        raise Unusable("bad_chat", "the prompt must end with a user turn")
    return messages


def _encode_side(tokenizer: Any, prompt: list[dict], answer: str, seq_len: int) -> Example:
    ids, labels = encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
    end = max(i for i, label in enumerate(labels) if label != IGNORE)
    start = end
    # the last labelled run is the answer: earlier assistant turns are context
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    labels = [IGNORE] * start + labels[start:]
    total = end + 1 - start
    ids, labels = ids[:seq_len + 1], labels[:seq_len + 1]
    kept = sum(label != IGNORE for label in labels)
    if kept < min(total, MIN_ANSWER_TOKENS):
        raise Unusable("prompt_too_long", f"{kept} of {total} answer tokens fit in data.seq_len={seq_len}")
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)


def encode_pair(tokenizer: Any, record: dict, seq_len: int) -> Pair:
    """A preference record as (chosen, rejected) examples; Unusable when it cannot train."""
    if not isinstance(record, dict):
        raise Unusable("bad_chat", "a preference record must be a JSON object")
    chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
    if chosen.strip() == rejected.strip():
        raise Unusable("same_answers", "chosen and rejected are the same answer")
    prompt = prompt_messages(record)
    return _encode_side(tokenizer, prompt, chosen, seq_len), _encode_side(tokenizer, prompt, rejected, seq_len)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example in the batch; padded targets are -100, `mask` marks the real tokens."""
    batch = collate_packed([[example] for example in examples], pad_id)
    del batch["doc"]  # one chat per row: plain causal attention
    return batch


def pack_examples(examples: list[Example], width: int) -> list[list[Example]]:
    """The examples in rows of at most `width` tokens each (first fit, longest first; deterministic).

    A batch of these rows (collate_packed) holds the same chats and targets as the padded batch of the examples,
    so it gives the same mean loss, on fewer positions: a padded batch pays for its longest chat in every row.
    """
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e[0]), reverse=True):
        n = len(example[0]) - 1
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(example)
                room[r] -= n
                break
        else:
            rows.append([example])
            room.append(width - n)
    return rows


def collate_packed(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of whole chats laid end to end, padded to the longest row; `doc` numbers the chats of each row.

    Each chat is shifted on its own (x = ids[:-1], y = labels[1:]), so no target crosses from one chat into the
    next; with `doc` the model keeps attention inside each chat and restarts positions at it, so a packed chat
    gets the logits it would get alone. Padding gets a number of its own and targets -100.
    """
    width = max(sum(len(ids) - 1 for ids, _ in row) for row in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    doc = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for d, (ids, labels) in enumerate(row):
            n = len(ids) - 1
            x[r, pos:pos + n] = torch.as_tensor(ids[:-1])
            y[r, pos:pos + n] = torch.as_tensor(labels[1:])
            doc[r, pos:pos + n] = d
            pos += n
        mask[r, :pos] = True
        doc[r, pos:] = len(row)
    return {"x": x, "y": y, "mask": mask, "doc": doc}
