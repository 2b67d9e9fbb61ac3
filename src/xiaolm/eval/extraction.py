"""Triplet extraction as a chat: the prompt template, the answer format, parsing it back, and exact-triplet F1.

Template (fixed: training and evaluation must agree). The user turn is INSTRUCTION, a newline, the text; the
assistant turn is one triplet a line, `(主体, 关系, 客体)` with ", " (ASCII comma and space) between the fields,
or NONE when the text states no triplet. A field that holds ", " or a line break cannot be written this way:
such a triplet is refused (`check_triplets`), so format → parse gives back the triplets of every accepted record.

Scoring: each field is normalized (NFKC, which unifies full- and half-width forms; whitespace stripped; trailing
punctuation 。．.！!？?，,；;：:、 stripped), a record's triplets become a set, and precision, recall and F1 are
micro-averaged: true positives, predicted and gold triplets are summed over all records first.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.infer.generate import GenerationConfig, generate_batch
from xiaolm.tokenizer import IM_END, encode_prompt

INSTRUCTION = "从下面的文本中抽取所有三元组，每行一个，格式为(主体, 关系, 客体)："
SEP = ", "
NONE = "无"
_TRAILING = re.compile(r"[\s。．.！!？?，,；;：:、]+$")

Triplet = tuple[str, str, str]


def extraction_messages(text: str) -> list[dict]:
    """The user turn asking for the triplets of `text`."""
    return [{"role": "user", "content": f"{INSTRUCTION}\n{text}"}]


def format_triplets(triplets: list[list[str]] | list[Triplet]) -> str:
    """The assistant's answer: one `(s, r, o)` a line, or NONE."""
    return "\n".join(f"({SEP.join(t)})" for t in triplets) or NONE


def extraction_chat(record: dict) -> dict:
    """An extraction record as a chat record (user: instruction + text, assistant: its formatted triplets)."""
    messages = extraction_messages(record["text"])
    return {"messages": [*messages, {"role": "assistant", "content": format_triplets(record["triplets"])}]}


def parse_triplets(answer: str) -> list[Triplet]:
    """Triplets read back from an answer: lines `(s, r, o)` (ASCII or full-width brackets); other lines ignored."""
    found = []
    for line in answer.splitlines():
        line = line.strip()
        if line[:1] in "(（" and line[-1:] in ")）":
            parts = line[1:-1].split(SEP)
            if len(parts) == 3 and all(p.strip() for p in parts):
                found.append((parts[0].strip(), parts[1].strip(), parts[2].strip()))
    return found


def check_triplets(triplets: Any) -> str | None:
    """Why these cannot be a record's triplets (None when they can): a list of [subject, relation, object]."""
    if not isinstance(triplets, list):
        return "triplets must be a list"
    for t in triplets:
        if not isinstance(t, list | tuple) or len(t) != 3 or not all(isinstance(f, str) and f.strip() for f in t):
            return f"{t!r} is not three non-empty strings"
        if any(SEP in f or f.splitlines() != [f] or f != f.strip() for f in t):
            return f"{t!r}: a field holds ', ', a line break or outer spaces, which the answer format cannot carry"
    return None


def normalize_field(field: str) -> str:
    """NFKC (full/half width unified), whitespace and trailing punctuation stripped."""
    return _TRAILING.sub("", unicodedata.normalize("NFKC", field).strip()).strip()


def _norm_set(triplets: list) -> set[Triplet]:
    return {tuple(normalize_field(f) for f in t) for t in triplets}


def triplet_scores(predicted: list[list], gold: list[list]) -> dict[str, float]:
    """Micro precision, recall and F1 of exact (normalized) triplets over records; 0 where undefined."""
    tp = n_pred = n_gold = 0
    for p, g in zip(predicted, gold, strict=True):
        p, g = _norm_set(p), _norm_set(g)
        tp, n_pred, n_gold = tp + len(p & g), n_pred + len(p), n_gold + len(g)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "predicted": n_pred, "gold": n_gold}


def extraction_f1(model: nn.Module, tokenizer, records: list[dict], max_new_tokens: int = 128,
                  batch_size: int = 32) -> dict:
    """Greedy answers to `{"text", "triplets"}` records parsed back into triplets: scores and a few examples."""
    bad = next((i for i, r in enumerate(records) if not isinstance(r.get("text"), str) or "triplets" not in r), None)
    if bad is not None:
        raise XiaolmError(f"record {bad + 1} lacks 'text' or 'triplets'", where="eval extraction",
                          hint='records must be {"text": ..., "triplets": [[subject, relation, object], ...]}')
    stop = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stop)
    prompts = [encode_prompt(tokenizer, extraction_messages(r["text"])) for r in records]
    outputs: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        outputs.extend(generate_batch(model, prompts[i:i + batch_size], cfg))
    replies = [tokenizer.decode(out, skip_special_tokens=True) for out in outputs]
    predicted = [parse_triplets(reply) for reply in replies]
    result: dict = triplet_scores(predicted, [r["triplets"] for r in records])
    result["n"] = len(records)
    result["examples"] = [{"text": r["text"], "gold": r["triplets"], "reply": reply}
                          for r, reply in zip(records[:3], replies, strict=False)]
    return result
