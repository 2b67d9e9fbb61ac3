"""Chinese-aware pre-tokenization: the same chunks from HF `tokenizers` (encoding) and from Python (counting)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import regex

from xiaolm.errors import XiaolmError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\p{Bopomofo}"
DIGIT = r"\p{N}"
# the cap on CJK runs that tokenizers trained with cjk_chars keep in their pattern (see ChunkRules.split_pattern)
CHAR_LEVEL_CJK_RUN = 8


@dataclass(frozen=True)
class ChunkRules:
    """How text is cut into chunks before BPE: no token ever spans two chunks.

    Measured against a plain `tokenizers` ByteLevel BPE of the same vocabulary on real Chinese text by source
    (benchmarks/tokenizer_compression.py). Beyond these rules: punctuation runs take the newlines after them,
    and words of other scripts their leading space.
    """

    cjk_chars: bool = False  # every CJK character alone: a character-level vocabulary for Chinese
    # CJK runs are cut every max_cjk_run characters (0: never): chunks, and the BPE trainer's memory per chunk, stay
    # bounded on web text with long unpunctuated runs. 16 costs <0.5% against no cap; 8 cost 1.5-2% on man pages
    # and technical text and 0.3-0.5% on prose
    max_cjk_run: int = 16
    # a space before a CJK run joins it ("使用 -l 选项"): +3-4% on man pages, +2-3% on technical text, but the
    # vocabulary it takes (3-4% of it) costs 0.3% on Chinese without spaces
    cjk_space: bool = False
    # digits per chunk at most (0: a whole run). One by one lets small models learn numerals and arithmetic, at
    # ~1% on man pages
    digits: int = 1
    newline_indent: bool = False  # a newline run takes the indentation after it: +1.6-1.7% on man pages

    def check(self) -> None:
        """XiaolmError for a negative cap or digit group."""
        for key in ("max_cjk_run", "digits"):
            if getattr(self, key) < 0:
                raise XiaolmError(f"{key}={getattr(self, key)} must be 0 (no limit) or more", where=key)

    def isolate_pattern(self) -> str:
        """Chunks that always stand alone: digit groups, and with cjk_chars every CJK character."""
        digits = DIGIT if self.digits == 1 else rf"{DIGIT}+" if self.digits == 0 else rf"{DIGIT}{{1,{self.digits}}}"
        return rf"{digits}|[{CJK}]" if self.cjk_chars else digits

    def split_pattern(self) -> str:
        """The rest, in order: CJK runs; words of other scripts with an optional leading space; punctuation/symbol
        runs (with the newlines after them); newline runs; other whitespace."""
        if self.cjk_chars:  # CJK characters are isolated already, so the run rules never apply: the pattern
            cjk = rf"[{CJK}]{{1,{CHAR_LEVEL_CJK_RUN}}}"  # keeps its old text and earlier tokenizer.json files
        else:
            run = rf"{{1,{self.max_cjk_run}}}" if self.max_cjk_run else "+"
            cjk = (" ?" if self.cjk_space else "") + rf"[{CJK}]{run}"
        # a newline run, then (newline_indent) the indentation after it but its last space, which goes with the word
        indent = r"(?:[^\S\r\n]+(?!\S))?" if self.newline_indent else ""
        return rf"{cjk}| ?[^\s{CJK}\p{{P}}\p{{S}}\p{{N}}]+| ?[\p{{P}}\p{{S}}]+[\r\n]*|\s*[\r\n]+{indent}|\s+(?!\S)|\s+"


def _rules(rules: ChunkRules | None) -> ChunkRules:
    return ChunkRules() if rules is None else rules


def build_pre_tokenizer(rules: ChunkRules | None = None):
    """The HF pre-tokenizer: isolate digits (and CJK chars), split into chunks, map bytes to visible chars."""
    from tokenizers import Regex, pre_tokenizers

    rules = _rules(rules)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rules.isolate_pattern()), behavior="isolated"),
        pre_tokenizers.Split(Regex(rules.split_pattern()), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def build_empty_tokenizer(rules: ChunkRules | None = None) -> Tokenizer:
    """An untrained byte-level BPE with the Chinese-aware pre-tokenizer and no normalizer.

    With cjk_chars merges never span CJK characters: a character-level vocabulary for Chinese (BPE still merges
    other scripts). Tiny models learn compositional tasks (numerals, arithmetic, facts) far faster this way, at
    the cost of ~1.5x more tokens per text.
    """
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = build_pre_tokenizer(rules)
    tok.decoder = decoders.ByteLevel()
    return tok


class ChunkSplitter:
    """Python mirror of build_pre_tokenizer's split (before the byte mapping), fast enough to count a corpus."""

    def __init__(self, rules: ChunkRules | None = None):
        rules = _rules(rules)
        self._isolate = regex.compile(f"({rules.isolate_pattern()})")
        self._split = regex.compile(rules.split_pattern())

    def chunks(self, text: str) -> Iterator[str]:
        """The chunks of `text` in order; they concatenate back to `text`."""
        for i, part in enumerate(self._isolate.split(text)):
            if i % 2:
                yield part
            elif part:
                yield from self._split.findall(part)


def _byte_map() -> dict[int, str]:
    """GPT-2's byte → printable character map, the alphabet of byte-level BPE."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    if set(mapping.values()) != set(alphabet):
        raise AssertionError("byte-level alphabet differs from tokenizers'")
    return mapping


# latin-1 char i stands for byte i; translate it to the byte-level char
_TO_BYTE_LEVEL = str.maketrans({chr(b): c for b, c in _byte_map().items()})


def to_byte_level(chunk: str) -> str:
    """The byte-level spelling of a chunk, as tokenizers' ByteLevel pre-tokenizer writes it."""
    return chunk.encode("utf-8").decode("latin-1").translate(_TO_BYTE_LEVEL)
