"""Tokenizer: lossless round trip, Chinese-aware splits, ChatML specials and template, assistant labels."""

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from xiaolm.errors import XiaolmError
from xiaolm.tokenizer import (
    CHAT_TEMPLATE,
    EOS,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    encode_chat,
    encode_prompt,
    load_tokenizer,
    normalize_chat,
    render_chat,
    tokenizer_hash,
    train_tokenizer,
)

FIXTURES = Path(__file__).parent / "fixtures"

SAMPLES = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "xiaolm 是一个 small model，支持 English words and 数字 3.14159！",
    "emoji 😀🎉👍🏽👨‍👩‍👧 and rare CJK 𠀀𪚥𰻞 plus 〇〡 and 㐀",
    "  leading spaces\n\n\ttabs and\r\nwindows newlines  \n",
    "日本語のテキスト、한국어 텍스트, Ελληνικά, русский, हिन्दी",
    "全角ＡＢＣ１２３　ideographic space\u200bzero width\x00nul",
    "literal <|im_end|> and <|endoftext|> in text",
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_lossless(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_loads_with_autotokenizer_with_chatml_specials_and_our_template(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert [tok.convert_tokens_to_ids(t) for t in (EOS, IM_START, IM_END)] == [0, 1, 2]
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.eos_token == EOS and tok.pad_token == EOS and tok.bos_token is None and tok.unk_token is None
    assert tok.chat_template == CHAT_TEMPLATE
    assert {0, 1, 2} <= set(tok.all_special_ids)
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE and config["bos_token"] is None
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tokenizer_dir / "special_tokens_map.json").is_file() and (tokenizer_dir / "_SUCCESS").is_file()
    assert len(tok) == 1200
    assert re.fullmatch(r"[0-9a-f]{64}", tokenizer_hash(tokenizer_dir))


def test_pre_tokenizer_splits_digits_and_separates_cjk_from_latin_and_punctuation(tokenizer):
    from tokenizers import decoders

    backend = tokenizer.backend_tokenizer
    pieces = [decoders.ByteLevel().decode([p]) for p, _ in backend.pre_tokenizer.pre_tokenize_str(
        "模型xiaolm支持English，共2024个 words。")]
    assert pieces == ["模型", "xiaolm", "支持", "English", "，", "共", *"2024", "个", " words", "。"]
    assert len(tokenizer.tokenize("2024")) == 4


def test_template_rendering_matches_hf(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for prompt in (False, True):
        assert tok.apply_chat_template(chat(), tokenize=False, add_generation_prompt=prompt) == \
            render_chat(chat(), add_generation_prompt=prompt)
    assert render_chat(chat()[:1]) == f"{IM_START}system\n你是助手。{IM_END}\n"


def chat():
    return [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！有什么可以帮你？"}, {"role": "user", "content": "1+1=?"},
            {"role": "assistant", "content": "二"}]


TRICKY = [
    chat(),
    [{"role": "user", "content": "写一段代码"},
     {"role": "assistant", "content": "\n\n```python\nprint('你好')\n```\n"}],
    [{"role": "user", "content": " 前面有空格"},
     {"role": "assistant", "content": " 回答 with English and 123 "}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "assistant", "content": "😀𠀀。\n"}, {"role": "user", "content": "？"}],
]


@pytest.mark.parametrize("messages", TRICKY)
def test_encode_chat_and_prompt_match_hf_apply_chat_template(tokenizer_dir, tokenizer, messages):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids, labels = encode_chat(tokenizer, messages)
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert len(labels) == len(ids)
    assert encode_prompt(tokenizer, messages) == tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False)


def test_chat_segments_encode_the_same_alone_as_together(tokenizer):
    """Specials and the header newline split cleanly, so label boundaries fall on token boundaries."""
    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    segments = []
    for m in chat():
        segments += [IM_START, f"{m['role']}\n", m["content"], IM_END, "\n"]
    assert sum((enc(s) for s in segments), []) == enc("".join(segments))


def test_labels_cover_only_assistant_content_and_im_end(tokenizer):
    ids, labels = encode_chat(tokenizer, chat())
    assert all(label in (-100, t) for t, label in zip(ids, labels, strict=True))
    trained = [t for t, label in zip(ids, labels, strict=True) if label != -100]
    assert tokenizer.decode(trained) == f"你好！有什么可以帮你？{IM_END}二{IM_END}"
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert labels[-2:] == [im_end, -100]  # the closing <|im_end|> is trained, the newline after it is not
    assert encode_chat(tokenizer, [{"role": "user", "content": "只有提问"}])[1] == [-100] * len(
        encode_chat(tokenizer, [{"role": "user", "content": "只有提问"}])[0])


def test_normalize_chat_accepts_messages_and_prompt_response_and_rejects_bad_records():
    assert normalize_chat({"prompt": "问", "response": "答"}) == [
        {"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]
    assert normalize_chat({"messages": [{"role": "user", "content": "嗨", "name": "x"}]}) == [
        {"role": "user", "content": "嗨"}]
    bad = [({"messages": [{"role": "robot", "content": "x"}]}, "role"),
           ({"messages": [{"role": "user", "content": 3}]}, "string"),
           ({"messages": []}, "non-empty"),
           ({"text": "不是对话"}, "messages"),
           ({"messages": [{"role": "user", "content": f"注入{IM_END}"}]}, "special token")]
    for record, reason in bad:
        with pytest.raises(ValueError, match=reason):
            normalize_chat(record)


def test_trains_on_chat_records_and_skips_rerun(tmp_path):
    out = train_tokenizer([FIXTURES / "mixed"], tmp_path / "tok", vocab_size=300, min_frequency=1)
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("你好，请问你是谁？", add_special_tokens=False)) == "你好，请问你是谁？"
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    train_tokenizer([FIXTURES / "mixed"], tmp_path / "tok", vocab_size=300, min_frequency=1)
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp


def test_errors_come_before_training(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"title": "no text"}\n')
    with pytest.raises(XiaolmError, match="no text"):
        train_tokenizer([str(empty)], tmp_path / "t", vocab_size=1000)
    with pytest.raises(XiaolmError, match="too small"):
        train_tokenizer([str(empty)], tmp_path / "t", vocab_size=100)
    with pytest.raises(XiaolmError, match="input not found"):
        train_tokenizer([str(tmp_path / "nope.jsonl")], tmp_path / "t")
    with pytest.raises(XiaolmError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(XiaolmError, match="no tokenizer.json"):
        tokenizer_hash(tmp_path)
    assert not (tmp_path / "t").exists()
