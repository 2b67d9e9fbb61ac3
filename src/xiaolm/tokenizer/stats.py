"""How well a trained tokenizer compresses some text: `xiaolm tokenizer stats DIR TEXT...`."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import regex

from xiaolm.errors import XiaolmError
from xiaolm.records.read import read_records
from xiaolm.records.rejects import RejectLog
from xiaolm.tokenizer.pretokenize import CJK

_ONE_CJK = regex.compile(rf"[{CJK}]")
_BATCH = 256


def tokenizer_stats(tokenizer_dir: str | Path, inputs: Sequence[str | Path], limit: int = 0,
                    worst: int = 5, text_field: str = "text") -> dict[str, Any]:
    """Chars and bytes per token, vocabulary use, single-CJK-character share and the worst-compressed texts."""
    from tokenizers import Tokenizer

    from xiaolm.tokenizer.train import training_text

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise XiaolmError("no tokenizer.json here", where=str(tokenizer_dir),
                          hint="train one with `xiaolm tokenizer train` or pass a dir that has one")
    tok = Tokenizer.from_file(str(path))
    vocab = tok.get_vocab_size()
    used = bytearray(vocab)
    single_cjk = [False] * vocab
    for token_id in range(vocab):
        single_cjk[token_id] = bool(_ONE_CJK.fullmatch(tok.decode([token_id], skip_special_tokens=False)))
    texts = chars = nbytes = tokens = cjk_tokens = 0
    worst_heap: list[tuple[float, int, str, str]] = []
    with RejectLog(None) as rejects:
        records = ((training_text(r, text_field), where) for r, where in read_records(inputs, rejects))
        records = ((t, w) for t, w in records if t)
        if limit:
            records = itertools.islice(records, limit)
        while batch := list(itertools.islice(records, _BATCH)):
            encodings = tok.encode_batch([t for t, _ in batch], add_special_tokens=False)
            for (text, where), enc in zip(batch, encodings, strict=True):
                ids = enc.ids
                texts, chars, tokens = texts + 1, chars + len(text), tokens + len(ids)
                nbytes += len(text.encode("utf-8"))
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
    return {
        "texts": texts, "chars": chars, "bytes": nbytes, "tokens": tokens,
        "chars_per_token": round(chars / tokens, 4) if tokens else 0.0,
        "bytes_per_token": round(nbytes / tokens, 4) if tokens else 0.0,
        "vocab_size": vocab, "vocab_used": sum(used), "vocab_used_share": round(sum(used) / vocab, 4),
        "single_cjk_token_share": round(cjk_tokens / tokens, 4) if tokens else 0.0,
        "single_cjk_vocab_entries": sum(single_cjk),
        "worst": [{"where": w, "chars_per_token": round(-r, 3), "text": t}
                  for r, _, w, t in sorted(worst_heap, reverse=True)],
        "rejected": dict(rejects.counts),
    }


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
        "worst compressed:",
    ]
    for row in stats["worst"]:
        lines.append(f"  {row['chars_per_token']:.3f} chars/token  {row['where']}  {row['text']!r}")
    return "\n".join(lines)
