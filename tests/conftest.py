"""Shared fixtures: a small tokenizer trained once per session on real Chinese text."""

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
