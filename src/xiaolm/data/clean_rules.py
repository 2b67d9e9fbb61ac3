"""Cleaning rules: the normalizers and filters as pure text functions, and the tables the Cleaner runs them from."""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xiaolm.errors import XiaolmError

# NFKC would turn these into ASCII (，→, ！→! …→...); Chinese text keeps them full width
KEEP_FULL_WIDTH = "，！？；：（）～…"
_KEEP = re.compile(f"[{re.escape(KEEP_FULL_WIDTH)}]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"  # C0/C1 controls but \t and \n
                      r"\u200b\u200c\u200e\u200f\u202a-\u202e\u2060\ufeff]")  # zero-width, bidi, BOM
_BLOCK_TAGS = ("address|article|aside|blockquote|body|br|caption|dd|div|dl|dt|figcaption|figure|footer|form|"
               "h[1-6]|head|header|hr|html|li|main|nav|ol|p|pre|section|table|tbody|td|tfoot|th|thead|title|tr|ul")
_INLINE_TAGS = ("a|abbr|b|big|center|cite|code|del|em|font|i|img|input|ins|kbd|label|link|mark|meta|nobr|q|s|"
                "small|source|span|strike|strong|sub|sup|tt|u|var|wbr")
_ATTRS = r"""(?:\s+[\w:.-]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'<>]+))?)*\s*/?>"""
_DROP = re.compile(r"<!--.*?-->|<(script|style)\b[^>]*>.*?</\1\s*>|<!DOCTYPE[^>]*>", re.I | re.S)
_BLOCK = re.compile(rf"</?(?:{_BLOCK_TAGS})\b{_ATTRS}", re.I)
_INLINE = re.compile(rf"</?(?:{_INLINE_TAGS})\b{_ATTRS}", re.I)
_ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_SPACE = re.compile(r"\s+")
_RUN = re.compile(r"(.)\1+", re.S)  # a character repeated
_SEPARATORS = ("\n\n", "\n", "。", "！", "？", "；", ". ", "，", " ")


def nfkc(text: str) -> str:
    """Unicode NFKC (full-width letters and digits → ASCII), keeping Chinese full-width punctuation."""
    parts = _KEEP.split(text)
    if len(parts) == 1:
        return unicodedata.normalize("NFKC", text)
    keeps = _KEEP.findall(text)
    out = [unicodedata.normalize("NFKC", parts[0])]
    for keep, part in zip(keeps, parts[1:], strict=True):
        out += [keep, unicodedata.normalize("NFKC", part)]
    return "".join(out)


def strip_markup(text: str) -> str:
    """Remove HTML tags (block tags become line breaks), comments and scripts; unescape entities."""
    if "<" in text:
        text = _INLINE.sub("", _BLOCK.sub("\n", _DROP.sub("", text)))
    return html.unescape(text) if _ENTITY.search(text) else text


