"""ChatML: the one chat format used by training, the exported tokenizer, the CLI and the server."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from xiaolm.errors import Unusable

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
RESERVED = [f"<|reserved_{i}|>" for i in range(5)]
SPECIAL_TOKENS = [EOS, IM_START, IM_END, *RESERVED]
ROLES = ("system", "user", "assistant")
IGNORE = -100  # label of tokens the loss skips

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def normalize_chat(record: dict) -> list[dict]:
    """`{"messages": [...]}` or `{"prompt", "response"}` → validated [{role, content}]; ValueError if bad."""
    if not isinstance(record, dict):
        raise ValueError("a chat record must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
    else:
        raise ValueError("expected a 'messages' list or 'prompt' and 'response' fields")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {i} needs a role among {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string")
        for special in SPECIAL_TOKENS:
            if special in content:
                raise ValueError(f"message {i} content contains the special token {special}")
        out.append({"role": m["role"], "content": content})
    return out


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The ChatML text for messages, identical to CHAT_TEMPLATE's output."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


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


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example in the batch; padded targets are -100, `mask` marks the real tokens."""
    width = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, (ids, labels) in enumerate(examples):
        n = len(ids) - 1
        x[row, :n] = torch.as_tensor(ids[:-1])
        y[row, :n] = torch.as_tensor(labels[1:])
        mask[row, :n] = True
    return {"x": x, "y": y, "mask": mask}
