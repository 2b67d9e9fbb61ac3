"""Cleaning stage: runs the rules of clean_rules over record files, with per-rule counts, examples and rejects."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xiaolm.data.clean_rules import (
    CHAT_FILTERS,
    NORMALIZERS,
    TEXT_FILTERS,
    Filter,
    assistant_answers,
    remove_space,
    split_long,
)
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
    chat_min_cjk_ratio: float = 0.05  # chat: min_cjk_ratio of the whole conversation (translation, code tasks)
    chat_max_dup_line_ratio: float = 0.7  # chat: max_dup_line_ratio of each assistant answer
    chat_max_dup_ngram_ratio: float = 0.85  # chat: max_dup_ngram_ratio of each assistant answer
    min_answer_chars: int = 1  # chat: reject when an assistant answer is shorter
    max_prompt_chars: int = 8000  # chat: reject when the user turns together are longer
    block_list: str = ""  # file with one keyword per line: documents containing any are rejected
    lang: str = ""  # e.g. zh: reject documents another language wins for (needs `pip install langid`)
    exact_dedup: bool = True  # drop documents whose normalized text (whitespace removed) came earlier in the file


class Cleaner:
    """Applies the configured normalizers and filters (the tables of clean_rules), counting what each changed."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.normalizers = [(name, rule) for name, rule in NORMALIZERS if getattr(cfg, name)]
        self.text_filters = _active(TEXT_FILTERS, cfg)
        self.chat_text_filters = _active(TEXT_FILTERS, cfg, chat=True)
        self.chat_filters = _active(CHAT_FILTERS, cfg)
        self.modified: Counter[str] = Counter()
        self.examples: dict[str, list[dict]] = defaultdict(list)

    def normalize(self, text: str) -> str:
        """Run every normalizer in order."""
        for name, rule in self.normalizers:
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

    def reject_reason(self, text: str, answers: list[str] | None = None) -> str | None:
        """Name of the first filter the text fails, or None; `answers`: the text is a chat with these answers."""
        if answers is None:
            return next((reason for reason, fails, limit, _ in self.text_filters if fails(text, limit)), None)
        for reason, fails, limit, per_answer in self.chat_text_filters:
            if any(fails(t, limit) for t in (answers if per_answer else [text])):
                return reason
        return None

    def chat_reject_reason(self, messages: list[dict]) -> str | None:
        """Name of the first chat-only filter the conversation fails, or None."""
        return next((reason for reason, fails, limit, _ in self.chat_filters if fails(messages, limit)), None)


def _active(filters: tuple[Filter, ...], cfg: CleanConfig, chat: bool = False
            ) -> list[tuple[str, Callable[[Any, Any], bool], Any, bool]]:
    """(reason, test, limit, per answer) of each filter the config leaves on; a missing block list fails here."""
    active = []
    for f in filters:
        value = getattr(cfg, f.chat_setting if chat and f.chat_setting else f.setting)
        if not f.off(value):
            active.append((f.reason, f.fails, f.prepare(value) if f.prepare else value, chat and f.per_answer))
    return active


def _outputs(record: dict, cleaner: Cleaner, cfg: CleanConfig
             ) -> tuple[list[dict], list[tuple[str, list[str] | None]], list[str]] | None:
    """(output records, (filter text, a chat's answers) pairs, dedup keys); None if no text; ValueError: bad chat."""
    if isinstance(record.get(cfg.text_field), str):
        text = cleaner.normalize(record[cfg.text_field])
        pieces = split_long(text, cfg.max_chars) if len(text) > cfg.max_chars else [text]
        if len(pieces) > 1:
            cleaner.note("split_long", text, f"{len(pieces)} pieces")
        return [{**record, cfg.text_field: p} for p in pieces], [(p, None) for p in pieces], pieces
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
    return [out], [(joined, assistant_answers(clean))], ["\n".join(f"{m['role']}\x00{m['content']}" for m in clean)]


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
            for i, (rec, (text, answers), key_text) in enumerate(zip(outputs, texts, keys, strict=True)):
                reason = cleaner.reject_reason(text, answers)
                if reason:
                    reject(reason, where, rec)
                    continue
                if cfg.exact_dedup:
                    key = hashlib.sha1(remove_space(key_text).encode("utf-8")).digest()
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
    if cfg.min_chars < 0 or cfg.max_chars < max(cfg.min_chars, 1) or not 0 <= cfg.min_cjk_ratio <= 1 \
            or not 0 <= cfg.chat_min_cjk_ratio <= 1:
        raise XiaolmError(f"inconsistent limits min_chars={cfg.min_chars} max_chars={cfg.max_chars} "
                          f"min_cjk_ratio={cfg.min_cjk_ratio} chat_min_cjk_ratio={cfg.chat_min_cjk_ratio}",
                          where="config", hint="need 0 <= min_chars <= max_chars and 0 <= (chat_)min_cjk_ratio <= 1")
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
