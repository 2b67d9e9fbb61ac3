"""The text of a record: one function, each stage's rule a parameter."""

import pytest

from xiaolm.chat_format import normalize_chat, render_chat
from xiaolm.errors import Unusable
from xiaolm.records.text import chat_messages, is_chat, record_text

CHAT = {"messages": [{"role": "user", "content": "你好", "name": "小明"}, {"role": "assistant", "content": "您好"}]}
PAIR = {"prompt": "问题", "response": "答案"}
BAD_ROLE = {"messages": [{"role": "robot", "content": "坏"}]}
SPECIAL = {"messages": [{"role": "user", "content": "你<|im_end|>"}, 5, {"role": "assistant", "content": "好"}]}


def reason(record: dict, **kw) -> tuple[str, str | None]:
    with pytest.raises(Unusable) as e:
        record_text(record, **kw)
    return e.value.reason, e.value.detail


def test_a_text_field_wins_and_chats_are_joined_by_newlines_as_dedup_compares_them():
    assert record_text({"text": "正文", "messages": "ignored"}) == ("正文", False)
    assert record_text({"body": "正文"}, text_field="body") == ("正文", False)
    assert record_text({"text": "  "}) == ("  ", False)  # empty text is kept unless the caller refuses it
    assert record_text(CHAT) == ("你好\n您好", True)
    assert record_text(PAIR) == ("问题\n答案", True)


def test_pack_and_streaming_render_chats_as_chatml_and_refuse_empty_text():
    assert record_text(CHAT, chat="chatml") == (render_chat(normalize_chat(CHAT)), True)
    rendered = "<|im_start|>user\n问题<|im_end|>\n<|im_start|>assistant\n答案<|im_end|>\n"
    assert record_text(PAIR, chat="chatml")[0] == rendered
    assert reason({"text": " \n"}, chat="chatml", allow_empty=False) == ("empty_text", None)


def test_unusable_records_name_the_reason_and_what_is_wrong():
    assert reason({"text": 5}) == ("missing_field", "'text' is a int, not a string")
    assert reason({"title": "无正文"}) == ("missing_field", "no 'text' field and not a chat record")
    assert reason(BAD_ROLE) == ("bad_chat", "message 0 needs a role among system, user, assistant")
    assert reason(SPECIAL, chat="chatml")[0] == "bad_chat"
    assert reason({"messages": "nope", "prompt": "问", "response": "答"})[0] == "bad_chat"


def test_the_tokenizer_trainer_takes_whatever_string_contents_a_chat_holds():
    assert record_text(SPECIAL, strict=False) == ("你<|im_end|>\n好", True)
    assert record_text(BAD_ROLE, strict=False) == ("坏", True)
    assert record_text({"messages": "nope", "prompt": "问", "response": "答"}, strict=False) == ("问\n答", True)
    assert reason({"prompt": "问", "response": 3}, strict=False)[0] == "missing_field"
    with pytest.raises(ValueError, match="chatml"):
        record_text(CHAT, chat="chatml", strict=False)


def test_clean_gets_a_chats_messages_as_they_stand():
    assert chat_messages(CHAT) is CHAT["messages"]  # extra keys such as "name" travel on
    assert chat_messages(PAIR) == [{"role": "user", "content": "问题"}, {"role": "assistant", "content": "答案"}]
    assert chat_messages({"text": "正文"}) is None and not is_chat({"prompt": "只有问题"})
    with pytest.raises(ValueError, match="role"):
        chat_messages(BAD_ROLE)
