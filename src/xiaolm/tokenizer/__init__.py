"""Tokenizer training, loading and the ChatML chat format."""

from xiaolm.chat_format import (
    CHAT_TEMPLATE,
    EOS,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    load_tokenizer,
    normalize_chat,
    render_chat,
)
from xiaolm.tokenizer.chat import encode_chat, encode_prompt
from xiaolm.tokenizer.stats import tokenizer_stats
from xiaolm.tokenizer.train import tokenizer_hash, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "EOS",
    "IM_END",
    "IM_START",
    "SPECIAL_TOKENS",
    "encode_chat",
    "encode_prompt",
    "load_tokenizer",
    "normalize_chat",
    "render_chat",
    "tokenizer_hash",
    "tokenizer_stats",
    "train_tokenizer",
]
