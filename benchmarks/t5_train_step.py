"""Training-step throughput: xiaolm's T5 vs transformers' T5ForConditionalGeneration, same weights, batch, optimizer.

    python benchmarks/t5_train_step.py [--shape demo|seed] [--batch 16 --src 128 --tgt 128] [--warmup 3]
                                       [--rounds 7 --steps 5] [--optimizer fused|foreach] [--hf-attn auto|sdpa|eager]
                                       [--threads N]

Shapes: demo = T5Config(vocab 4096, d256, 2+2 layers, 4 heads × 64, ffn 704, max_seq_len 256); seed = the
ChatLM-mini-Chinese 0.2B shape (vocab 29298, d768, 10+10 layers, 12 heads × 64, ffn 3072, max_seq_len 512).
Our T5 is built with seed 0, saved with `save_model_weights` and loaded back by
`T5ForConditionalGeneration.from_pretrained`, so both start from the same weights (dropout 0 on both, from our
config). The batch: --batch rows of random token ids, each a source of --src tokens and a target of --tgt tokens.
Ours gets it in the decoder-only layout every xiaolm objective builds (a row = source + target, x = row[:-1],
y = labels[1:], -100 on the first src-1 positions of y, the target after them); transformers gets input_ids=source,
attention_mask=ones, labels=target (it shifts the labels right behind the padding token, as ours does).
One step, the same on both sides: zero_grad, forward to the mean cross-entropy (ours `model(x, y)`, transformers
`model(...).loss`), backward, torch.optim.AdamW(lr 1e-4, defaults otherwise) step; --optimizer fused (the default,
what xiaolm's make_optimizer builds on CPU, and the faster on CPU) or foreach, the same for both. transformers'
attention: --hf-attn auto times one step with sdpa and one with eager after the warm-up and keeps the faster
(printed). The first warm-up step's losses (same weights, same batch) must agree within 1e-4 relative, else the
script stops. Then the rest of the --warmup steps per side, and --rounds rounds, each timing --steps steps of ours
and then of transformers (ours, theirs, ours, theirs, … so machine noise hits both alike). tokens/s = batch × (src +
tgt) tokens per step × steps ÷ seconds (xiaolm's loop counts x's batch × (src + tgt − 1): the same factor on both
sides). Printed: every round, the median tokens/s of each side with the min–max over rounds, and the ratio
ours/transformers: the median of the per-round ratios with their min–max. Neither side is compiled.
Time (estimates): demo (4.07M parameters) with the defaults, about 1 minute on 2 idle cores (~0.45 s a step);
seed (187.7M parameters) takes tens of seconds a step there at batch 16: on a CPU use e.g. `--shape seed --batch 4
--rounds 5 --steps 2` (some minutes).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import argument_parser, load_average, markdown_table, parse_args, print_header, spread

from xiaolm.model.export import save_model_weights
from xiaolm.model.t5 import T5, T5Config

SHAPES = {
    "demo": dict(vocab_size=4096, dim=256, n_layers=2, n_heads=4, head_dim=64, ffn_dim=704, max_seq_len=256),
    "seed": dict(vocab_size=29298, dim=768, n_layers=10, n_heads=12, head_dim=64, ffn_dim=3072, max_seq_len=512),
}
QUICK = {"rounds": 3, "steps": 3}
IGNORE = -100
LOSS_RTOL = 1e-4


def build(a) -> tuple[T5, torch.nn.Module]:
    """Ours (seed 0) and transformers' model loaded from its export, both in training mode (dropout 0)."""
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(**SHAPES[a.shape])
    if max(a.src, a.tgt) > cfg.max_seq_len:
        sys.exit(f"--src {a.src} / --tgt {a.tgt}: the {a.shape} shape takes at most {cfg.max_seq_len} tokens each")
    ours = T5(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_model_weights(ours, Path(tmp))
        attn = "sdpa" if a.hf_attn == "auto" else a.hf_attn
        theirs = T5ForConditionalGeneration.from_pretrained(tmp, attn_implementation=attn)
    return ours.train(), theirs.train()


def batches(a, vocab: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The same rows for both sides: ours as (x, y) decoder-only rows, transformers' as source / labels."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(1, vocab, (a.batch, a.src), generator=g)  # 1..: the padding id 0 stays out
    tgt = torch.randint(1, vocab, (a.batch, a.tgt), generator=g)
    ids = torch.cat([src, tgt], 1)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < a.src, IGNORE)
    ours = {"x": ids[:, :-1], "y": labels[:, 1:]}
    theirs = {"input_ids": src, "attention_mask": torch.ones_like(src), "labels": tgt}
    return ours, theirs


def ours_loss(model: T5, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["x"], batch["y"])[1]


def hf_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def train_steps(model, opt: torch.optim.Optimizer, loss_fn, batch: dict[str, torch.Tensor], steps: int) -> float:
    """`steps` training steps (zero_grad, forward, backward, AdamW step); the last loss (nan for none)."""
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
    return loss.item()


def timed(side, steps: int) -> float:
    """Seconds of `steps` training steps of one side (model, optimizer, loss function, batch)."""
    start = time.perf_counter()
    train_steps(*side, steps)
    return time.perf_counter() - start


def pick_attention(model, side, a) -> str:
    """--hf-attn auto: one timed step with sdpa and one with eager (after the warm-up); the faster one stays set."""
    if a.hf_attn != "auto":
        return a.hf_attn
    seconds = {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        train_steps(*side, 1)  # the first step after a switch: not timed
        seconds[impl] = timed(side, 1)
    best = min(seconds, key=seconds.get)
    model.set_attn_implementation(best)
    print("transformers attention: " + ", ".join(f"{k} {v:.2f} s/step" for k, v in seconds.items()) + f" → {best}")
    return best


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--shape", choices=list(SHAPES), default="demo", help="model shape (see above)")
    p.add_argument("--batch", type=int, default=16, help="rows per step")
    p.add_argument("--src", type=int, default=128, help="source tokens per row")
    p.add_argument("--tgt", type=int, default=128, help="target tokens per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before the rounds")
    p.add_argument("--rounds", type=int, default=7, help="rounds of one timing per side, ours then transformers")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side and round")
    p.add_argument("--optimizer", choices=["fused", "foreach"], default="fused", help="AdamW implementation, both")
    p.add_argument("--hf-attn", choices=["auto", "sdpa", "eager"], default="auto", help="transformers' attention")
    p.add_argument("--threads", type=int, default=0, help="torch threads, both sides (0: torch's default)")
    a = parse_args(p, QUICK, "about 30 s")
    if min(a.batch, a.src, a.tgt, a.warmup, a.rounds, a.steps) < 1:
        p.error("--batch, --src, --tgt, --warmup, --rounds and --steps must be at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    print_header()
    ours, theirs = build(a)
    n_ours = ours.num_params()
    n_theirs = sum(p.numel() for p in theirs.parameters())  # unique tensors: the tied embeddings counted once
    if n_ours != n_theirs:
        sys.exit(f"parameter counts differ: ours {n_ours:,}, transformers {n_theirs:,}")
    kind = {"fused": True} if a.optimizer == "fused" else {"foreach": True}
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4, **kind) for m in (ours, theirs)]
    b_ours, b_theirs = batches(a, ours.cfg.vocab_size)
    sides = {"xiaolm": (ours, opts[0], ours_loss, b_ours), "hf": (theirs, opts[1], hf_loss, b_theirs)}
    tokens = a.batch * (a.src + a.tgt)
    print(f"shape {a.shape}: {n_ours / 1e6:.2f}M parameters, batch {a.batch} × (source {a.src} + target {a.tgt}) = "
          f"{tokens:,} tokens a step, {torch.get_num_threads()} torch threads, {a.warmup} warm-up steps, {a.rounds} "
          f"rounds of {a.steps} steps per side, torch.optim.AdamW(lr=1e-4, {a.optimizer}=True)", flush=True)

    first = {side: train_steps(*sides[side], 1) for side in sides}  # same weights, same batch: the same loss
    rel = abs(first["xiaolm"] - first["hf"]) / abs(first["hf"])
    print(f"first-step loss: xiaolm {first['xiaolm']:.6f}, transformers {first['hf']:.6f}, relative difference "
          f"{rel:.1e} (limit {LOSS_RTOL:.0e})", flush=True)
    if not rel <= LOSS_RTOL:
        sys.exit("the two models' losses differ: not the same computation, so no comparison")
    for side in sides:
        train_steps(*sides[side], a.warmup - 1)  # the loss check was the first warm-up step
    attn = pick_attention(theirs, sides["hf"], a)

    tps: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(a.rounds):
        for side in sides:
            tps[side].append(tokens * a.steps / timed(sides[side], a.steps))
        print(f"round {r + 1:2d}: xiaolm {tps['xiaolm'][-1]:8,.0f} tokens/s, transformers {tps['hf'][-1]:8,.0f} "
              f"tokens/s, ratio {tps['xiaolm'][-1] / tps['hf'][-1]:.2f}x", flush=True)
    ratios = [o / t for o, t in zip(tps["xiaolm"], tps["hf"], strict=True)]
    print(f"xiaolm       tokens/s {spread(tps['xiaolm'])}")
    print(f"transformers tokens/s {spread(tps['hf'])} ({attn} attention)")
    print(f"xiaolm/transformers: {spread(ratios, '{:.2f}x')} (median, min–max of {a.rounds} rounds' ratios)")
    print(f"load {load_average()} at the end\n")
    print(markdown_table(["shape", "params", "batch × (src + tgt)", "AdamW", "xiaolm tokens/s, median (min–max)",
                          "transformers tokens/s", f"ratio xiaolm/transformers, median (min–max of {a.rounds} rounds)",
                          "first-step loss xiaolm / transformers"],
                         [[a.shape, f"{n_ours / 1e6:.2f}M", f"{a.batch} × ({a.src} + {a.tgt})", a.optimizer,
                           spread(tps["xiaolm"]), f"{spread(tps['hf'])} ({attn})", f"**{spread(ratios, '{:.2f}x')}**",
                           f"{first['xiaolm']:.5f} / {first['hf']:.5f}"]]))


if __name__ == "__main__":
    main()
