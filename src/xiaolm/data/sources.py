"""Recipes that map public Chinese datasets, in the layout they are downloaded in, to xiaolm's record kinds.

`xiaolm data import RECIPE FILE... --out DIR` streams the files, converts every record (text: {"text"}; chat:
{"messages"}; extraction: {"text", "triplets"}), keeps an `id` and the `source`, and writes part-NNNNN.jsonl
shards, report.json and rejects.jsonl. A file that does not look like the recipe's layout (its fields are missing
from most of the first records) stops the import at once with the fields expected and the fields found.
"""

from __future__ import annotations

import html
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from xiaolm.data.executor import in_worker, parallel_workers, run_tasks, work_dir
from xiaolm.data.stage import finish_stage, gather_rejects
from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_open, json_line
from xiaolm.records.inputs import files_fingerprint, finished_stage, stage_inputs
from xiaolm.records.read import read_file, read_records, text_lines
from xiaolm.records.rejects import RejectLog, reject_summary

log = logging.getLogger(__name__)

SHARD_RECORDS = 100_000
LAYOUT_CHECK, PROBE = 20, 200  # after 20 and 200 records: stop if most lack the recipe's fields
CONVERT_REJECTS = ("missing_field", "bad_record")  # reasons given to records read (the reader's own are not)


@dataclass
class ImportConfig:
    """Settings of `xiaolm data import` (the recipe is its first argument)."""

    shard_records: int = 100_000  # records per output shard


@dataclass(frozen=True)
class Recipe:
    """How one public dataset's records become ours."""

    name: str
    kind: str  # text | chat | preference | extraction
    url: str
    licence: str
    fields: tuple[str, ...]  # every record must carry these, non-empty
    convert: Callable[[dict], dict]
    encoding: str = "utf-8"  # for CSV files
    read: Callable[[list[Path], RejectLog], Iterator[tuple[dict, str]]] | None = None  # default: read_records
    layout: str = ""


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user.strip()},
                         {"role": "assistant", "content": assistant.strip()}]}


def _question(title: str, desc: str | None) -> str:
    """A forum question: the title, then the description when it adds something."""
    title, desc = (title or "").strip(), (desc or "").strip()
    return f"{title}\n{desc}" if desc and desc != title and desc not in title else title


def _instruction(r: dict) -> dict:
    """alpaca layout: instruction (+ input) → output."""
    extra = (r.get("input") or "").strip()
    return _chat(f"{r['instruction']}\n{extra}" if extra else r["instruction"], r["output"])


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _conversations(r: dict) -> dict:
    """BELLE multi-turn layout: conversations [{from: human|assistant, value}] → messages."""
    messages = []
    for turn in r["conversations"]:
        role = _ROLES.get(str(turn.get("from", "")).lower())
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn with from={turn.get('from')!r} is neither human nor assistant")
        messages.append({"role": role, "content": turn["value"].strip()})
    return {"messages": messages}


def _spo_triplets(r: dict) -> dict:
    """DuIE 2.0 layout: spo_list → triplets [subject, predicate, object["@value"]], in order, duplicates dropped.

    A complex relation's extra object keys (e.g. 上映时间 with inArea) become triplets of their own:
    [subject, predicate_key, object[key]], so [北州往事, 上映时间, 2019年] and [北州往事, 上映时间_inArea, 东州].
    """
    triplets: list[list[str]] = []
    for spo in r["spo_list"]:
        obj = spo["object"]
        values = {"@value": obj} if isinstance(obj, str) else obj
        if not isinstance(values, dict) or "@value" not in values:
            raise ValueError(f"spo {spo!r}: object must be a string or an object with @value")
        if not all(isinstance(v, str) for v in (spo["subject"], spo["predicate"], *values.values())):
            raise ValueError(f"spo {spo!r}: subject, predicate and object values must be strings")
        for key, value in values.items():
            predicate = spo["predicate"] if key == "@value" else f"{spo['predicate']}_{key}"
            triplet = [spo["subject"].strip(), predicate.strip(), value.strip()]
            if triplet not in triplets:
                triplets.append(triplet)
    return {"text": r["text"], "triplets": triplets}


