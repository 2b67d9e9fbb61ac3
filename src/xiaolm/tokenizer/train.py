"""Byte-level BPE training with HF `tokenizers`: Chinese-aware pre-tokenization, ChatML specials, no UNK."""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from xiaolm.data.read import RejectLog, read_records
from xiaolm.errors import XiaolmError
from xiaolm.tokenizer.chat import CHAT_TEMPLATE, EOS, SPECIAL_TOKENS

log = logging.getLogger(__name__)

# digits one by one (numbers tokenize consistently), then runs of letters (a CJK run counts as letters),
# punctuation runs, newlines and spaces: the GPT-4-style split, minus English contractions
SPLIT_PATTERN = r" ?\p{L}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
MARKERS = ("_SUCCESS", "config.yaml")


def record_text(record: dict, text_field: str = "text") -> str | None:
    """The trainable text of a text or chat record, or None."""
    if isinstance(record.get(text_field), str):
        return record[text_field]
    if isinstance(record.get("messages"), list):
        return "\n".join(m.get("content", "") for m in record["messages"] if isinstance(m, dict)
                         and isinstance(m.get("content"), str))
    return None


def build_empty_tokenizer():
    """An untrained byte-level BPE with our normalizer-free pipeline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(inputs: Sequence[str | Path], out_dir: str | Path, vocab_size: int = 8192,
                    min_frequency: int = 2, text_field: str = "text") -> Path:
    """Train on every text/chat record of `inputs` and save an AutoTokenizer-loadable dir."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise XiaolmError(f"vocab_size={vocab_size} is too small", hint=f"use more than {floor} "
                          "(256 byte tokens + special tokens)")
    if vocab_size > 65535:
        log.warning("vocab_size %d exceeds 65535: token files will be uint32", vocab_size)
    out_dir = Path(out_dir)
    n_texts = 0
    with RejectLog(None) as rejects:
        def texts() -> Iterator[str]:
            nonlocal n_texts
            for record, _ in read_records(inputs, rejects):
                text = record_text(record, text_field)
                if text:
                    n_texts += 1
                    yield text
        first = next(texts(), None)
        if first is None:
            raise XiaolmError("no text to train on", where=", ".join(map(str, inputs)),
                              hint=f"inputs need '{text_field}' or 'messages' records")
        n_texts = 0
        tok = build_empty_tokenizer()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=True,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts(), trainer=trainer)
    log.info("tokenizer: trained on %d texts, vocab %d", n_texts, tok.get_vocab_size())
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False, model_max_length=1 << 20)
    fast.chat_template = CHAT_TEMPLATE
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    from xiaolm.io import atomic_write_text

    atomic_write_text(tmp / "config.yaml", f"vocab_size: {vocab_size}\nmin_frequency: {min_frequency}\n"
                      f"text_field: {text_field}\ninputs: {[str(i) for i in inputs]}\n")
    (tmp / "_SUCCESS").write_text("")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return out_dir


def load_tokenizer(path: str | Path):
    """PreTrainedTokenizerFast from a tokenizer (or model) dir, with a clear error when absent."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise XiaolmError("no tokenizer.json", where=str(path), hint="train one with `xiaolm tokenizer train`")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tokenizer_hash(path: str | Path) -> str:
    """sha256 of tokenizer.json, recorded in meta.json so token files and models can be matched."""
    return hashlib.sha256(Path(path, "tokenizer.json").read_bytes()).hexdigest()
