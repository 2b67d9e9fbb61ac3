"""`xiaolm eval --task choice` against lm-evaluation-harness, item by item, on the same model and the same items.

    pip install lm-eval    # not a xiaolm dependency
    python benchmarks/lm_eval_agreement.py --model runs/demo/model --data runs/demo/corpus/eval/choice.jsonl
                                           [--subject chinese_language_and_literature] [--limit 300]

The protocol is C-Eval's own, which lm-eval's ceval tasks follow: the subject's header, the question, its options
one a line, "答案：", then the log-likelihood of each option letter as the continuation (no space before it). The
items are read by xiaolm (our JSONL, or C-Eval/CMMLU CSV folders) and given the subject named by --subject; the
exact prompt string xiaolm builds for each is written, with its letters and the answer's index, to a JSONL file that
lm-eval reads through a task YAML (benchmarks/lm_eval_tasks/xiaolm_choice.yaml, copied beside the data), so both
score the same text. lm-eval runs the HF model dir with `model=hf` on the CPU in float32, `--log_samples`; xiaolm
runs `choice_scores(method="letter")`. Printed: each side's accuracy, the items where the picks differ (with both
sides' letter log-probs) and the largest log-prob difference over all items and letters, apart for the prompts
longer than the model's context (both cut them from the left, lm-eval keeping one token more).
Time: about 1 minute for 300 items of the demo model on 2 cores (an estimate).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from harness import print_header

from xiaolm.eval.choice import choice_scores
from xiaolm.eval.choice_data import ceval_prompt, read_choice_items
from xiaolm.model.export import load_model

TASK_YAML = Path(__file__).parent / "lm_eval_tasks" / "xiaolm_choice.yaml"


def lm_eval_logprobs(model_dir: str, rows: list[dict], work: Path) -> list[list[float]]:
    """Each row's letter log-likelihoods as lm-eval computes them (its samples, in document order)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = work / "tasks"
    tasks.mkdir()
    data = tasks / "items.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (tasks / TASK_YAML.name).write_text(TASK_YAML.read_text(encoding="utf-8").replace("ITEMS_JSONL", str(data)),
                                        encoding="utf-8")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                  tasks=["xiaolm_choice"], task_manager=TaskManager(include_path=str(tasks)),
                                  device="cpu", batch_size=16, log_samples=True)
    samples = sorted(out["samples"]["xiaolm_choice"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an HF model dir (xiaolm export output)")
    p.add_argument("--data", nargs="+", required=True, help="choice items: our JSONL, C-Eval or CMMLU folders")
    p.add_argument("--subject", default="chinese_language_and_literature",
                   help="subject whose C-Eval header the prompts get (items without one)")
    p.add_argument("--limit", type=int, default=0)
    a = p.parse_args()
    print_header(("torch", "transformers", "lm_eval"))
    items = read_choice_items(a.data, limit=a.limit)
    for item in items:
        item.subject = item.subject or a.subject
    model, tokenizer = load_model(a.model)
    ours_result, ours = choice_scores(model, tokenizer, items, method="letter")
    rows = [{"prompt": ceval_prompt(item), "letters": list(item.options), "gold": list(item.options).index(item.answer)}
            for item in items]
    work = Path(tempfile.mkdtemp())
    try:
        theirs = lm_eval_logprobs(a.model, rows, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # a prompt longer than the context is cut from the left by both, xiaolm to context − 1 tokens (room for the
    # letter), lm-eval to the context itself: such items see one more token in lm-eval, so their gap is reported apart
    ctx = model.cfg.max_seq_len
    cut = [len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) >= ctx - 1 for r in rows]
    disagree, gap, gap_cut = [], 0.0, 0.0
    for item, pred, lps, long in zip(items, ours, theirs, cut, strict=True):
        letters = list(item.options)
        their_pick = letters[max(range(len(lps)), key=lps.__getitem__)]
        diff = max(abs(x - y) for x, y in zip(pred["letter_logprobs"], lps, strict=True))
        gap, gap_cut = (gap, max(gap_cut, diff)) if long else (max(gap, diff), gap_cut)
        if their_pick != pred["letter"]:
            disagree.append((item.id, pred["letter"], their_pick, pred["letter_logprobs"], [round(x, 4) for x in lps]))
    their_acc = sum(max(range(len(lps)), key=lps.__getitem__) == r["gold"] for lps, r in zip(theirs, rows,
                                                                                            strict=True)) / len(rows)
    print(f"\n{len(items)} items, C-Eval protocol (letter log-likelihood after 答案：)")
    print(f"xiaolm eval --task choice (letter): accuracy {ours_result['accuracy_letter']:.4f}")
    print(f"lm-evaluation-harness (acc):        accuracy {their_acc:.4f}")
    print(f"picks that differ: {len(disagree)} of {len(items)}; largest letter log-prob difference {gap:.2e} "
          f"({len(items) - sum(cut)} prompts within the {ctx}-token context), {gap_cut:.2e} ({sum(cut)} prompts cut "
          f"to fit it: lm-eval keeps one more context token)")
    for d in disagree:
        print(f"  {d[0]}: xiaolm {d[1]} {d[3]}, lm-eval {d[2]} {d[4]}")


if __name__ == "__main__":
    main()
