"""SFT of a T5 on packed rows against padded rows: real (non-padding) tokens per second, the same chats and model.

    python benchmarks/t5_packing.py --demo runs/demo-t5 [--rounds 5 --steps 4]

The demo's chats (D/corpus/sft.jsonl, its tokenizer) and its pretrained T5 (D/pretrain). Packed: SFTObjective
rows of whole chats up to 256 tokens, 6 rows a step (the demo's SFT setting): each chat's source and target are laid
end to end in the row's encoder and decoder inputs with attention kept inside each chat. Padded: 30 chats a step,
each its own row padded to the batch's longest (about the same real tokens a step). One step: forward, backward,
fused AdamW. Rounds alternate the two (packed, padded, …) on consecutive stream rows; printed: each side's real
tokens/s (median, min–max over rounds), the share of positions that are padding in the encoder and decoder inputs,
and the ratio packed/padded (median of per-round ratios, min–max). Time: about 2 minutes on 2 cores (estimate).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from harness import print_header

from xiaolm.model.export import load_model
from xiaolm.train.sft import SFTObjective, load_chat_examples, split_held_out


def step_rate(model, objective, first: int, steps: int, batch: int, opt) -> tuple[float, float, float]:
    """(real tokens/s, padding share of encoder inputs, of decoder inputs) over `steps` steps from row `first`."""
    real, seconds, enc_pad, dec_pad = 0, 0.0, [], []
    for k in range(steps):
        b = objective.train_batch(first + k * batch, batch)
        parts = model.split_packed(b["x"], b["y"], b["doc"]) if "doc" in b else model.split(b["x"], b["y"])
        enc_pad.append(1 - parts["src_mask"].float().mean().item())
        dec_pad.append(1 - parts["tgt_mask"].float().mean().item())
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(b["x"], b["y"], doc_ids=b.get("doc"))[1].backward()
        opt.step()
        seconds += time.perf_counter() - start
        real += int(b["mask"].sum())
    return real / seconds, statistics.mean(enc_pad), statistics.mean(dec_pad)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="a `xiaolm demo model.arch=t5` output dir")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    print_header()
    demo = Path(a.demo)
    model, tokenizer = load_model(demo / "pretrain")
    model.train()
    chats = load_chat_examples([str(demo / "corpus" / "sft.jsonl")], tokenizer, 256, None)
    train, val = split_held_out(chats, 0.02, 0)
    sides = {"packed": (SFTObjective(train, val, 6, 0, tokenizer.pad_token_id, 1, pack_len=256), 6),
             "padded": (SFTObjective(train, val, 30, 0, tokenizer.pad_token_id, 1), 30)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    step_rate(model, sides["padded"][0], 0, 1, 30, opt)  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in sides}
    pads: dict[str, tuple[float, float]] = {}
    for r in range(a.rounds):
        for name, (objective, batch) in sides.items():
            rate, enc, dec = step_rate(model, objective, (r + 1) * a.steps * batch, a.steps, batch, opt)
            rates[name].append(rate)
            pads[name] = (enc, dec)
        print(f"round {r + 1}: packed {rates['packed'][-1]:,.0f}, padded {rates['padded'][-1]:,.0f} real tokens/s")
    ratios = [x / y for x, y in zip(rates["packed"], rates["padded"], strict=True)]
    for name in sides:
        v = rates[name]
        print(f"{name}: {statistics.median(v):,.0f} ({min(v):,.0f}–{max(v):,.0f}) real tokens/s; padding "
              f"{pads[name][0]:.0%} of encoder inputs, {pads[name][1]:.0%} of decoder inputs (last round)")
    print(f"packed/padded: {statistics.median(ratios):.2f}x ({min(ratios):.2f}x–{max(ratios):.2f}x) over "
          f"{a.rounds} rounds of {a.steps} steps")


if __name__ == "__main__":
    main()
