"""Cleaning: small named normalizers and filters, per-rule counts and examples, rejects with reasons."""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
import shutil
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from xiaolm.config import config_to_dict, save_config
from xiaolm.data.read import RejectLog, read_records
from xiaolm.io import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class CleanConfig:
    """Each rule can be switched off; thresholds apply to the text after normalization."""

    text_field: str = "text"
    nfkc: bool = True  # Unicode NFKC: full-width ASCII → half-width, compatibility forms folded
    t2s: bool = True  # Traditional → Simplified Chinese (OpenCC)
    strip_control: bool = True  # control characters except newline and tab
    strip_markup: bool = True  # HTML tags and entities
    collapse_space: bool = True  # runs of spaces/blank lines
    min_chars: int = 8
    max_chars: int = 20000  # longer documents are split at paragraph boundaries
    min_cjk_ratio: float = 0.3  # share of CJK characters among non-space characters
    exact_dedup: bool = True  # drop records whose normalized text was already seen


# NFKC would turn Chinese full-width punctuation into ASCII; keep it as is
_KEEP_FULLWIDTH = set("，。！？；：（）【】「」『』《》、“”‘’…—～·")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\ufeff]")
_TAG = re.compile(r"<[^<>\n]{1,200}>")
_SPACES = re.compile(r"[ \t\u3000]+")
_BLANKS = re.compile(r"\n{3,}")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


def nfkc(text: str) -> str:
    """NFKC, except for Chinese full-width punctuation."""
    return "".join(ch if ch in _KEEP_FULLWIDTH else unicodedata.normalize("NFKC", ch) for ch in text) \
        if any(ch in _KEEP_FULLWIDTH for ch in text) else unicodedata.normalize("NFKC", text)


def strip_markup(text: str) -> str:
    """Remove HTML tags and unescape entities."""
    return html.unescape(_TAG.sub("", text))


def strip_control(text: str) -> str:
    """Remove control and zero-width characters (newline and tab stay)."""
    return _CONTROL.sub("", text)


