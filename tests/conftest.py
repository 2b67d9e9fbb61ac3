"""Shared fixtures: a small tokenizer trained once per session on real Chinese text."""

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from xiaolm.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer([str(FIXTURES / "corpus_zh.jsonl")], out, vocab_size=1200)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


TINY_TEXTS = ["你好，世界！今天天气很好。", "我们一起学习中文和数学。", "小模型也能说话。", "春眠不觉晓，处处闻啼鸟。"]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 300-token tokenizer for model tests that need real ids but no realistic text."""
    from xiaolm.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("tinytok")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TINY_TEXTS * 5),
                      encoding="utf-8")
    return train_tokenizer([corpus], tmp / "tokenizer", vocab_size=300, min_frequency=1)
