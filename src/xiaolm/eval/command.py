"""The `xiaolm eval` command's arguments and handler (cli.py lists it; the work is in eval/tasks.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from xiaolm.eval import TASKS

EXAMPLES = """examples:
  xiaolm eval runs/demo/model --task ppl --data runs/demo/corpus/eval/val_text.jsonl --out runs/eval/ppl
  xiaolm eval MODEL --task choice --data ceval-exam/ --shots 5 --out runs/eval/ceval    # val/ split, dev/ shots
  xiaolm eval MODEL --task choice --data cmmlu/ --shots 5                               # test/ split
  xiaolm eval MODEL --task bleu --data medical/finetune/test_zh_0.json --limit 200 --rouge-words
  xiaolm eval MODEL --task exact --data runs/demo/corpus/eval/heldout_qa.jsonl
  xiaolm eval MODEL --task extraction --data triplets.jsonl
  xiaolm eval runs/dpo --task preference --data pairs.jsonl --ref runs/sft   # implicit DPO reward accuracy
--out DIR writes result.json and, for choice/bleu/rouge, predictions.jsonl (one line an item)."""


def eval_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `xiaolm eval`."""
    p.add_argument("model", metavar="MODEL", help="a run dir or an exported model dir (with its tokenizer)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="files or folders (C-Eval, CMMLU)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N items")
    p.add_argument("--out", metavar="DIR", help="write result.json (+ predictions.jsonl) here")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|mps",
                   help="where the model runs (default auto: cuda, then mps, then cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="model weights (default fp32)")
    p.add_argument("--batch-size", type=int, default=16, help="items (texts, questions, prompts) a batch")
    p.add_argument("--doc-mask", dest="doc_mask", action="store_true", default=None,
                   help="ppl: attention inside each document (default: as the run's data.doc_mask, else on)")
    p.add_argument("--no-doc-mask", dest="doc_mask", action="store_false",
                   help="ppl: texts as one stream, attention across documents (data.doc_mask=false models)")
    p.add_argument("--seq-len", type=int, default=512, help="ppl: window length (capped at the model's context)")
    p.add_argument("--stride", type=int, help="ppl: sliding-window step for long texts (default seq-len / 2)")
    p.add_argument("--shots", type=int, default=0, help="choice: K examples from the subject's dev split")
    p.add_argument("--method", default="text", choices=["text", "letter"],
                   help="choice: which score `accuracy` reports (both are always reported; default text)")
    p.add_argument("--rouge-words", action="store_true", help="bleu/rouge: ROUGE on jieba words too")
    p.add_argument("--max-new-tokens", type=int, help="generation tasks (default 128; exact 48)")
    p.add_argument("--ref", metavar="MODEL", help="preference: the reference model: implicit DPO reward accuracy")
    p.add_argument("--beta", type=float, default=0.1, help="preference with --ref: DPO's beta (default 0.1)")


def cmd_eval(args: argparse.Namespace) -> dict:
    """`xiaolm eval`: print the result as JSON; with --out, write result.json and predictions.jsonl atomically."""
    from xiaolm.eval.tasks import evaluate
    from xiaolm.io import atomic_open, atomic_write_json, json_line, json_text

    result, predictions = evaluate(
        args.model, args.task, args.data, limit=args.limit, device=args.device, doc_mask=args.doc_mask,
        shots=args.shots, method=args.method, stride=args.stride, seq_len=args.seq_len, words=args.rouge_words,
        max_new_tokens=args.max_new_tokens, ref=args.ref, beta=args.beta, dtype=args.dtype, batch_size=args.batch_size)
    print(json_text(result, indent=2))
    if args.out:
        atomic_write_json(Path(args.out) / "result.json", result)
        if predictions:
            with atomic_open(Path(args.out) / "predictions.jsonl") as f:
                f.writelines(json_line(p) for p in predictions)
    return result
