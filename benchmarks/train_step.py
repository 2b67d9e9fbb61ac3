"""Training-step throughput and memory: xiaolm's Llama vs transformers' LlamaForCausalLM, same shapes.

    python benchmarks/train_step.py [--quick] [--dim 256 --layers 4 --vocab 8192 --batch 8 --seq 256]
                                    [--steps 10 --rounds 20 --memory-runs 5] [--dtype fp32|bf16|both]
                                    [--heads 4 --kv-heads 4] [--device cpu|cuda]

Full size (the defaults): d256, 4 layers, 4 heads, vocab 8192 (5.31M parameters), batch 8 × 256, 20 rounds of
10 timed steps and 5 memory runs per side, fp32 and bf16 autocast: about 8 minutes on 2 idle cores. `--quick`:
10 rounds of 5 steps, 3 memory runs per side, same model: about 3 minutes. Both times are estimates (~0.4 s a step
at the ~5k tokens/s measured on 2 cores, ~6 s per memory subprocess), not measured. On a GPU, the 100M recipe's
shape: `--device cuda --dtype bf16 --dim 768 --layers 12 --heads 12 --kv-heads 4 --vocab 32000 --batch 16 --seq 512
--steps 10 --rounds 5 --memory-runs 1`, about 1 minute on an H200 (an estimate, mostly the memory subprocesses).

Both sides train the same initial weights on the same batch with the same optimizer: the AdamW that xiaolm's
`make_optimizer` builds (`torch.optim.AdamW(fused=True)` on CPU and CUDA, lr 1e-4, weight decay 0 here, two
parameter groups), so the step differs only in the model and its loss: xiaolm's `Llama` with its fused chunked
cross-entropy against `LlamaForCausalLM` (sdpa) with `labels=`.
Throughput: both models in this process; each round times one side, then the other, back to back (who goes
first alternates), and gives one ratio xiaolm/transformers. Printed: every round, then the median tokens/s and
the median ratio with the min–max over rounds. Machine noise reaches both sides of a round alike but not every
round alike: the min–max says how far one run of this benchmark can be trusted (on 2-core machines the fp32 ratio
has come out anywhere from 0.96x to 1.30x). On CUDA each timing is bracketed by torch.cuda.synchronize(), and MFU
is printed as the training loop logs it: median tokens/s × xiaolm.model.llama.flops_per_token (6·N + 12·layers·
dim·seq, N the matmul weights, output head included) ÷ the GPU's dense bf16 peak from the data-sheet table of
xiaolm.train.metrics (989 TFLOP/s for an H100 SXM or H200), the same FLOPs for both sides; none on a CPU. Neither
side is compiled (the training loop compiles on CUDA by default: this is the eager step).
Peak memory: each side alone in a fresh subprocess, run --memory-runs times, alternating sides: the peak resident
set (VmHWM) of a process that imports what its side needs, builds the model and trains 3 steps; and that peak less
the resident set once the side is loaded (imports, lazily loaded modules and kernels, by one step of a tiny model
of the same side), which leaves the model's training memory: transformers' import alone is ~120 MB, which
xiaolm's process does not load, and the first optimizer pulls in ~80 MB of torch._dynamo and sympy on both sides.
Printed as median (min–max) over the runs; a ratio is the median (min–max) of the ratios of the runs paired in
order. On CUDA the same runs measure torch.cuda.max_memory_allocated (its peak reset once loaded) and the
allocated memory once loaded instead of VmHWM and VmRSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
from harness import (
    argument_parser,
    load_average,
    markdown_table,
    parse_args,
    print_header,
    proc_status_mb,
    run_json,
    spread,
)

from xiaolm.model.llama import Llama, LlamaConfig, flops_per_token
from xiaolm.train.loop import TrainConfig, make_optimizer
from xiaolm.train.metrics import peak_flops

SIDES = ("xiaolm", "hf")
AMPS = {"fp32": None, "bf16": torch.bfloat16}
QUICK = {"steps": 5, "rounds": 10, "memory_runs": 3}


def model_config(a: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                       max_seq_len=a.seq)


def build(side: str, a: argparse.Namespace):
    """(model, optimizer, loss function) for one side on --device, same initial weights, same optimizer
    construction."""
    cfg, device = model_config(a), torch.device(a.device)
    torch.manual_seed(0)
    model, loss_fn = Llama(cfg), xiaolm_loss
    if side == "hf":
        from transformers import LlamaConfig as HFConfig
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM(HFConfig(**cfg.hf_config(), attn_implementation="sdpa"))
        hf.load_state_dict(model.state_dict())
        model, loss_fn = hf, hf_loss
    model = model.to(device)
    return model, make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0), device), loss_fn


def xiaolm_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Next-token loss as `xiaolm pretrain` computes it: the fused chunked cross-entropy."""
    return model(x[:, :-1], x[:, 1:])[1]


