"""How well a trained tokenizer compresses some text, per source and against a plain BPE: `xiaolm tokenizer stats`."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import regex
import yaml

from xiaolm.errors import XiaolmError
from xiaolm.records.inputs import stage_inputs
from xiaolm.records.read import read_records
from xiaolm.records.rejects import RejectLog
from xiaolm.tokenizer.pretokenize import CJK

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_ONE_CJK = regex.compile(rf"[{CJK}]")
_BATCH = 256
BASELINES = ("bytelevel",)
NO_SOURCE = "-"  # the source of records without a `source` field


def train_bytelevel_baseline(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A plain `tokenizers` byte-level BPE (GPT-2's pre-tokenizer, our special tokens) of `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from xiaolm.chat_format import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer_json(tokenizer_dir: str | Path) -> Tokenizer:
    """The `tokenizers` Tokenizer saved in a dir; XiaolmError if it has none."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise XiaolmError("no tokenizer.json here", where=str(tokenizer_dir),
                          hint="train one with `xiaolm tokenizer train` or pass a dir that has one")
    return Tokenizer.from_file(str(path))


def _texts(inputs: Sequence[str | Path], text_field: str, rejects: RejectLog) -> Iterator[tuple[str, str, str]]:
    """(text, source, "file:line") of every record with text."""
    from xiaolm.tokenizer.train import training_text

    for record, where in read_records(inputs, rejects):
        text = training_text(record, text_field)
        if text:
            source = record.get("source")
            yield text, source if isinstance(source, str) and source else NO_SOURCE, where


def _baseline(kind: str, tokenizer_dir: Path, vocab_size: int, train_inputs: Sequence[str | Path] | None,
              text_field: str) -> tuple[Tokenizer, dict[str, Any]]:
    """The baseline tokenizer, trained on `train_inputs` or else on the inputs the tokenizer was trained on."""
    if kind not in BASELINES:
        raise XiaolmError(f"unknown baseline '{kind}'", where="baseline", hint=f"use one of {', '.join(BASELINES)}")
    config = tokenizer_dir / "config.yaml"
    settings = yaml.safe_load(config.read_text(encoding="utf-8")) if config.is_file() else {}
    inputs = list(train_inputs or settings.get("inputs") or [])
    if not inputs:
        raise XiaolmError("the inputs this tokenizer was trained on are unknown (no config.yaml)",
                          where=str(tokenizer_dir), hint="pass the baseline's training text with --baseline-train")
    files = stage_inputs(inputs, tokenizer_dir)
    min_frequency = int(settings.get("min_frequency", 2))
    with RejectLog(None) as rejects:
        tok = train_bytelevel_baseline((t for t, _, _ in _texts(files, text_field, rejects)), vocab_size,
                                       min_frequency)
    return tok, {"kind": kind, "trained_on": [str(i) for i in inputs], "min_frequency": min_frequency,
                 "vocab_size": tok.get_vocab_size()}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def _source_row(chars: int, tokens: int, base_tokens: int | None) -> dict[str, Any]:
    row = {"chars": chars, "tokens": tokens, "chars_per_token": _ratio(chars, tokens)}
    if base_tokens is not None:  # ours / baseline in chars per token, i.e. baseline tokens / our tokens
        row.update(baseline_tokens=base_tokens, baseline_chars_per_token=_ratio(chars, base_tokens),
                   ratio=_ratio(base_tokens, tokens))
    return row


