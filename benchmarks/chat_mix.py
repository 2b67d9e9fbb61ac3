"""Does mixing chats into the triplet fine-tune keep the chat ability? With and without `finetune.chat_mix`.

    python benchmarks/chat_mix.py --demo runs/demo [--mixes 0,0.25] [--seeds 0,1,2] [--steps 120]

Starts from a finished demo run (its DPO model, corpus and tokenizer) and runs the demo's own fine-tune settings
once per (seed, mix), mixes alternating within each seed. After each run, the `best/` model is scored on the
demo's held-out extraction records (triplet F1, from the run's retention.json) and on every held-out chat
question of the demo (`corpus/eval/heldout_qa.jsonl`, exact match per kind). Prints the starting model's scores,
then per mix the mean and min–max over seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from harness import print_header

from xiaolm.demo import DemoConfig, demo_stage_configs
from xiaolm.eval.qa import exact_match
from xiaolm.model.export import load_model
from xiaolm.records.read import read_items
from xiaolm.train.finetune import run_finetune


def chat_exact(model_dir: Path, tokenizer, qa: list[dict]) -> dict[str, float]:
    model = load_model(model_dir, with_tokenizer=False)[0]
    return {kind: m["accuracy"] for kind, m in exact_match(model, tokenizer, qa).items()}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", required=True, help="a finished `xiaolm demo --out DIR` run")
    p.add_argument("--mixes", default="0,0.25")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=0, help="fine-tune steps (0: the demo's)")
    a = p.parse_args()
    demo = Path(a.demo)
    corpus = {k: Path(v) for k, v in json.loads((demo / "corpus" / "done.json").read_text("utf-8")).items()}
    base = demo_stage_configs(DemoConfig(), demo, corpus)["finetune"]
    if a.steps:
        base = replace(base, max_steps=a.steps, eval_every=a.steps, save_every=a.steps)
    _, tokenizer = load_model(demo / "model")
    qa = read_items(corpus["eval_qa"])
    print_header()
    start = chat_exact(Path(base.init_from), tokenizer, qa)
    rows: dict[float, list[dict]] = {}
    before_f1 = 0.0
    work = Path(tempfile.mkdtemp(prefix="xiaolm-chatmix-"))
    try:
        for seed in (int(s) for s in a.seeds.split(",")):
            for mix in (float(m) for m in a.mixes.split(",")):
                cfg = replace(base, seed=seed, out=str(work / f"mix{mix}-seed{seed}"),
                              finetune=replace(base.finetune, chat_mix=mix))
                summary = run_finetune(cfg)
                before_f1 = summary["retention"]["before"]["triplet_f1"]  # the same starting model every run
                row = {"f1": summary["retention"]["after"]["triplet_f1"],
                       **chat_exact(Path(cfg.out) / "best", tokenizer, qa)}
                rows.setdefault(mix, []).append(row)
                print(f"seed {seed} chat_mix {mix}: {row}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kinds = list(start)
    print(f"\n{base.max_steps} steps × {base.batch_size} rows from {base.init_from}; seeds {a.seeds}; "
          f"mean (min–max)\n")
    print("| chat_mix | triplet F1 | " + " | ".join(f"chat exact, {k}" for k in kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    print(f"| before fine-tuning | {before_f1:.3f} | " + " | ".join(f"{start[k]:.3f}" for k in kinds) + " |")
    for mix, runs in rows.items():
        print(f"| {mix} | {spread([r['f1'] for r in runs])} | "
              + " | ".join(spread([r[k] for r in runs]) for k in kinds) + " |")


if __name__ == "__main__":
    main()