def collapse_space(text: str) -> str:
    """Collapse runs of spaces and of blank lines; trim the ends."""
    return _BLANKS.sub("\n\n", "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))).strip()


def cjk_ratio(text: str) -> float:
    """Share of CJK ideographs among non-space characters."""
    chars = [c for c in text if not c.isspace()]
    return sum(1 for c in chars if _CJK.match(c)) / len(chars) if chars else 0.0


def _t2s() -> Callable[[str], str]:
    import opencc

    return opencc.OpenCC("t2s").convert


def split_long(text: str, max_chars: int) -> list[str]:
    """Split at paragraph (then line) boundaries into pieces of at most max_chars."""
    if len(text) <= max_chars:
        return [text]
    pieces, current = [], ""
    for para in re.split(r"(?<=\n)", text):
        while len(para) > max_chars:
            pieces.append(para[:max_chars])
            para = para[max_chars:]
        if len(current) + len(para) > max_chars:
            pieces.append(current)
            current = ""
        current += para
    if current:
        pieces.append(current)
    return [p.strip() for p in pieces if p.strip()]


class Cleaner:
    """Applies the configured rules to one text, counting what each rule changed or rejected."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.rules: list[tuple[str, Callable[[str], str]]] = []
        if cfg.strip_markup:
            self.rules.append(("strip_markup", strip_markup))
        if cfg.strip_control:
            self.rules.append(("strip_control", strip_control))
        if cfg.nfkc:
            self.rules.append(("nfkc", nfkc))
        if cfg.t2s:
            self.rules.append(("t2s", _t2s()))
        if cfg.collapse_space:
            self.rules.append(("collapse_space", collapse_space))
        self.modified: Counter[str] = Counter()
        self.examples: dict[str, list] = defaultdict(list)

    def normalize(self, text: str) -> str:
        """Run every normalizer in order."""
        for name, rule in self.rules:
            new = rule(text)
            if new != text:
                self.modified[name] += 1
                if len(self.examples[name]) < 3:
                    self.examples[name].append({"before": text[:120], "after": new[:120]})
                text = new
        return text

    def reject_reason(self, text: str) -> str | None:
        """Name of the first filter the text fails, or None."""
        if len(text) < self.cfg.min_chars:
            return "too_short"
        if cjk_ratio(text) < self.cfg.min_cjk_ratio:
            return "low_cjk_ratio"
        return None


def _record_id(record: dict, text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def clean_files(inputs: Sequence[str | Path], out_dir: str | Path, cfg: CleanConfig | None = None) -> dict:
    """Clean text or chat records into out_dir/part-00000.jsonl with report.json and rejects.jsonl."""
    cfg = cfg or CleanConfig()
    out_dir = Path(out_dir)
    settings = {"inputs": [str(i) for i in inputs], **config_to_dict(cfg)}
    if (out_dir / "_SUCCESS").is_file() and (out_dir / "report.json").is_file():
        report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
        if report.get("settings") == settings:
            log.info("data/clean: %s is up to date; skipping", out_dir)
            return report
    from tqdm.auto import tqdm

    cleaner = Cleaner(cfg)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seen: set[bytes] = set()
    records_in = records_out = 0
    reject_examples: dict[str, list] = defaultdict(list)
    start = time.perf_counter()
    with RejectLog(tmp / "rejects.jsonl") as rejects, open(tmp / "part-00000.jsonl", "w", encoding="utf-8") as out, \
            tqdm(desc="clean", unit="rec") as bar:
        def reject(reason: str, where: str, record) -> None:
            rejects.add(reason, where, record)
            if len(reject_examples[reason]) < 3:
                reject_examples[reason].append({"where": where, "record": str(record)[:120]})

        # rejections by the reader (bad JSON, invalid UTF-8) are counted via rejects.counts
        for record, where in read_records(inputs, rejects):
            records_in += 1
            bar.update(1)
            source = record.get("source") or Path(where.rsplit(":", 1)[0]).name
            if isinstance(record.get(cfg.text_field), str):
                pieces = split_long(cleaner.normalize(record[cfg.text_field]), cfg.max_chars)
                if len(pieces) > 1:
                    cleaner.modified["split_long"] += 1
                outputs = [{**record, cfg.text_field: p} for p in pieces]
                texts = pieces
            elif isinstance(record.get("messages"), list):
                try:
                    msgs = [{**m, "content": cleaner.normalize(m["content"])} for m in record["messages"]]
                except (TypeError, KeyError):
                    reject("bad_chat_record", where, record)
                    continue
                outputs, texts = [{**record, "messages": msgs}], ["\n".join(m["content"] for m in msgs)]
            else:
                reject("missing_field", where, record)
                continue
            for i, (rec, text) in enumerate(zip(outputs, texts, strict=False)):
                reason = cleaner.reject_reason(text)
                if reason:
                    reject(reason, where, rec)
                    continue
                if cfg.exact_dedup:
                    key = hashlib.sha1(re.sub(r"\s+", "", text).encode("utf-8")).digest()
                    if key in seen:
                        reject("exact_duplicate", where, rec)
                        continue
                    seen.add(key)
                rec["id"] = str(record.get("id", _record_id(record, text))) + (f"-{i}" if len(outputs) > 1 else "")
                rec["source"] = source
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                records_out += 1
    report = {"records_in": records_in + sum(v for k, v in rejects.counts.items() if k not in reject_examples),
              "records_out": records_out, "rejected": dict(rejects.counts), "modified": dict(cleaner.modified),
              "examples": {**{f"modified:{k}": v for k, v in cleaner.examples.items()},
                           **{f"rejected:{k}": v for k, v in reject_examples.items()}},
              "seconds": round(time.perf_counter() - start, 2), "settings": settings}
    atomic_write_json(tmp / "report.json", report)
    save_config(cfg, tmp / "config.yaml")
    (tmp / "_SUCCESS").write_text("")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(rejects.counts.items()))
    log.info("data/clean: %d in, %d out, %d rejected (%s) — see %s", report["records_in"], records_out,
             rejects.total, summary or "none", out_dir / "rejects.jsonl")
    return report