def strip_control(text: str) -> str:
    """Remove control and zero-width characters (newline and tab stay); CRLF and CR become LF."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n")
    return _CONTROL.sub("", text)


def collapse_space(text: str) -> str:
    """Drop trailing spaces on each line, shorten runs of blank lines to one, trim both ends."""
    return _BLANKS.sub("\n\n", _TRAILING.sub("\n", text)).strip()


_WIKI_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref\s*>", re.I | re.S)
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_WIKI_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_WIKI_EXTERNAL = re.compile(r"\[(?:https?://|www\.)\S+\s+([^\]]+)\]")
_WIKI_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$", re.M)
_WIKI_QUOTES = re.compile(r"'{2,5}")
_URL = re.compile(r"(?:https?://|www\.)[^\s\u3000-\u303f\uff00-\uffef<>\"'）)\]]+", re.I)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_HALF_PUNCT = re.compile(r"(?<=[\u3400-\u9fff])([,;:?!])(?=[\u3400-\u9fff\u201c\u300a]|[ \t]*$)", re.M)
_FULL = {",": "，", ";": "；", ":": "：", "?": "？", "!": "！"}
_PUNCT_RUN = re.compile(r"([，。！？；：、…~～])\1{3,}")


def strip_wiki(text: str) -> str:
    """Wiki markup to plain text: [[target|label]] → label, templates and <ref> notes dropped, headings kept."""
    if not any(mark in text for mark in ("[[", "{{", "''", "==", "<ref")):
        return text
    text = _WIKI_REF.sub("", text)
    for _ in range(3):  # nested templates, innermost first
        text, n = _WIKI_TEMPLATE.subn("", text)
        if not n:
            break
    text = _WIKI_EXTERNAL.sub(r"\1", _WIKI_LINK.sub(r"\1", text))
    return _WIKI_QUOTES.sub("", _WIKI_HEADING.sub(r"\2", text))


def strip_urls(text: str) -> str:
    """Remove web addresses."""
    return _URL.sub("", text) if ("http" in text or "www." in text) else text


def strip_emails(text: str) -> str:
    """Remove e-mail addresses."""
    return _EMAIL.sub("", text) if "@" in text else text


def normalize_punct(text: str) -> str:
    """ASCII , ; : ? ! right after Chinese become full width; a run of one Chinese mark is cut to three."""
    text = _HALF_PUNCT.sub(lambda m: _FULL[m.group(1)], text)
    return _PUNCT_RUN.sub(r"\1\1\1", text)


def remove_space(text: str) -> str:
    """The text with all whitespace removed."""
    return _SPACE.sub("", text)


def longest_char_run(text: str) -> int:
    """Length of the longest run of one repeated character (whitespace ignored)."""
    chars = remove_space(text)
    return max((len(m.group(0)) for m in _RUN.finditer(chars)), default=min(len(chars), 1))


def dup_line_ratio(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line (0 for fewer than 3 lines)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) < 3:
        return 0.0
    return 1 - len(set(lines)) / len(lines)


def dup_ngram_ratio(text: str, n: int = 10) -> float:
    """Share of characters covered by character n-grams that occur more than once (whitespace removed)."""
    chars = remove_space(text)
    if len(chars) < 2 * n:
        return 0.0
    grams = [chars[i:i + n] for i in range(len(chars) - n + 1)]
    if len(set(grams)) == len(grams):  # the common case: nothing repeats
        return 0.0
    first: dict[str, int] = {}
    covered = bytearray(len(chars))
    for i, gram in enumerate(grams):
        j = first.setdefault(gram, i)
        if j != i:
            covered[i:i + n] = b"\x01" * n
            covered[j:j + n] = b"\x01" * n
    return sum(covered) / len(chars)


def cjk_ratio(text: str) -> float:
    """Share of CJK ideographs among non-space characters."""
    chars = remove_space(text)
    return len(_CJK.findall(chars)) / len(chars) if chars else 0.0


def split_long(text: str, max_chars: int) -> list[str]:
    """Split at paragraph, then line, then sentence boundaries into pieces of at most max_chars."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    for sep in _SEPARATORS:
        parts = [p + sep for p in text.split(sep)]
        parts[-1] = parts[-1][: -len(sep)]
        parts = [p for p in parts if p.strip()]
        if len(parts) > 1:
            break
    else:
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    pieces, current = [], ""
    for part in parts:
        if current and len(current) + len(part) > max_chars:
            pieces.append(current)
            current = ""
        if len(part) > max_chars:
            pieces.extend(split_long(part, max_chars))
        else:
            current += part
    pieces.append(current)
    return [p.strip() for p in pieces if p.strip()]


@functools.cache
def _opencc_t2s() -> Callable[[str], str]:
    import opencc

    return opencc.OpenCC("t2s").convert


def t2s(text: str) -> str:
    """Traditional → Simplified Chinese (OpenCC t2s)."""
    return _opencc_t2s()(text)