def _read_wikiextractor(files: list[Path], rejects: RejectLog) -> Iterator[tuple[dict, str]]:
    """WikiExtractor output: `<doc id=.. url=.. title=..>` blocks in files named wiki_NN, or its --json lines."""
    for path in files:
        head = text_lines(path, None)
        first = next((line for _, line in head if line.strip()), "")
        head.close()
        if first.lstrip().startswith("{"):
            yield from read_file(path, rejects, fmt=".jsonl")
            continue
        doc: dict | None = None
        lines: list[str] = []
        start = 0
        for n, line in text_lines(path, rejects):
            if line.startswith("<doc "):
                doc, lines, start = dict(_DOC_ATTR.findall(line)), [], n
            elif line.startswith("</doc>") and doc is not None:
                body = lines[1:] if lines and lines[0].strip() == doc.get("title", "") else lines
                yield {**doc, "text": "\n".join(body).strip()}, f"{path}:{start}"
                doc = None
            elif doc is not None:
                lines.append(line)
        if doc is not None:
            rejects.add("bad_record", f"{path}:{start}", doc, detail="<doc> without </doc>: file cut short?")


_DOC_ATTR = re.compile(r'(\w+)="([^"]*)"')


def _wiki_files(inputs: Sequence[str | Path]) -> list[Path]:
    """WikiExtractor writes extensionless wiki_NN files in AA/, AB/, … folders: take every visible file."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise XiaolmError("input not found", where=str(p), hint="pass WikiExtractor's output folder or files")
    return files


def _sharegpt_preference(r: dict) -> dict:
    """LLaMA-Factory DPO layout: conversations [{from, value}] then chosen / rejected {from, value}."""
    messages = _conversations(r)["messages"]
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the conversation must end with a human turn")
    answers = {}
    for key in ("chosen", "rejected"):
        turn = r[key]
        if _ROLES.get(str(turn.get("from", "")).lower()) != "assistant" or not isinstance(turn.get("value"), str):
            raise ValueError(f"{key} must be an assistant turn {{from: gpt, value}}")
        answers[key] = turn["value"].strip()
    return {"messages": messages, **answers}


def _history_preference(r: dict) -> dict:
    """MedicalGPT reward layout: system, history [[question, answer], …], question, response_chosen/rejected."""
    messages = [{"role": "system", "content": r["system"].strip()}] if (r.get("system") or "").strip() else []
    for question, answer in r.get("history") or []:
        messages += _chat(question, answer)["messages"]
    messages.append({"role": "user", "content": r["question"].strip()})
    return {"messages": messages, "chosen": r["response_chosen"].strip(), "rejected": r["response_rejected"].strip()}


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("webtext2019zh", "chat", "https://github.com/brightmart/nlp_chinese_corpus",
           "see the repository's terms", ("title", "content"),
           lambda r: {**_chat(_question(r["title"], r.get("desc")), r["content"]),
                      "id": r.get("answer_id") or r.get("qid"), "topic": r.get("topic"), "star": r.get("star")},
           layout="JSON lines: qid, title, desc, topic, star, content, answer_id, answerer_tags"),
    Recipe("baike_qa2019", "chat", "https://github.com/brightmart/nlp_chinese_corpus",
           "see the repository's terms", ("title", "answer"),
           lambda r: {**_chat(_question(r["title"], r.get("desc")), r["answer"]), "id": r.get("qid"),
                      "category": r.get("category")},
           layout="JSON lines: qid, category, title, desc, answer"),
    Recipe("medical-dialogue", "chat", "https://github.com/Toyhom/Chinese-medical-dialogue-data",
           "see the repository's terms", ("ask", "answer"),
           lambda r: {**_chat(r["ask"] if len(r["ask"]) >= len(r.get("title") or "") else r["title"], r["answer"]),
                      "department": r.get("department")},
           encoding="gb18030", layout="CSV in GB18030: department, title, ask, answer (one file per department)"),
    Recipe("zhihu-kol", "chat", "https://huggingface.co/datasets/wangrui6/Zhihu-KOL",
           "no licence tag on the dataset page; check its terms", ("INSTRUCTION", "RESPONSE"),
           lambda r: {**_chat(r["INSTRUCTION"], r["RESPONSE"]), "origin": r.get("SOURCE")},
           layout="Parquet: INSTRUCTION, RESPONSE, SOURCE, METADATA"),
    Recipe("belle", "chat", "https://huggingface.co/BelleGroup (train_0.5M_CN, train_1M_CN, train_2M_CN)",
           "GPL-3.0 per the dataset pages; BELLE restricts use to research", ("instruction", "output"),
           _instruction, layout="JSON lines: instruction, input, output"),
    Recipe("belle-multiturn", "chat", "https://huggingface.co/datasets/BelleGroup/train_3.5M_CN",
           "GPL-3.0 per the dataset page; BELLE restricts use to research", ("conversations",),
           lambda r: {**_conversations(r), "id": r.get("id")},
           layout="JSON lines: id, conversations [{from: human|assistant, value}]"),
    Recipe("firefly", "chat", "https://huggingface.co/datasets/YeungNLP/firefly-train-1.1M",
           "see the dataset page", ("input", "target"),
           lambda r: {**_chat(r["input"], r["target"]), "task": r.get("kind")},
           layout="JSON lines: kind, input, target"),
    Recipe("alpaca-gpt4-zh", "chat", "https://github.com/Instruction-Tuning-with-GPT-4/GPT-4-LLM",
           "CC BY-NC 4.0 per the source repository (research use)", ("instruction", "output"),
           _instruction, layout="a JSON array of {instruction, input, output} (alpaca_gpt4_data_zh.json)"),
    Recipe("prompt-chosen-rejected", "preference", "https://huggingface.co/docs/trl/dataset_formats (standard "
           "preference)", "that of the dataset", ("prompt", "chosen", "rejected"),
           lambda r: {"prompt": r["prompt"].strip(), "chosen": r["chosen"].strip(),
                      "rejected": r["rejected"].strip(), "id": r.get("id")},
           layout="JSON lines or Parquet: prompt, chosen, rejected (strings)"),
    Recipe("llamafactory-dpo", "preference",
           "https://github.com/hiyouga/LLaMA-Factory/blob/main/data/dpo_zh_demo.json", "that of the dataset",
           ("conversations", "chosen", "rejected"), _sharegpt_preference,
           layout="a JSON array of {conversations: [{from, value}], chosen: {from, value}, rejected: {from, value}}"),
    Recipe("medicalgpt-reward", "preference", "https://github.com/shibing624/MedicalGPT (data/reward)",
           "that of the dataset", ("question", "response_chosen", "response_rejected"), _history_preference,
           layout="JSON lines: system, history [[question, answer], …], question, response_chosen, "
                  "response_rejected"),
    Recipe("duie", "extraction", "https://www.luge.ai/#/luge/dataDetail?id=5 (DuIE 2.0, Baidu)",
           "research use per the LUGE terms; check them before any other use", ("text", "spo_list"), _spo_triplets,
           layout="JSON lines: text, spo_list [{predicate, subject, subject_type, object {@value, …}, object_type}]"),
    Recipe("zhwiki", "text", "https://dumps.wikimedia.org/zhwiki/ (then WikiExtractor)",
           "CC BY-SA 4.0 (Wikipedia text)", ("title", "text"),
           lambda r: {"text": html.unescape(r["text"]), "id": r.get("id"), "title": r["title"]},
           read=_read_wikiextractor, layout="WikiExtractor output: <doc id url title> blocks, or --json lines"),
    Recipe("skypile", "text", "https://huggingface.co/datasets/Skywork/SkyPile-150B",
           "Skywork community licence per the dataset page", ("text",), lambda r: {"text": r["text"]},
           layout="JSON lines: text"),
]}


def _missing(record: dict, fields: tuple[str, ...]) -> list[str]:
    return [f for f in fields if not record.get(f) or not isinstance(record[f], str | list | dict)]


def import_records(recipe_name: str, inputs: Sequence[str | Path], out_dir: str | Path,
                   shard_records: int = SHARD_RECORDS, executor: str = "local", workers: int = 0) -> dict:
    """Convert one public dataset's files into our records under out_dir; return the report.

    Input files are converted in parallel, one task per file (`workers` processes, or Ray); the shards are then
    numbered in input order, so the output does not depend on the process count. A rerun after an interruption
    converts only the files not yet done.
    """
    recipe = RECIPES.get(recipe_name)
    if recipe is None:
        raise XiaolmError(f"unknown recipe {recipe_name!r}", hint=f"one of: {', '.join(RECIPES)}")
    out_dir = Path(out_dir)
    files = _wiki_files(inputs) if recipe.read is not None else stage_inputs(inputs, out_dir)
    if not files:
        raise XiaolmError("no input files", where=", ".join(map(str, inputs)))
    fingerprint = files_fingerprint(files)
    config_text = f"recipe: {recipe.name}\nshard_records: {shard_records}\n"
    report = finished_stage(out_dir, config_text, fingerprint, "report.json")
    if report is not None:
        log.info("data/import: %s is up to date (same inputs and recipe); skipping", out_dir)
        return report
    _convert(recipe, files[0], RejectLog(), limit=PROBE)  # a file of another layout stops here, before any work
    start = time.perf_counter()
    work = work_dir(out_dir, config_text, fingerprint, outputs=["part-*.jsonl"])
    names = [f"{i:05d}" for i in range(len(files))]
    results = run_tasks(import_file, [(n, (recipe.name, str(f), shard_records)) for n, f in zip(names, files,
                                                                                                   strict=True)],
                        work / "import", executor, workers, desc=f"data/import {recipe.name}")
    shards: list[str] = []
    for n, result in zip(names, results, strict=True):
        for part in result["shards"]:
            name = f"part-{len(shards):05d}.jsonl"
            if (work / "import" / n / part).exists():  # else moved by an interrupted run of this same stage
                os.replace(work / "import" / n / part, out_dir / name)
            shards.append(name)
    rejected, examples = gather_rejects(out_dir, [work / "import" / n for n in names], results)
    written = sum(r["written"] for r in results)
    if not written:  # every record failed: no shard, and no _SUCCESS that would let a later stage go on
        records_in = sum(r["read"] for r in results) + sum(
            n for reason, n in rejected.items() if reason not in CONVERT_REJECTS)
        raise XiaolmError(f"0 of {records_in} records converted: {reject_summary(rejected)}",
                          where=f"data/import {recipe.name}", hint=f"see {out_dir / 'rejects.jsonl'}")
    report = {"recipe": recipe.name, "kind": recipe.kind, "inputs": fingerprint,
              "records_read": sum(r["read"] for r in results), "records_written": written,
              "rejected": dict(rejected.most_common()), "shards": shards, "examples_rejected": examples,
              "executor": executor, "workers": parallel_workers(workers),
              "seconds": round(time.perf_counter() - start, 2)}
    finish_stage(out_dir, work, config_text, report)
    log.info("data/import %s: %d records read, %d written to %d shard(s), %d rejected (%s) — %s", recipe.name,
             report["records_read"], report["records_written"], len(shards), sum(rejected.values()),
             reject_summary(rejected), out_dir)
    return report


def import_file(out: Path, recipe_name: str, path: str, shard_records: int) -> dict:
    """Task: one input file's records, converted, as out/part-NNNNN.jsonl shards, its rejects in out/."""
    shards: list[str] = []
    with RejectLog(out / "rejects.jsonl") as rejects, _ShardWriter(out, shard_records, shards) as writer:
        counts = _convert(RECIPES[recipe_name], Path(path), rejects, write=writer.write)
    return {"read": counts["read"], "written": counts["written"], "rejected": dict(rejects.counts),
            "examples": dict(rejects.examples), "shards": shards}


