"""Byte-level BPE training with HF `tokenizers`: Chinese-aware pre-tokenization, ChatML specials, no UNK."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import yaml

from xiaolm.chat_format import CHAT_TEMPLATE, EOS, SPECIAL_TOKENS
from xiaolm.errors import Unusable, XiaolmError
from xiaolm.io import atomic_write_json, atomic_write_text
from xiaolm.records.inputs import finished_stage, inputs_fingerprint, stage_inputs
from xiaolm.records.read import check_readable, read_records
from xiaolm.records.rejects import RejectLog
from xiaolm.records.text import record_text
from xiaolm.tokenizer.count import count_chunks, default_workers
from xiaolm.tokenizer.pretokenize import ChunkRules, build_pre_tokenizer, to_byte_level

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

MODEL_MAX_LENGTH = 1 << 20  # no model limit is known here; stops spurious "sequence too long" warnings
OUTPUT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
BACKENDS = ("bpe", "sentencepiece")
BASE_VOCAB = 256 + len(SPECIAL_TOKENS)  # byte alphabet + specials: the smallest vocabulary
MIN_MEMORY = 256 << 20
# bytes of --max-memory per distinct chunk: while counting, its entry in a worker's table and in the merged
# table (plus transfer); while training, its share of tokenizers' BPE trainer (1.9 KB measured on Chinese text)
COUNT_BYTES_PER_CHUNK = 600
TRAIN_BYTES_PER_CHUNK = 2200
BASE_MEMORY = 150 << 20  # interpreter, libraries, queues and batches in flight
_REPEAT = 1 << 16  # a chunk is fed to the BPE trainer in strings of at most this many copies
_BOUND_BATCH = 1 << 16  # chunks encoded at once while bounding the merges


@dataclass
class TokenizerConfig:
    """Settings of `xiaolm tokenizer train`."""

    vocab_size: int = 8192
    min_frequency: int = 2
    cjk_chars: bool = False  # one token per CJK character (no merges across characters)
    # how the bpe backend cuts text into chunks (see ChunkRules)
    max_cjk_run: int = ChunkRules.max_cjk_run  # CJK runs are cut every N characters (0: never)
    cjk_space: bool = ChunkRules.cjk_space  # a space before a CJK run joins it
    digits: int = ChunkRules.digits  # digits per chunk at most (0: a whole run)
    newline_indent: bool = ChunkRules.newline_indent  # a newline run takes the indentation after it
    backend: Literal["bpe", "sentencepiece"] = "bpe"
    max_memory: str = "2GB"  # memory the training may use
    text_field: str = "text"


def training_text(record: dict, text_field: str = "text") -> str:
    """The trainable text of a text record or a chat record (whatever contents it holds, joined), else ""."""
    try:
        return record_text(record, text_field, strict=False)[0]
    except Unusable:
        return ""


def tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    """tokenizer_config.json: loads as PreTrainedTokenizerFast in transformers 4.45+ and 5.x."""
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": EOS,
            "pad_token": EOS, "unk_token": None, "model_max_length": MODEL_MAX_LENGTH,
            "clean_up_tokenization_spaces": False, "additional_special_tokens": SPECIAL_TOKENS[1:],
            "added_tokens_decoder": added, "chat_template": CHAT_TEMPLATE}


def parse_size(text: str | int) -> int:
    """'2GB', '512MB', '1.5G' or a number of bytes → bytes; XiaolmError if unreadable."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise XiaolmError(f"cannot read the memory size '{text}'", where="max_memory",
                          hint="write it like 2GB, 512MB or 1.5G")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_"))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id (0 .. vocab_size − 1) fits, i.e. up to 65,536 tokens; else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def vocab_too_large(vocab_size: int, supported: int, how: str, min_frequency: int = 1) -> XiaolmError:
    """The error for a corpus that supports fewer tokens than asked for; `how` says how `supported` is known."""
    lower = ", a lower --min-frequency" if min_frequency > 1 else ""
    return XiaolmError(f"vocab_size={vocab_size} is larger than this corpus supports ({how} {supported} tokens)",
                       where="vocab_size", hint=f"use --vocab-size {supported} or less{lower}, or more text")


