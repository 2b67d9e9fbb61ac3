"""Training-step throughput and memory: xiaolm's Llama vs transformers' LlamaForCausalLM, same shapes.

    python benchmarks/train_step.py [--dim 256 --layers 4 --vocab 8192 --batch 8 --seq 256 --steps 10 --rounds 3]
                                    [--dtype fp32|bf16|both]

Each side runs its own training step as a user would: xiaolm's model with its fused chunked cross-entropy and
fused AdamW (what `xiaolm pretrain` uses), transformers' model with `labels=` and `torch.optim.AdamW` defaults.
Throughput: both in this process, rounds alternating so machine noise hits both alike; prints the median
tokens/s and the ratio. Peak memory: each side alone in a fresh subprocess (VmHWM), so one cannot hide the
other's peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from xiaolm.device import peak_memory_mb
from xiaolm.model.llama import Llama, LlamaConfig
from xiaolm.train.loop import TrainConfig, make_optimizer


def build(side: str, a: argparse.Namespace):
    """(model, optimizer, loss function) for one side, same initial weights."""
    cfg = LlamaConfig(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                      max_seq_len=a.seq)
    torch.manual_seed(0)
    ours = Llama(cfg)
    if side == "xiaolm":
        opt = make_optimizer(ours, TrainConfig(lr=1e-4, weight_decay=0.0), torch.device("cpu"))
        return ours, opt, lambda m, x: m(x[:, :-1], x[:, 1:])[1]
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(HFConfig(**cfg.hf_config(), attn_implementation="sdpa"))
    hf.load_state_dict(ours.state_dict())
    return hf, torch.optim.AdamW(hf.parameters(), lr=1e-4), lambda m, x: m(input_ids=x, labels=x).loss


def time_steps(model, opt, loss_fn, a: argparse.Namespace, amp: torch.dtype | None, steps: int) -> float:
    """Tokens per second of `steps` forward+backward+optimizer steps after 2 warm-up steps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = loss_fn(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return a.batch * a.seq * steps / (time.perf_counter() - start)


def peak_rss_mb(side: str, dtype: str, argv: list[str]) -> float:
    """Peak RSS of a fresh process that builds one side and trains a few steps."""
    out = subprocess.run([sys.executable, __file__, *argv, "--only", side, "--dtype", dtype],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    """Alternate both sides per dtype; print median tokens/s, peak RSS and the ratios."""
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--only", choices=["xiaolm", "hf"], help=argparse.SUPPRESS)
    a = p.parse_args()
    amps = {"fp32": None, "bf16": torch.bfloat16}
    if a.only:
        time_steps(*build(a.only, a), a, amps[a.dtype], steps=3)
        print(json.dumps({"peak_rss_mb": peak_memory_mb(torch.device("cpu"))}))
        return
    argv = [arg for arg in sys.argv[1:] if arg not in ("--dtype", a.dtype)]
    sides = {side: build(side, a) for side in ("xiaolm", "hf")}
    print(f"params {sides['xiaolm'][0].num_params() / 1e6:.2f}M, batch {a.batch} x seq {a.seq}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for dtype in (["fp32", "bf16"] if a.dtype == "both" else [a.dtype]):
        tps: dict[str, list[float]] = {"xiaolm": [], "hf": []}
        for _ in range(a.rounds):
            for side, (model, opt, loss_fn) in sides.items():
                tps[side].append(time_steps(model, opt, loss_fn, a, amps[dtype], a.steps))
        med = {k: statistics.median(v) for k, v in tps.items()}
        rss = {side: peak_rss_mb(side, dtype, argv) for side in sides}
        for side, v in tps.items():
            print(f"{dtype} {side:7s} tokens/s median {med[side]:8.0f}  (min {min(v):.0f}, max {max(v):.0f})  "
                  f"peak RSS {rss[side]:7.0f} MB")
        print(f"{dtype} ratio xiaolm/hf: throughput {med['xiaolm'] / med['hf']:.2f}x, "
              f"peak RSS {rss['xiaolm'] / rss['hf']:.2f}x")


if __name__ == "__main__":
    main()