def _convert(recipe: Recipe, path: Path, rejects: RejectLog, write: Callable[[dict], None] | None = None,
             limit: int = 0) -> Counter[str]:
    """Convert the records of one file (its first `limit` when > 0), checking the layout on the first ones."""
    from tqdm.auto import tqdm

    counts: Counter[str] = Counter()
    stream = (recipe.read([path], rejects) if recipe.read is not None
              else read_records([path], rejects, encoding=recipe.encoding))
    probed: list[bool] = []  # whether each of the first records lacks a needed field
    record, where = {}, str(path)
    with tqdm(desc=f"data/import {path.name}", unit="rec", disable=True if in_worker() or limit else None) as bar:
        for record, where in stream:
            counts["read"] += 1
            bar.update(1)
            missing = _missing(record, recipe.fields)
            if len(probed) < PROBE:
                probed.append(bool(missing))
                if len(probed) in (LAYOUT_CHECK, PROBE):
                    _check_layout(recipe, probed, record, where)
            if counts["read"] == limit:
                break
            if missing:
                rejects.add("missing_field", where, record,
                            detail=f"needs {', '.join(missing)} (absent, empty or not text)")
                continue
            try:
                out = recipe.convert(record)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                rejects.add("bad_record", where, record, detail=str(e))
                continue
            out = {k: v for k, v in out.items() if v not in (None, "")}
            out.setdefault("id", f"{recipe.name}:{path.name}:{where.rsplit(':', 1)[1]}")
            out["source"] = recipe.name
            if write is not None:
                write(out)
            counts["written"] += 1
    stream.close()
    if 0 < len(probed) < LAYOUT_CHECK:
        _check_layout(recipe, probed, record, where)
    return counts


