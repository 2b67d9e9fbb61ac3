"""The demo corpus written in public datasets' own file layouts: the fixtures of the seed recipes.

`xiaolm recipe run NAME --scale fixture` feeds each stage files laid out exactly as the download it stands for
(WikiExtractor blocks, BELLE's JSON lines, alpaca's JSON array, the medical dialogues' GB18030 CSV, Zhihu-KOL's
Parquet, DuIE's spo_list, …), so `xiaolm data import` reads them through the same recipe it uses on the real
files. The content is the demo corpus (documents, single-turn chats, preference pairs, extraction records), so
the files are as large as a test needs and nothing is downloaded.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from xiaolm.io import atomic_open, atomic_write_text


def _jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _json_array(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, json.dumps(list(rows), ensure_ascii=False, indent=1) + "\n")


def _wiki(path: Path, docs: list[dict]) -> None:
    blocks = [f'<doc id="{i}" url="https://zh.wikipedia.org/wiki?curid={i}" title="{d["text"][:6]}">\n'
              f'{d["text"][:6]}\n\n{d["text"]}\n</doc>\n' for i, d in enumerate(docs, 1)]
    atomic_write_text(path, "".join(blocks))


def _medical_csv(path: Path, chats: list[tuple[str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["department", "title", "ask", "answer"])
    for q, a in chats:
        writer.writerow(["内科", q[:12], q, a])
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue().encode("gb18030"))


def _zhihu_parquet(path: Path, chats: list[tuple[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"INSTRUCTION": [q for q, _ in chats], "RESPONSE": [a for _, a in chats],
                      "SOURCE": ["Zhihu"] * len(chats),
                      "METADATA": [json.dumps({"question_id": i}) for i in range(len(chats))]})
    with atomic_open(path, "wb") as f:
        pq.write_table(table, f)


def _duie(record: dict) -> dict:
    return {"text": record["text"], "spo_list": [
        {"predicate": p, "object_type": {"@value": "实体"}, "subject_type": "城市", "object": {"@value": o},
         "subject": s} for s, p, o in record["triplets"]]}


# import recipe → (the file's path under its folder, the kind of demo records it holds, the writer)
LAYOUTS: dict[str, tuple[str, str, Callable[[Path, Any], None]]] = {
    "zhwiki": ("extracted/AA/wiki_00", "docs", _wiki),
    "skypile": ("2020-40_zh_head_0000.jsonl", "docs", lambda p, docs: _jsonl(p, ({"text": d["text"]} for d in docs))),
    "webtext2019zh": ("web_text_zh_train.json", "chats", lambda p, chats: _jsonl(p, (
        {"qid": str(i), "title": q, "desc": "", "topic": "问答", "star": 1, "content": a, "answer_id": str(10 ** 6 + i),
         "answerer_tags": ""} for i, (q, a) in enumerate(chats)))),
    "baike_qa2019": ("baike_qa_train.json", "chats", lambda p, chats: _jsonl(p, (
        {"qid": f"qid_{i}", "category": "生活", "title": q, "desc": "", "answer": a}
        for i, (q, a) in enumerate(chats)))),
    "medical-dialogue": ("IM_内科/内科5000-33000.csv", "chats", _medical_csv),
    "zhihu-kol": ("data/train-00000-of-00005.parquet", "chats", _zhihu_parquet),
    "belle": ("Belle_open_source_0.5M.json", "chats", lambda p, chats: _jsonl(p, (
        {"instruction": q, "input": "", "output": a} for q, a in chats))),
    "firefly": ("firefly-train-1.1M.jsonl", "chats", lambda p, chats: _jsonl(p, (
        {"kind": "Demo", "input": q, "target": a} for q, a in chats))),
    "alpaca-gpt4-zh": ("alpaca_gpt4_data_zh.json", "chats", lambda p, chats: _json_array(p, (
        {"instruction": q, "input": "", "output": a} for q, a in chats))),
    "prompt-chosen-rejected": ("train.jsonl", "pairs", lambda p, pairs: _jsonl(p, (
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in pairs))),
    "llamafactory-dpo": ("dpo_zh_demo.json", "pairs", lambda p, pairs: _json_array(p, (
        {"conversations": [{"from": "human", "value": r["prompt"]}], "chosen": {"from": "gpt", "value": r["chosen"]},
         "rejected": {"from": "gpt", "value": r["rejected"]}} for r in pairs))),
    "medicalgpt-reward": ("train.jsonl", "pairs", lambda p, pairs: _jsonl(p, (
        {"system": "", "history": [], "question": r["prompt"], "response_chosen": r["chosen"],
         "response_rejected": r["rejected"]} for r in pairs))),
    "duie": ("duie_train.json", "extraction", lambda p, records: _jsonl(p, (_duie(r) for r in records))),
}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def demo_records(corpus: dict[str, Path]) -> dict[str, list]:
    """The demo corpus (build_demo_corpus's paths) as the kinds of records the layouts take."""
    docs = [r for f in sorted(Path(corpus["raw_text"]).glob("*.jsonl")) if f.name != "dirty.jsonl" for r in _read(f)]
    chats = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in _read(Path(corpus["sft"]))
             if len(r["messages"]) == 2 and r["messages"][0]["role"] == "user"]
    pairs = [r for r in _read(Path(corpus["preference"])) if isinstance(r.get("prompt"), str)]
    return {"docs": docs, "chats": chats, "pairs": pairs, "extraction": _read(Path(corpus["extraction"]))}


def write_layout(source: str, records: list, out_dir: str | Path) -> Path:
    """Write `records` (of the layout's kind) as `source`'s download would hold them; returns the folder."""
    if source not in LAYOUTS:
        raise KeyError(f"no fixture layout for {source!r}; known: {', '.join(sorted(LAYOUTS))}")
    name, _, write = LAYOUTS[source]
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, records)
    return Path(out_dir)
