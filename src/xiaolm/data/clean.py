"""Cleaning: small named normalizers and filters, per-rule counts and examples, rejects with reasons."""

from __future__ import annotations

import hashlib
import html
import logging
import os
import re
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from xiaolm.data.executor import in_worker, parallel_workers, run_tasks, work_dir
from xiaolm.data.stage import finish_stage, gather_rejects, plan_stage
from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_open, json_line
from xiaolm.records.read import check_txt_docs, read_records
from xiaolm.records.rejects import RejectLog, reject_summary
from xiaolm.records.text import chat_messages

log = logging.getLogger(__name__)

@dataclass
class CleanConfig:
    """Each rule can be switched off; the filters apply to the text after normalization."""

    text_field: str = "text"  # field holding a document's text; chat records use "messages" instead
    txt_docs: str = "line"  # .txt inputs: line = one document a line, blank = documents separated by blank lines
    strip_wiki: bool = True  # wiki markup: [[link|text]] → text, {{templates}}, bold quotes, == headings ==, <ref>
    strip_markup: bool = True  # HTML tags, comments, scripts and entities
    strip_urls: bool = True  # http(s):// and www. addresses
    strip_emails: bool = True  # e-mail addresses
    strip_control: bool = True  # control and zero-width characters except newline and tab; CR/CRLF → LF
    nfkc: bool = True  # Unicode NFKC (full-width ASCII → half-width), Chinese punctuation stays full width
    t2s: bool = True  # Traditional → Simplified Chinese (OpenCC t2s)
    normalize_punct: bool = True  # ASCII , ; : ? ! after Chinese → full width; runs of one mark cut to three
    collapse_space: bool = True  # trailing spaces, runs of blank lines, leading/trailing whitespace
    min_chars: int = 8  # shorter documents are rejected
    max_chars: int = 20000  # longer documents are split at paragraph (then line, then sentence) boundaries
    min_cjk_ratio: float = 0.3  # share of CJK ideographs among non-space characters
    max_char_run: int = 20  # reject text with one character repeated more times in a row (0 = off)
    max_dup_line_ratio: float = 0.3  # reject text whose lines repeat earlier lines more than this share (≥ 3 lines)
    max_dup_ngram_ratio: float = 0.5  # reject text whose characters sit in repeated 10-grams more than this share
    min_answer_chars: int = 1  # chat: reject when an assistant answer is shorter
    max_prompt_chars: int = 8000  # chat: reject when the user turns together are longer
    block_list: str = ""  # file with one keyword per line: documents containing any are rejected
    lang: str = ""  # e.g. zh: reject documents another language wins for (needs `pip install langid`)
    exact_dedup: bool = True  # drop documents whose normalized text (whitespace removed) came earlier in the file


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


def longest_char_run(text: str) -> int:
    """Length of the longest run of one repeated character (whitespace ignored)."""
    chars = _SPACE.sub("", text)
    return max((len(m.group(0)) for m in _RUN.finditer(chars)), default=min(len(chars), 1))


def dup_line_ratio(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line (0 for fewer than 3 lines)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) < 3:
        return 0.0
    return 1 - len(set(lines)) / len(lines)


def dup_ngram_ratio(text: str, n: int = 10) -> float:
    """Share of characters covered by character n-grams that occur more than once (whitespace removed)."""
    chars = _SPACE.sub("", text)
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
    chars = _SPACE.sub("", text)
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


def _t2s() -> Callable[[str], str]:
    import opencc

    return opencc.OpenCC("t2s").convert


