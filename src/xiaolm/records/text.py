"""The text of a record, as every stage reads it: a text field, or a chat's messages.

One function with each stage's rule as a parameter: dedup compares a chat's contents joined by newlines, pack and
streaming tokenize it rendered as ChatML, the tokenizer trainer takes whatever contents a chat holds (strict=False),
and pack rejects a whitespace-only text (allow_empty=False).
"""

from __future__ import annotations

from xiaolm.chat_format import normalize_chat, render_chat
from xiaolm.errors import Unusable

CHAT_STYLES = ("plain", "chatml")


def is_chat(record: dict) -> bool:
    """Whether a record carries chat fields: "messages", or "prompt" and "response"."""
    return "messages" in record or ("prompt" in record and "response" in record)


def chat_messages(record: dict) -> list[dict] | None:
    """A chat record's messages as they stand (extra keys kept; prompt/response as two messages), None when the
    record is no chat; ValueError when it is a malformed one."""
    if not is_chat(record):
        return None
    normalize_chat(record)  # validates roles and contents
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def record_text(record: dict, text_field: str = "text", chat: str = "plain", strict: bool = True,
                allow_empty: bool = True) -> tuple[str, bool]:
    """(text, is_chat): the string in `text_field`, else a chat's messages, their contents joined by newlines
    (chat="plain") or rendered as ChatML (chat="chatml").

    Unusable("missing_field") for a record with neither; Unusable("bad_chat") for a malformed chat when `strict`
    (else the messages holding string contents are taken as they are, roles unchecked: chat="plain" only);
    Unusable("empty_text") for a whitespace-only text unless `allow_empty`.
    """
    if chat not in CHAT_STYLES or (chat == "chatml" and not strict):
        raise ValueError(f"chat={chat!r}, strict={strict}: use one of {', '.join(CHAT_STYLES)}, chatml strictly")
    value = record.get(text_field)
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise Unusable("empty_text")
        return value, False
    if strict and is_chat(record):
        try:
            messages = normalize_chat(record)
        except ValueError as e:
            raise Unusable("bad_chat", str(e)) from None
        if chat == "chatml":
            return render_chat(messages), True
        return "\n".join(m["content"] for m in messages), True
    if not strict and chat == "plain":
        messages = record.get("messages")
        if isinstance(messages, list):
            return "\n".join(m["content"] for m in messages
                             if isinstance(m, dict) and isinstance(m.get("content"), str)), True
        if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
            return f"{record['prompt']}\n{record['response']}", True
    detail = (f"'{text_field}' is a {type(value).__name__}, not a string" if text_field in record
              else f"no '{text_field}' field and not a chat record")
    raise Unusable("missing_field", detail)
