"""Exact match on held-out questions and multiple choice by log-likelihood (C-Eval/CMMLU layout)."""

from __future__ import annotations

import re
from collections import defaultdict

from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.eval.choice_data import choice_options
from xiaolm.infer.generate import GenerationConfig, generate_batch
from xiaolm.tokenizer import IM_END, encode_prompt

_TRIM = re.compile(r"^[\s。．.！!？?，,]+|[\s。．.！!？?，,]+$")


def normalize_answer(text: str) -> str:
    """Strip whitespace and sentence punctuation at both ends."""
    return _TRIM.sub("", text)


def exact_match(model: nn.Module, tokenizer, items: list[dict], max_new_tokens: int = 48,
                batch_size: int = 32) -> dict:
    """Greedy answers to `{"messages", "answer", "kind", "chance"}` items; accuracy per kind with examples.

    A kind's chance is the mean of its items' chance (a blind guess's expected accuracy over the kind): an item's
    `chance` field, else one over its own options (`A`, `B`, … fields or `options`); items with neither are left
    out of that mean, and a kind where none has one reports 0.
    """
    stop = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stop)
    prompts = [encode_prompt(tokenizer, item["messages"]) for item in items]
    outputs: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        outputs.extend(generate_batch(model, prompts[i:i + batch_size], cfg))
    by_kind: dict[str, dict] = defaultdict(lambda: {"n": 0, "correct": 0, "chance": 0.0, "examples": []})
    chances: dict[str, list[float]] = defaultdict(list)
    for item, out in zip(items, outputs, strict=False):
        reply = tokenizer.decode([t for t in out if t not in stop], skip_special_tokens=True)
        ok = normalize_answer(reply) == normalize_answer(item["answer"])
        kind = by_kind[item.get("kind", "all")]
        kind["n"] += 1
        kind["correct"] += int(ok)
        chance = item.get("chance", 1 / len(choice_options(item)) if choice_options(item) else None)
        if chance is not None:  # its own chance, or one over its own options (letters per item)
            chances[item.get("kind", "all")].append(float(chance))
        if len(kind["examples"]) < 3:
            kind["examples"].append({"question": item["messages"][-1]["content"], "answer": item["answer"],
                                     "reply": reply, "correct": ok})
    for name, kind in by_kind.items():
        kind["accuracy"] = kind["correct"] / max(1, kind["n"])
        if chances[name]:
            kind["chance"] = sum(chances[name]) / len(chances[name])
    return dict(by_kind)


def choice_accuracy(model: nn.Module, tokenizer, items: list[dict]) -> dict:
    """Pick the option whose text the model finds most likely as the answer to the question (the demo's check).

    Each item has its own options (A–J fields or an `options` list); chance is the mean of 1 / options per item.
    """
    from xiaolm.eval.choice import choice_scores
    from xiaolm.eval.choice_data import ChoiceItem

    parsed = []
    for i, item in enumerate(items):
        options = choice_options(item)
        if not options:
            raise XiaolmError(f"item {i + 1} has no options", where="eval choice",
                              hint='give each item "A", "B", … fields or an "options" list')
        parsed.append(ChoiceItem(item["question"], options, str(item["answer"]), where=f"item {i + 1}"))
    result, predictions = choice_scores(model, tokenizer, parsed)
    correct = sum(p["text"] == p["answer"] for p in predictions)
    return {"n": len(items), "correct": correct, "accuracy": result["accuracy"], "chance": result["chance"],
            "examples": [{"question": item.question, "answer": item.answer, "pick": p["text"]}
                         for item, p in zip(parsed[:3], predictions, strict=False)]}