class Cleaner:
    """Applies the configured normalizers and filters to one text, counting what each rule changed."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.rules: list[tuple[str, Callable[[str], str]]] = []
        if cfg.strip_wiki:
            self.rules.append(("strip_wiki", strip_wiki))
        if cfg.strip_markup:
            self.rules.append(("strip_markup", strip_markup))
        if cfg.strip_urls:
            self.rules.append(("strip_urls", strip_urls))
        if cfg.strip_emails:
            self.rules.append(("strip_emails", strip_emails))
        if cfg.strip_control:
            self.rules.append(("strip_control", strip_control))
        if cfg.nfkc:
            self.rules.append(("nfkc", nfkc))
        if cfg.t2s:
            self.rules.append(("t2s", _t2s()))
        if cfg.normalize_punct:
            self.rules.append(("normalize_punct", normalize_punct))
        if cfg.collapse_space:
            self.rules.append(("collapse_space", collapse_space))
        self.modified: Counter[str] = Counter()
        self.examples: dict[str, list[dict]] = defaultdict(list)
        self.blocked = _block_list(cfg.block_list)
        self.classify = _language_id(cfg.lang)

    def normalize(self, text: str) -> str:
        """Run every normalizer in order."""
        for name, rule in self.rules:
            new = rule(text)
            if new != text:
                self.note(name, text, new)
                text = new
        return text

    def note(self, rule: str, before: str, after: str) -> None:
        """Count one modification by `rule`, keeping a few before/after examples."""
        self.modified[rule] += 1
        if len(self.examples[rule]) < 3:
            self.examples[rule].append({"before": before[:120], "after": after[:120]})

    def reject_reason(self, text: str) -> str | None:
        """Name of the first filter the text fails, or None."""
        if len(text) < self.cfg.min_chars:
            return "too_short"
        if len(text) > self.cfg.max_chars:
            return "too_long"
        if self.cfg.min_cjk_ratio > 0 and cjk_ratio(text) < self.cfg.min_cjk_ratio:
            return "low_cjk_ratio"
        if self.cfg.max_char_run > 0 and longest_char_run(text) > self.cfg.max_char_run:
            return "char_repetition"
        if self.cfg.max_dup_line_ratio < 1 and dup_line_ratio(text) > self.cfg.max_dup_line_ratio:
            return "line_repetition"
        if self.cfg.max_dup_ngram_ratio < 1 and dup_ngram_ratio(text) > self.cfg.max_dup_ngram_ratio:
            return "ngram_repetition"
        if self.blocked is not None and self.blocked.search(text):
            return "blocked_keyword"
        if self.classify is not None and self.classify(text) != self.cfg.lang:
            return "wrong_language"
        return None

    def chat_reject_reason(self, messages: list[dict]) -> str | None:
        """Name of the first chat-only filter the conversation fails, or None."""
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        if any(len(a.strip()) < self.cfg.min_answer_chars for a in answers):
            return "answer_too_short"
        if sum(len(m["content"]) for m in messages if m["role"] == "user") > self.cfg.max_prompt_chars:
            return "prompt_too_long"
        return None


def _block_list(path: str) -> re.Pattern | None:
    """One regex matching any keyword of the block-list file (one a line, # comments), or None."""
    if not path:
        return None
    try:
        words = [w.strip() for w in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise XiaolmError(f"cannot read the block list ({e})", where=path,
                          hint="block_list must be a UTF-8 file, one keyword a line") from None
    words = sorted({w for w in words if w and not w.startswith("#")}, key=len, reverse=True)
    if not words:
        raise XiaolmError("the block list holds no keywords", where=path)
    return re.compile("|".join(map(re.escape, words)))


def _language_id(lang: str) -> Callable[[str], str] | None:
    """text → language code by langid.py, when a language is required."""
    if not lang:
        return None
    try:
        import langid
    except ImportError:
        raise XiaolmError(f"lang={lang} needs the langid package", where="lang",
                          hint="pip install langid (or xiaolm[lang]), or leave lang empty") from None
    return lambda text: langid.classify(text)[0]


def _outputs(record: dict, cleaner: Cleaner, cfg: CleanConfig
             ) -> tuple[list[dict], list[str], list[str]] | None:
    """(output records, filter texts, dedup-key texts); None if no text; ValueError for a bad chat."""
    if isinstance(record.get(cfg.text_field), str):
        text = cleaner.normalize(record[cfg.text_field])
        pieces = split_long(text, cfg.max_chars) if len(text) > cfg.max_chars else [text]
        if len(pieces) > 1:
            cleaner.note("split_long", text, f"{len(pieces)} pieces")
        return [{**record, cfg.text_field: p} for p in pieces], pieces, pieces
    messages = chat_messages(record)
    if messages is None:
        return None
    clean = [{**m, "content": cleaner.normalize(m["content"])} for m in messages]
    if "messages" in record:
        out = {**record, "messages": clean}
    else:
        out = {**record, "prompt": clean[0]["content"], "response": clean[1]["content"]}
    joined = "\n".join(m["content"] for m in clean)
    reason = cleaner.chat_reject_reason(clean)
    if reason:
        raise _Rejected(reason)
    return [out], [joined], ["\n".join(f"{m['role']}\x00{m['content']}" for m in clean)]


class _Rejected(Exception):
    """A whole record fails a filter (the reason code is the message)."""


def _stable_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def clean_shard(out: Path, path: str, cfg: CleanConfig) -> dict:
    """Clean one input file into out/part.jsonl (+ out/rejects.jsonl); its counts and examples for the report."""
    from tqdm.auto import tqdm

    cleaner = Cleaner(cfg)
    seen: set[bytes] = set()
    read = records_out = added_by_split = 0
    own: Counter[str] = Counter()  # rejections made here (the rest come from the reader)
    file_name = Path(path).name  # the source of records that name none
    with RejectLog(out / "rejects.jsonl") as rejects, atomic_open(out / "part.jsonl", "w") as dst, \
            tqdm(desc="data/clean", unit="rec", disable=True if in_worker() else None) as bar:

        def reject(reason: str, where: str, record: object, detail: str | None = None) -> None:
            own[reason] += 1
            rejects.add(reason, where, record, detail)

        for record, where in read_records([path], rejects, txt_docs=cfg.txt_docs):
            read += 1
            bar.update(1)
            try:
                result = _outputs(record, cleaner, cfg)
            except _Rejected as e:
                reject(str(e), where, record)
                continue
            except ValueError as e:
                reject("bad_chat", where, record, str(e))
                continue
            if result is None:
                reject("missing_field", where, record, f"no string '{cfg.text_field}' and not a chat record")
                continue
            outputs, texts, keys = result
            added_by_split += len(outputs) - 1
            source = record.get("source") or file_name
            for i, (rec, text, key_text) in enumerate(zip(outputs, texts, keys, strict=True)):
                reason = cleaner.reject_reason(text)
                if reason:
                    reject(reason, where, rec)
                    continue
                if cfg.exact_dedup:
                    key = hashlib.sha1(_SPACE.sub("", key_text).encode("utf-8")).digest()
                    if key in seen:
                        reject("exact_duplicate", where, rec)
                        continue
                    seen.add(key)
                base = str(record["id"]) if record.get("id") is not None else _stable_id(key_text)
                rec["id"] = f"{base}-{i}" if len(outputs) > 1 else base
                rec["source"] = source
                dst.write(json_line(rec))
                records_out += 1
    return {"records_in": read + rejects.total - sum(own.values()), "records_out": records_out,
            "rejected": dict(rejects.counts), "reject_examples": dict(rejects.examples),
            "modified": dict(cleaner.modified), "examples": dict(cleaner.examples), "added_by_split": added_by_split,
            "bytes": Path(path).stat().st_size}


def clean_files(inputs: Sequence[str | Path], out_dir: str | Path, cfg: CleanConfig | None = None,
                executor: str = "local", workers: int = 0) -> dict:
    """Clean text or chat records: out_dir/part-NNNNN.jsonl per input file, report.json and rejects.jsonl.

    Input files are shards cleaned in parallel (`workers` processes, or Ray); exact duplicates are dropped within
    each file (`xiaolm data dedup` removes them across files). A rerun after an interruption reuses finished files.
    """
    cfg = cfg or CleanConfig()
    if cfg.min_chars < 0 or cfg.max_chars < max(cfg.min_chars, 1) or not 0 <= cfg.min_cjk_ratio <= 1:
        raise XiaolmError(f"inconsistent limits min_chars={cfg.min_chars} max_chars={cfg.max_chars} "
                          f"min_cjk_ratio={cfg.min_cjk_ratio}", where="config",
                          hint="need 0 <= min_chars <= max_chars and 0 <= min_cjk_ratio <= 1")
    check_txt_docs(cfg.txt_docs)
    Cleaner(cfg)  # a missing block list or language-ID package fails here, before any work
    out_dir = Path(out_dir)
    files, fingerprint, config_text, report = plan_stage("data/clean", inputs, out_dir, cfg)
    if report is not None:
        return report
    start = time.perf_counter()
    work = work_dir(out_dir, config_text, fingerprint, outputs=["part-*.jsonl"])
    names = [f"{i:05d}" for i in range(len(files))]
    shards = run_tasks(clean_shard, [(n, (str(f), cfg)) for n, f in zip(names, files, strict=True)],
                       work / "clean", executor, workers, desc="data/clean")
    for n in names:
        part = work / "clean" / n / "part.jsonl"
        if part.exists():  # else moved by an interrupted run of this same stage
            os.replace(part, out_dir / f"part-{n}.jsonl")
    rejected, examples = gather_rejects(out_dir, [work / "clean" / n for n in names], shards,
                                        examples=("examples", "reject_examples"))
    modified: Counter[str] = Counter()
    for shard in shards:
        modified.update(shard["modified"])
    seconds = time.perf_counter() - start
    size = sum(shard["bytes"] for shard in shards)
    report = {"records_in": sum(s["records_in"] for s in shards), "records_out": sum(s["records_out"] for s in shards),
              "rejected": dict(rejected.most_common()), "modified": dict(modified.most_common()),
              "added_by_split": sum(s["added_by_split"] for s in shards), "examples": examples,
              "shards": len(files), "executor": executor, "workers": parallel_workers(workers),
              "input_mb": round(size / 1e6, 3), "seconds": round(seconds, 3), "inputs": fingerprint}
    finish_stage(out_dir, work, config_text, report)
    log.info("data/clean: %d in, %d out, %d rejected (%s) in %.1f s — see %s", report["records_in"],
             report["records_out"], sum(rejected.values()),
             reject_summary(rejected), seconds, out_dir / "rejects.jsonl")
    return report