def block_list_pattern(path: str) -> re.Pattern:
    """One regex matching any keyword of the block-list file (one a line, # comments)."""
    try:
        words = [w.strip() for w in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise XiaolmError(f"cannot read the block list ({e})", where=path,
                          hint="block_list must be a UTF-8 file, one keyword a line") from None
    words = sorted({w for w in words if w and not w.startswith("#")}, key=len, reverse=True)
    if not words:
        raise XiaolmError("the block list holds no keywords", where=path)
    return re.compile("|".join(map(re.escape, words)))


def other_language(lang: str) -> Callable[[str], bool]:
    """text → whether langid.py finds another language than `lang` in it."""
    try:
        import langid
    except ImportError:
        raise XiaolmError(f"lang={lang} needs the langid package", where="lang",
                          hint="pip install langid (or xiaolm[lang]), or leave lang empty") from None
    return lambda text: langid.classify(text)[0] != lang


def assistant_answers(messages: list[dict]) -> list[str]:
    """The contents of the assistant turns of a conversation."""
    return [m["content"] for m in messages if m["role"] == "assistant"]


def _never(value: Any) -> bool:
    return False


def _unset(value: Any) -> bool:
    return not value


@dataclass(frozen=True)
class Filter:
    """A reject rule: `reason` when `fails(text, limit)`, the limit being CleanConfig.<setting> (or prepare(it))."""

    reason: str  # the code in rejects.jsonl and report.json
    setting: str  # the CleanConfig field holding the limit
    fails: Callable[[Any, Any], bool]
    off: Callable[[Any], bool] = _never  # the setting values that switch the rule off
    prepare: Callable[[Any], Any] | None = None  # setting → limit (read a file, import a package), once per Cleaner
    chat_setting: str = ""  # chats take their limit from this field instead (empty: the same one)
    per_answer: bool = False  # chats: test each assistant answer alone instead of the whole conversation


# the normalizers in the order they run; each name is its CleanConfig switch and its key in the report's "modified"
NORMALIZERS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("strip_wiki", strip_wiki),
    ("strip_markup", strip_markup),
    ("strip_urls", strip_urls),
    ("strip_emails", strip_emails),
    ("strip_control", strip_control),
    ("nfkc", nfkc),
    ("t2s", t2s),
    ("normalize_punct", normalize_punct),
    ("collapse_space", collapse_space),
)
# filters on a document's text, in order: the first that fails names the reason. A chat is tested as its contents
# joined, except that the repetition filters read each assistant answer alone (answers restate the question, and
# training learns only the answers), and it has its own limits where instruction data differs from web text:
# step-by-step answers repeat phrases, translation and code tasks mix scripts
TEXT_FILTERS: tuple[Filter, ...] = (
    Filter("too_short", "min_chars", lambda text, n: len(text) < n),
    Filter("too_long", "max_chars", lambda text, n: len(text) > n),
    Filter("low_cjk_ratio", "min_cjk_ratio", lambda text, r: cjk_ratio(text) < r, off=lambda r: r <= 0,
           chat_setting="chat_min_cjk_ratio"),
    Filter("char_repetition", "max_char_run", lambda text, n: longest_char_run(text) > n, off=lambda n: n <= 0,
           per_answer=True),
    Filter("line_repetition", "max_dup_line_ratio", lambda text, r: dup_line_ratio(text) > r, off=lambda r: r >= 1,
           chat_setting="chat_max_dup_line_ratio", per_answer=True),
    Filter("ngram_repetition", "max_dup_ngram_ratio", lambda text, r: dup_ngram_ratio(text) > r,
           off=lambda r: r >= 1, chat_setting="chat_max_dup_ngram_ratio", per_answer=True),
    Filter("blocked_keyword", "block_list", lambda text, words: words.search(text) is not None, off=_unset,
           prepare=block_list_pattern),
    Filter("wrong_language", "lang", lambda text, other: other(text), off=_unset, prepare=other_language),
)
# filters on a chat's messages, run before its text filters
CHAT_FILTERS: tuple[Filter, ...] = (
    Filter("answer_too_short", "min_answer_chars",
           lambda messages, n: any(len(a.strip()) < n for a in assistant_answers(messages))),
    Filter("prompt_too_long", "max_prompt_chars",
           lambda messages, n: sum(len(m["content"]) for m in messages if m["role"] == "user") > n),
)