def _check_layout(recipe: Recipe, probed: list[bool], record: dict, where: str) -> None:
    """Stop when most of the first records lack the recipe's fields: wrong recipe or wrong file."""
    bad = sum(probed)
    if bad * 2 > len(probed):
        found = ", ".join(list(record)[:12]) or "none"
        raise XiaolmError(f"{bad} of the first {len(probed)} records lack the fields recipe '{recipe.name}' "
                          f"needs ({', '.join(recipe.fields)}); this record has: {found}", where=where,
                          hint=f"'{recipe.name}' expects {recipe.layout}; pick the recipe matching the file "
                               "(`xiaolm data import --help` lists them)")


class _ShardWriter:
    """part-00000.jsonl, part-00001.jsonl, … each written atomically, shard_records records apiece."""

    def __init__(self, out_dir: Path, shard_records: int, names: list[str]):
        self.out_dir, self.limit, self.names = out_dir, shard_records, names
        self._ctx: Any = None
        self._file: IO[str] | None = None
        self._n = 0

    def write(self, record: dict) -> None:
        if self._file is None or self._n >= self.limit:
            self._close()
            name = f"part-{len(self.names):05d}.jsonl"
            self.names.append(name)
            self._ctx = atomic_open(self.out_dir / name, "w")
            self._file, self._n = self._ctx.__enter__(), 0
        self._file.write(json_line(record))
        self._n += 1

    def _close(self, *exc: Any) -> None:
        if self._ctx is not None:
            ctx, self._ctx, self._file = self._ctx, None, None
            ctx.__exit__(*(exc or (None, None, None)))

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close(*exc)