def tokenizer_stats(tokenizer_dir: str | Path, inputs: Sequence[str | Path], limit: int = 0, worst: int = 5,
                    text_field: str = "text", baseline: str | None = None,
                    baseline_train: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Chars and bytes per token (overall and per record `source`), vocabulary use, single-CJK-character share and
    the worst-compressed texts.

    baseline="bytelevel" also trains a plain `tokenizers` ByteLevel BPE of the same vocabulary size (and
    min_frequency) on `baseline_train`, by default the inputs the tokenizer was trained on (its config.yaml), and
    reports chars per token ours / baseline per source and overall. That trainer holds its whole corpus in memory.
    """
    tok = load_tokenizer_json(tokenizer_dir)
    vocab = tok.get_vocab_size()
    base, base_info = (_baseline(baseline, Path(tokenizer_dir), vocab, baseline_train, text_field) if baseline
                       else (None, None))
    used = bytearray(vocab)
    single_cjk = [bool(_ONE_CJK.fullmatch(tok.decode([i], skip_special_tokens=False))) for i in range(vocab)]
    texts = chars = nbytes = tokens = cjk_tokens = 0
    by_source: dict[str, list[int]] = {}  # source → [texts, chars, tokens, baseline tokens]
    worst_heap: list[tuple[float, int, str, str]] = []
    with RejectLog(None) as rejects:
        records = _texts(inputs, text_field, rejects)
        if limit:
            records = itertools.islice(records, limit)
        while batch := list(itertools.islice(records, _BATCH)):
            batch_texts = [t for t, _, _ in batch]
            encodings = tok.encode_batch(batch_texts, add_special_tokens=False)
            base_encodings = (base.encode_batch(batch_texts, add_special_tokens=False) if base
                              else [None] * len(batch))
            for (text, source, where), enc, base_enc in zip(batch, encodings, base_encodings, strict=True):
                ids = enc.ids
                texts, chars, tokens = texts + 1, chars + len(text), tokens + len(ids)
                nbytes += len(text.encode("utf-8"))
                counts = by_source.setdefault(source, [0, 0, 0, 0])
                counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + len(text), counts[2] + len(ids)
                counts[3] += len(base_enc.ids) if base_enc else 0
                for i in ids:
                    used[i] = 1
                    cjk_tokens += single_cjk[i]
                ratio = len(text) / max(1, len(ids))
                # keep the `worst` lowest chars/token: a max-heap on -ratio
                item = (-ratio, texts, where, text[:80])
                if len(worst_heap) < worst:
                    heapq.heappush(worst_heap, item)
                elif worst and item > worst_heap[0]:
                    heapq.heapreplace(worst_heap, item)
    if not texts:
        raise XiaolmError("no text to measure", where=", ".join(map(str, inputs)),
                          hint=f"inputs need '{text_field}' or 'messages' records")
    stats = {
        "texts": texts, "chars": chars, "bytes": nbytes, "tokens": tokens,
        "chars_per_token": _ratio(chars, tokens), "bytes_per_token": _ratio(nbytes, tokens),
        "vocab_size": vocab, "vocab_used": sum(used), "vocab_used_share": _ratio(sum(used), vocab),
        "single_cjk_token_share": _ratio(cjk_tokens, tokens), "single_cjk_vocab_entries": sum(single_cjk),
        "by_source": {s: {"texts": n, **_source_row(c, t, b if base else None)}
                      for s, (n, c, t, b) in sorted(by_source.items())},
        "worst": [{"where": w, "chars_per_token": round(-r, 3), "text": t}
                  for r, _, w, t in sorted(worst_heap, reverse=True)],
        "rejected": dict(rejects.counts),
    }
    if base_info:
        stats["baseline"] = {**base_info, **_source_row(chars, tokens, sum(c[3] for c in by_source.values()))}
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """A short plain-text report of tokenizer_stats."""
    lines = [
        f"texts              {stats['texts']:,} ({stats['chars']:,} chars, {stats['bytes']:,} bytes)",
        f"tokens             {stats['tokens']:,}",
        f"chars per token    {stats['chars_per_token']:.3f}",
        f"bytes per token    {stats['bytes_per_token']:.3f}",
        f"vocabulary used    {stats['vocab_used']:,} of {stats['vocab_size']:,} ({stats['vocab_used_share']:.1%})",
        f"single-CJK tokens  {stats['single_cjk_token_share']:.1%} of tokens "
        f"({stats['single_cjk_vocab_entries']:,} vocabulary entries)",
    ]
    base = stats.get("baseline")
    rows = [*stats["by_source"].items(), *([("(all)", base)] if base else [])]
    if base:
        lines.append(f"baseline           plain {base['kind']} BPE, vocabulary {base['vocab_size']:,}, trained on "
                     f"{', '.join(base['trained_on'])}")
    lines.append("per source         texts      chars     tokens  chars/token" +
                 ("  baseline  ours/baseline" if base else ""))
    for source, row in rows:
        line = (f"  {source[:16]:16s} {row.get('texts', stats['texts']):6,} {row['chars']:10,} {row['tokens']:10,}"
                f"  {row['chars_per_token']:11.3f}")
        if base:
            line += f"  {row['baseline_chars_per_token']:8.3f}  {row['ratio']:13.3f}"
        lines.append(line)
    lines.append("worst compressed:")
    for row in stats["worst"]:
        lines.append(f"  {row['chars_per_token']:.3f} chars/token  {row['where']}  {row['text']!r}")
    return "\n".join(lines)
