"""The ChatML chat format as strings: special tokens, the template, validating and rendering messages."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from xiaolm.errors import XiaolmError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

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

def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """PreTrainedTokenizerFast from a tokenizer (or HF model) dir, with a clear error when there is none."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise XiaolmError("no tokenizer.json here", where=str(path),
                          hint="train one with `xiaolm tokenizer train` or pass a dir that has one")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return tok
