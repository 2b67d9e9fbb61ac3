"""ChatML: the one chat format used by training, the exported tokenizer, the CLI and the server."""

from __future__ import annotations

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
RESERVED = [f"<|reserved_{i}|>" for i in range(5)]
SPECIAL_TOKENS = [EOS, IM_START, IM_END, *RESERVED]
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def normalize_chat(record: dict) -> list[dict]:
    """`{"messages": [...]}` or `{"prompt", "response"}` → validated list of {role, content}; ValueError if bad."""
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
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The ChatML text for messages, identical to CHAT_TEMPLATE's output."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are -100 except on assistant content and its closing <|im_end|>."""
    text = render_chat(messages)
    spans = []  # character spans that are trained on
    pos = 0
    for m in messages:
        header = f"{IM_START}{m['role']}\n"
        start = pos + len(header)
        end = start + len(m["content"]) + len(IM_END)
        if m["role"] == "assistant":
            spans.append((start, end))
        pos = end + 1
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (a, b) in zip(ids, offsets, strict=False):
        inside = any(a < e and b > s for s, e in spans)  # a token overlapping trained text is trained on
        labels.append(tok if inside else -100)
    return ids, labels


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation followed by `<|im_start|>assistant\\n`, ready for generation."""
    return tokenizer(render_chat(messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
