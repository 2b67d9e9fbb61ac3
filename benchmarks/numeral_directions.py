"""Where the demo's numeral score comes from: held-out numerals split by direction, beside arithmetic.

    python benchmarks/numeral_directions.py --model runs/demo/dpo/best [--items runs/demo/corpus/eval/heldout_qa.jsonl]

The demo reports one "numerals" exact match, over two kinds of question: digits to Chinese numerals ("把3847写成中文
数字。") and Chinese numerals to digits ("“三千八百四十七”用阿拉伯数字怎么写？"). This scores a model's greedy answers
(the demo's exact-match rule, eval/qa.py) with the numeral questions split by that direction, and the arithmetic
questions as they are, on any file of `{"messages", "answer", "kind"}` items: the demo's held-out questions (the
default, next to the model's run) or its RL prompts (`corpus/rl_prompts.jsonl`), which GRPO trains on. A direction
the model never gets right gives GRPO's exact-answer reward nothing to compare within a group.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import markdown_table, print_header

from xiaolm.eval.qa import exact_match
from xiaolm.model.export import load_model
from xiaolm.records.read import read_items


def by_direction(items: list[dict]) -> list[dict]:
    """Numeral items re-kinded by direction (a question with a digit in it asks for Chinese); arithmetic kept."""
    out = []
    for item in items:
        kind = item.get("kind")
        if kind == "numerals":
            question = item["messages"][-1]["content"]
            kind = "numerals, digits → Chinese" if any(c.isdigit() for c in question) else \
                "numerals, Chinese → digits"
        elif kind != "arithmetic":
            continue
        out.append({**item, "kind": kind})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a model dir (a run's best/, or an exported model)")
    p.add_argument("--items", help="question file; default: corpus/eval/heldout_qa.jsonl of the model's demo run")
    a = p.parse_args()
    items_path = Path(a.items) if a.items else Path(a.model).resolve().parents[1] / "corpus/eval/heldout_qa.jsonl"
    print_header()
    model, tokenizer = load_model(a.model)
    scores = exact_match(model, tokenizer, by_direction(read_items(str(items_path))))
    rows = [[kind, f"{m['correct']} / {m['n']}", f"{m['accuracy']:.1%}"] for kind, m in sorted(scores.items())]
    print(markdown_table(["questions", "right", "exact match"], rows))


if __name__ == "__main__":
    main()