def _sentencepiece_error(message: str, vocab_size: int) -> XiaolmError | None:
    """sentencepiece's complaints about the vocabulary size, said our way; None for anything else."""
    extra = len(SPECIAL_TOKENS)
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        need = int(m.group(1)) + extra
        return XiaolmError(f"vocab_size={vocab_size} is too small for the characters of this corpus (needs {need})",
                           where="vocab_size", hint=f"use --vocab-size {need} or more, or --backend bpe")
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        return vocab_too_large(vocab_size, int(m.group(1)) + extra, "sentencepiece allows at most")
    return None


def _check_vocab(vocab_size: int, supported: int, how: str, min_frequency: int = 1) -> None:
    if vocab_size > supported:
        raise vocab_too_large(vocab_size, supported, how, min_frequency)


def _byte_pairs(counts: dict[str, int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of (each adjacent byte pair inside a chunk, as first·256 + second; that chunk's count)."""
    items = iter(counts.items())
    while batch := list(itertools.islice(items, _BOUND_BATCH)):
        encoded = [chunk.encode("utf-8") for chunk, _ in batch]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(batch))
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int32)
        inside = np.ones(len(data) - 1, dtype=bool)
        inside[np.cumsum(lengths)[:-1] - 1] = False  # the pair across the end of a chunk and the next one
        weights = np.repeat(np.fromiter((n for _, n in batch), dtype=np.int64, count=len(batch)), lengths)
        yield (data[:-1] * 256 + data[1:])[inside], weights[:-1][inside]


def merges_bound(counts: dict[str, int], min_frequency: int) -> int:
    """An upper bound on the tokens BPE can add to the base vocabulary from these chunk counts.

    Each new token comes from a merge, and a merge needs min_frequency adjacent occurrences of two symbols
    (overlapping ones counted, as tokenizers counts them), each an occurrence of the byte pair across their
    boundary: only boundaries whose byte pair occurs that often ever go. A merge removes at least one of them in
    some distinct chunk, and at least ⌈min_frequency/2⌉ counted by occurrence (in a run like "aaa" only every
    other occurrence of a pair is merged).
    """
    pair_counts = np.zeros(1 << 16)
    for pairs, weights in _byte_pairs(counts):
        pair_counts += np.bincount(pairs, weights=weights, minlength=1 << 16)
    frequent = pair_counts >= min_frequency
    distinct = weighted = 0
    for pairs, weights in _byte_pairs(counts):
        removable = frequent[pairs]
        distinct += int(removable.sum())
        weighted += int(weights[removable].sum())
    return min(distinct, weighted // ((min_frequency + 1) // 2))


def _texts(files: list[Path], text_field: str, rejects: RejectLog, stats: dict[str, int]) -> Iterator[str]:
    for record, _ in read_records(files, rejects):
        text = training_text(record, text_field)
        if text:
            stats["texts"] += 1
            yield text
        else:
            stats["skipped"] += 1


def train_bpe_from_counts(counts: dict[str, int], vocab_size: int, min_frequency: int = 2,
                          rules: ChunkRules | None = None) -> Tokenizer:
    """Byte-level BPE learnt by tokenizers' BpeTrainer from chunk counts, with our pre-tokenizer attached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # byte-level chunks contain no whitespace: one chunk repeated n times, space-separated, counts n words
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=sys.stderr.isatty(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def words() -> Iterator[str]:
        for chunk, n in sorted(counts.items()):  # a fixed order: the trainer breaks ties by first sight
            word = to_byte_level(chunk) + " "
            while n > 0:
                k = min(n, _REPEAT)
                yield word * k
                n -= k

    tok.train_from_iterator(words(), trainer=trainer)
    tok.pre_tokenizer = build_pre_tokenizer(rules)
    tok.decoder = decoders.ByteLevel()
    return tok


def _train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int, rules: ChunkRules, max_memory: int,
               workers: int) -> tuple[Tokenizer, dict[str, Any]]:
    capacity = max(1024, (max_memory - BASE_MEMORY) // COUNT_BYTES_PER_CHUNK)
    keep = max(1024, (max_memory - BASE_MEMORY) // TRAIN_BYTES_PER_CHUNK)
    t0 = time.perf_counter()
    result = count_chunks(texts, capacity, workers=workers, rules=rules, keep=keep)
    count_s = time.perf_counter() - t0
    log.info("tokenizer: counted %d chunks (%d distinct in tables of at most %d) in %.1fs with %d processes; "
             "counts are low by at most %d; training on the %d most frequent", result.total, result.distinct,
             capacity, count_s, workers, result.dropped_max, len(result.counts))
    supported = BASE_VOCAB + merges_bound(result.counts, min_frequency)
    _check_vocab(vocab_size, supported, "its chunk counts allow at most", min_frequency)
    t1 = time.perf_counter()
    tok = train_bpe_from_counts(result.counts, vocab_size, min_frequency, rules)
    info = {"chunks": result.total, "distinct_chunks_counted": result.distinct, "table_capacity": capacity,
            "distinct_chunks_trained": len(result.counts), "trained_capacity": keep,
            "min_count_trained": result.min_kept, "count_error_max": result.dropped_max,
            "count_error_bound": 2 * result.total // (result.capacity + 2), "prunes": result.prunes,
            "workers": workers,
            "count_seconds": round(count_s, 3), "merge_seconds": round(time.perf_counter() - t1, 3)}
    return tok, info


def _save(tok: Tokenizer, out_dir: Path, config_text: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "_SUCCESS").unlink(missing_ok=True)
    atomic_write_text(out_dir / "tokenizer.json", tok.to_str(pretty=True))
    atomic_write_json(out_dir / "tokenizer_config.json", tokenizer_config(tok))
    atomic_write_json(out_dir / "special_tokens_map.json", {
        "eos_token": EOS, "pad_token": EOS, "additional_special_tokens": SPECIAL_TOKENS[1:]})
    atomic_write_text(out_dir / "chat_template.jinja", CHAT_TEMPLATE)
    atomic_write_text(out_dir / "config.yaml", config_text)


def train_tokenizer(inputs: Sequence[str | Path], out_dir: str | Path, vocab_size: int = 8192,
                    min_frequency: int = 2, text_field: str = "text", cjk_chars: bool = False,
                    backend: str = "bpe", max_memory: str | int = "2GB", workers: int | None = None,
                    max_cjk_run: int = ChunkRules.max_cjk_run, cjk_space: bool = ChunkRules.cjk_space,
                    digits: int = ChunkRules.digits, newline_indent: bool = ChunkRules.newline_indent) -> Path:
    """Train on every text/chat record of `inputs`; save an AutoTokenizer-loadable dir and return it.

    backend "bpe": text cut into chunks as ChunkRules(cjk_chars, max_cjk_run, cjk_space, digits, newline_indent)
    say, chunk counts in bounded memory (`max_memory`, `workers` processes), then byte-level BPE;
    backend "sentencepiece": a sentencepiece unigram model on a memory-bounded sample of lines, byte fallback.
    With workers > 1 the counting processes are spawned: scripts must call this under `if __name__ == "__main__"`.
    """
    if backend not in BACKENDS:
        raise XiaolmError(f"unknown backend '{backend}'", where="backend", hint=f"use one of {', '.join(BACKENDS)}")
    if vocab_size < BASE_VOCAB:
        raise XiaolmError(f"vocab_size={vocab_size} is too small", where="vocab_size",
                          hint=f"use at least {BASE_VOCAB}: 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    if min_frequency < 1:
        raise XiaolmError(f"min_frequency={min_frequency} must be at least 1", where="min_frequency")
    rules = ChunkRules(cjk_chars, max_cjk_run, cjk_space, digits, newline_indent)
    rules.check()
    if backend != "bpe" and rules != ChunkRules(cjk_chars=cjk_chars):
        raise XiaolmError("max_cjk_run, cjk_space, digits and newline_indent work only with the bpe backend",
                          where="backend", hint="leave them at their defaults or use --backend bpe")
    memory = parse_size(max_memory)
    if memory < MIN_MEMORY:
        raise XiaolmError(f"max_memory={max_memory} is too small", where="max_memory",
                          hint=f"allow at least {MIN_MEMORY >> 20}MB")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise XiaolmError(f"workers={workers} must be at least 1", where="workers")
    if token_dtype(vocab_size) != np.uint16:
        log.warning("tokenizer: vocab_size %d exceeds 65,536, so token files will be uint32", vocab_size)
    out_dir = Path(out_dir)
    files = stage_inputs(inputs, out_dir)
    for path in files:
        check_readable(path)
    settings = {"vocab_size": vocab_size, "min_frequency": min_frequency, "text_field": text_field,
                **dataclasses.asdict(rules), "backend": backend, "max_memory": memory, "workers": workers,
                "inputs": [str(i) for i in inputs]}
    config_text = yaml.safe_dump(settings, allow_unicode=True, sort_keys=False)
    fingerprint = inputs_fingerprint(files)
    if finished_stage(out_dir, config_text, fingerprint, "report.json", required=OUTPUT_FILES) is not None:
        log.info("tokenizer: %s is up to date (same inputs and settings); skipping", out_dir)
        return out_dir
    start = time.perf_counter()
    stats = {"texts": 0, "skipped": 0}
    with RejectLog(None) as rejects:
        texts = _texts(files, text_field, rejects, stats)
        first = next(texts, None)
        if first is None:
            raise XiaolmError("no text to train on", where=", ".join(map(str, inputs)),
                              hint=f"inputs need '{text_field}' or 'messages' records")
        texts = itertools.chain([first], texts)
        if backend == "bpe":
            tok, info = _train_bpe(texts, vocab_size, min_frequency, rules, memory, workers)
        else:
            from xiaolm.tokenizer.spm import train_sentencepiece

            try:
                tok, info = train_sentencepiece(texts, vocab_size, memory, cjk_chars, threads=workers)
            except RuntimeError as e:
                raise _sentencepiece_error(str(e), vocab_size) or e from e
    if rejects.total or stats["skipped"]:
        log.warning("tokenizer: skipped %d records without text and %d unreadable ones (%s)",
                    stats["skipped"], rejects.total, rejects.summary())
    _check_vocab(vocab_size, tok.get_vocab_size(), "training found only", min_frequency if backend == "bpe" else 1)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise AssertionError(f"special tokens got ids {ids}")
    _save(tok, out_dir, config_text)
    seconds = round(time.perf_counter() - start, 3)
    atomic_write_json(out_dir / "report.json", {
        "texts": stats["texts"], "skipped": stats["skipped"], "rejected": dict(rejects.counts),
        "backend": backend, "vocab_size": tok.get_vocab_size(), "seconds": seconds, **info,
        "max_memory": memory, "inputs": fingerprint})
    atomic_write_text(out_dir / "_SUCCESS", "")
    log.info("tokenizer: trained %s on %d texts in %.1fs, vocab %d — %s", backend, stats["texts"], seconds,
             tok.get_vocab_size(), out_dir)
    return out_dir



def tokenizer_hash(path: str | Path) -> str:
    """sha256 of tokenizer.json, recorded in meta.json so token files and models can be matched."""
    file = Path(path, "tokenizer.json")
    if not file.is_file():
        raise XiaolmError("no tokenizer.json here", where=str(path),
                          hint="train one with `xiaolm tokenizer train`")
    return hashlib.sha256(file.read_bytes()).hexdigest()