def hf_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Next-token loss as a transformers user computes it: `labels=` (the model shifts them)."""
    return model(input_ids=x, labels=x).loss


def train_steps(model, opt, loss_fn, x: torch.Tensor, amp: torch.dtype | None, steps: int) -> None:
    """`steps` forward + backward + optimizer steps on the batch x."""
    for _ in range(steps):
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def time_steps(model, opt, loss_fn, x: torch.Tensor, amp: torch.dtype | None, steps: int) -> float:
    """Tokens per second of `steps` training steps after one untimed step (caches warm again after the other
    side ran)."""
    train_steps(model, opt, loss_fn, x, amp, 1)
    sync(x.device)
    start = time.perf_counter()
    train_steps(model, opt, loss_fn, x, amp, steps)
    sync(x.device)
    return x.shape[0] * (x.shape[1] - 1) * steps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (timing CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch(a: argparse.Namespace, vocab: int, rows: int, seq: int) -> torch.Tensor:
    """Random token ids [rows, seq + 1] on --device, the same every time."""
    return torch.randint(0, vocab, (rows, seq + 1), generator=torch.Generator().manual_seed(0)).to(a.device)


def measure_alone(side: str, a: argparse.Namespace) -> None:
    """In a fresh process: the memory once the side is loaded (imports, lazily imported modules, kernels: one step
    of a tiny model of the same side, then freed), then the peak over building the real model and 3 steps. RSS and
    VmHWM; on CUDA, allocated tensors and max_memory_allocated (its peak reset once loaded)."""
    amp, cuda = AMPS[a.dtype], a.device == "cuda"
    tiny = argparse.Namespace(**{**vars(a), "dim": 8 * a.heads, "layers": 1, "vocab": 64, "batch": 1, "seq": 8})
    train_steps(*build(side, tiny), batch(a, 64, 1, 8), amp, 1)
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loaded = torch.cuda.memory_allocated() / 2**20 if cuda else proc_status_mb("VmRSS")
    train_steps(*build(side, a), batch(a, a.vocab, a.batch, a.seq), amp, 3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else proc_status_mb("VmHWM")
    print(json.dumps({"loaded_mb": loaded, "peak_mb": peak}))


def memory_runs(a: argparse.Namespace, dtype: str) -> dict[str, list[dict[str, float]]]:
    """--memory-runs fresh subprocesses per side, sides alternating."""
    shape = ["--dim", a.dim, "--layers", a.layers, "--heads", a.heads, "--kv-heads", a.kv_heads, "--vocab", a.vocab,
             "--batch", a.batch, "--seq", a.seq, "--dtype", dtype, "--device", a.device]
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for i in range(a.memory_runs):
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            runs[side].append(run_json([sys.executable, __file__, *map(str, shape), "--only", side]))
    return runs


def ratio_spread(ours: list[float], theirs: list[float]) -> str:
    """Median ratio with the min–max of the paired ratios, e.g. '1.12x (0.96–1.30x)'."""
    r = [o / t for o, t in zip(ours, theirs, strict=True)]
    return f"{statistics.median(r):.2f}x ({min(r):.2f}–{max(r):.2f}x)"


def main() -> None:
    """Alternate both sides per dtype; print every round, then medians, spreads and a Markdown table."""
    p = argument_parser(__doc__)
    p.add_argument("--dim", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side and round")
    p.add_argument("--rounds", type=int, default=20, help="rounds of one timing per side, back to back")
    p.add_argument("--memory-runs", type=int, default=5, help="fresh subprocesses per side and dtype")
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both", help="bf16: autocast")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="both sides")
    p.add_argument("--only", choices=SIDES, help=argparse.SUPPRESS)
    a = parse_args(p, QUICK, "about 3 minutes")
    if a.only:
        measure_alone(a.only, a)
        return
    print_header()
    sides = {side: build(side, a) for side in SIDES}
    x = batch(a, a.vocab, a.batch, a.seq)
    flops, peak_flops_s = flops_per_token(model_config(a), a.seq), peak_flops(0.0, torch.device(a.device))
    print(f"params {sides['xiaolm'][0].num_params() / 1e6:.2f}M, batch {a.batch} × seq {a.seq}, {a.rounds} rounds "
          f"of {a.steps} steps per side, {a.memory_runs} memory runs per side, device {a.device}; optimizer: "
          + ", ".join(f"{side} {type(opt).__name__}(fused={opt.defaults['fused']})" for side, (_, opt, _) in
                      sides.items()))
    print(f"MFU: tokens/s × {flops / 1e9:.3f} GFLOP per token (6·N + 12·layers·dim·seq) ÷ "
          + (f"{peak_flops_s / 1e12:,.0f} TFLOP/s (the data sheet's dense bf16 peak, xiaolm.train.metrics)"
             if peak_flops_s else "no known peak on this device: not printed"))
    mem = "CUDA max allocated" if a.device == "cuda" else "peak RSS"
    loaded = "allocated" if a.device == "cuda" else "RSS"
    rows = []
    for dtype in ["fp32", "bf16"] if a.dtype == "both" else [a.dtype]:
        for side in SIDES:
            train_steps(*sides[side], x, AMPS[dtype], 2)  # one-off costs: allocator growth, kernel selection
        tps: dict[str, list[float]] = {side: [] for side in SIDES}
        for r in range(a.rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                tps[side].append(time_steps(*sides[side], x, AMPS[dtype], a.steps))
            print(f"{dtype} round {r + 1:2d}: xiaolm {tps['xiaolm'][-1]:8,.0f} tokens/s, transformers "
                  f"{tps['hf'][-1]:8,.0f} tokens/s, ratio {tps['xiaolm'][-1] / tps['hf'][-1]:.2f}x", flush=True)
        runs = memory_runs(a, dtype)
        peak = {side: [run["peak_mb"] for run in runs[side]] for side in SIDES}
        grown = {side: [run["peak_mb"] - run["loaded_mb"] for run in runs[side]] for side in SIDES}
        mfu = {side: f"{statistics.median(tps[side]) * flops / peak_flops_s:.1%}" if peak_flops_s else "—"
               for side in SIDES}
        for side, name in zip(SIDES, ("xiaolm", "transformers"), strict=True):
            speed = spread(tps[side]) + (f" (MFU {mfu[side]})" if peak_flops_s else "")
            print(f"{dtype} {name:12s} tokens/s {speed}, {mem} "
                  f"{spread(peak[side])} MB, {loaded} once loaded {spread([r['loaded_mb'] for r in runs[side]])} "
                  f"MB, peak above loaded {spread(grown[side])} MB")
        thr, rss, growth = (ratio_spread(v["xiaolm"], v["hf"]) for v in (tps, peak, grown))
        print(f"{dtype} xiaolm/transformers: throughput {thr} over {a.rounds} rounds, {mem} {rss}, "
              f"peak above loaded {growth} over {a.memory_runs} runs")
        rows.append([{"fp32": "fp32", "bf16": "bf16 autocast"}[dtype], spread(tps["xiaolm"]), spread(tps["hf"]),
                     f"**{thr}**", f"{mfu['xiaolm']} / {mfu['hf']}", f"{spread(peak['xiaolm'])} MB",
                     f"{spread(peak['hf'])} MB", rss, growth])
    print(f"load {load_average()} at the end\n")
    print(markdown_table(["dtype", "xiaolm tokens/s, median (min–max)", "transformers tokens/s",
                          f"throughput ratio, median (min–max of {a.rounds} rounds)", "MFU xiaolm / transformers",
                          f"xiaolm {mem}", f"transformers {mem}", f"{mem} ratio (min–max of {a.memory_runs} runs)",
                          f"ratio of peak − {loaded} once loaded"], rows))


if __name__ == "__main__":
    main()
