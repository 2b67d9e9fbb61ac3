"""The decoder-only (Llama) and the text-to-text (T5) path on the demo corpus at about the same parameter count
(4.00M vs 4.07M) and the same token budget, over seeds: `xiaolm demo --out D seed=S` and
`xiaolm demo --out T model.arch=t5 seed=S` (each pair shares its corpus and tokenizer, both built from the seed).

    python benchmarks/arch_compare.py --llama D0,D1,D2 --t5 T0,T1,T2 [--windows 64]

Read from each demo's results.json: exact match per kind after SFT, multiple choice, held-out preference accuracy
(SFT → DPO), triplet F1 of the fine-tune (and of the same fine-tune from an untrained model), tokens seen.
Computed here, the same for both, because the two validation losses are not the same quantity (Llama predicts
every token of a window, T5 only those after the cut): the **continuation loss** of each pretrained model, the mean
next-token loss on the second half of --windows evenly spread 257-token windows of the pack's val.bin given the
first half (the Llama reads the first half as context, the T5 as its source). Printed: per measure the mean and
min–max over the seeds of each path. Time: about 30 s per pair on 2 CPU cores (an estimate).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from harness import print_header

from xiaolm.data.pack import load_tokens
from xiaolm.model.export import load_model


@torch.no_grad()
def continuation_loss(demo: Path, windows: int, width: int = 257) -> float:
    """Mean loss on the second half of `windows` val.bin windows given the first half, of demo/pretrain's model."""
    model = load_model(demo / "pretrain", with_tokenizer=False)[0]
    tokens = load_tokens(demo / "data" / "packed", "val")
    starts = np.linspace(0, len(tokens) - width, num=windows).astype(np.int64)
    rows = torch.from_numpy(np.stack([tokens[s:s + width] for s in starts]).astype(np.int64))
    x, y = rows[:, :-1], rows[:, 1:].clone()
    y[:, :width // 2 - 1] = -100  # targets: window tokens width//2 … end; source / context: the tokens before
    losses = [model(x[i:i + 16], y[i:i + 16])[1].item() for i in range(0, windows, 16)]
    return sum(losses) / len(losses)


@torch.no_grad()
def source_use(demo: Path, stage: str, chats: int = 64) -> tuple[float, float]:
    """A T5's loss on the first `chats` SFT chats with each chat's own source, and with the next chat's source
    instead: how much the decoder reads its encoder."""
    from xiaolm.model.loss import linear_cross_entropy
    from xiaolm.tokenizer.chat import collate
    from xiaolm.train.sft import load_chat_examples

    model, tokenizer = load_model(demo / stage)
    examples = load_chat_examples([str(demo / "corpus" / "sft.jsonl")], tokenizer, 256, None)[:chats]
    batch = collate(examples, tokenizer.pad_token_id)
    parts = model.split(batch["x"], batch["y"])
    other = torch.roll(torch.arange(len(examples)), 1)
    hidden = model.decode(parts["dec"], model.encode(parts["src"][other], parts["src_mask"][other]),
                          parts["src_mask"][other])
    moved = linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), model.shared.weight, parts["tgt"].reshape(-1))
    return model(batch["x"], batch["y"])[1].item(), moved.item()


def measures(demo: Path, windows: int) -> dict[str, float]:
    r = json.loads((demo / "results.json").read_text(encoding="utf-8"))
    out = {"params (M)": r["pretrain"]["params"] / 1e6, "pretrain tokens seen (M)": r["pretrain"]["tokens_seen"] / 1e6,
           "continuation loss after pretraining (nats)": continuation_loss(demo, windows)}
    for kind, m in r["exact"].items():
        out[f"exact match after SFT, {kind} ({m['n']})"] = 100 * m["accuracy"]
    out[f"4-way multiple choice ({r['choice']['n']})"] = 100 * r["choice"]["accuracy"]
    for when in ("before", "after"):
        out[f"held-out preference accuracy, {'SFT' if when == 'before' else 'DPO'}"] = \
            100 * r["preference"][when]["accuracy"]
    out["triplet F1, fine-tune from DPO"] = r["finetune"]["best_val_f1"]
    out["triplet F1, same fine-tune from scratch"] = r["finetune_scratch"]["best_val_f1"]
    out["SFT tokens seen (M)"] = r["sft"]["tokens_seen"] / 1e6
    return out


def spread(values: list[float], pct: bool) -> str:
    fmt = (lambda v: f"{v:.1f}%") if pct else (lambda v: f"{v:.3f}" if abs(v) < 10 else f"{v:.0f}")
    return f"{fmt(statistics.mean(values))} ({fmt(min(values))}–{fmt(max(values))})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama", required=True, help="comma-separated demo dirs of the decoder-only path")
    p.add_argument("--t5", required=True, help="comma-separated demo dirs of the T5 path, seeds in the same order")
    p.add_argument("--windows", type=int, default=64)
    a = p.parse_args()
    print_header()
    runs = {name: [measures(Path(d), a.windows) for d in dirs.split(",")] for name, dirs in
            (("llama", a.llama), ("t5", a.t5))}
    print(f"\n{len(runs['llama'])} seeds per path; mean (min–max)\n")
    print("| measure | decoder-only (Llama) | encoder-decoder (T5) |")
    print("|---|---|---|")
    for key in runs["llama"][0]:
        pct = "exact" in key or "choice" in key or "accuracy" in key
        print(f"| {key} | " + " | ".join(spread([m[key] for m in runs[name]], pct) for name in ("llama", "t5")) + " |")
    print("\nT5 loss on the first 64 SFT chats with its own source → with another chat's source (nats):")
    for demo in a.t5.split(","):
        for stage in ("pretrain", "sft"):
            own, other = source_use(Path(demo), stage)
            print(f"  {demo} {stage}: {own:.3f} → {other:.3f}")


if __name__ == "__main__":
    main()
