"""Training memory of a recipe: an estimate for a CUDA GPU from its shapes, and a measurement on this machine.

    python benchmarks/memory_budget.py [--quick] [--recipes 100m-checkpointed,100m,26m] [key=value ...]
    python benchmarks/memory_budget.py --config configs/llama-100m.yaml --vocab 32000 \
        batch_size=1 data.seq_len=512 activation_checkpointing=true

Without --config it runs the built-in recipes, those of benchmarks/RESULTS.md, all with dtype=bf16 (what
`dtype=auto` picks on a bf16 GPU); key=value overrides then apply to each:
  100m-checkpointed  configs/llama-100m.yaml, vocab 32000, batch_size=1 data.seq_len=512 activation_checkpointing=true
  100m               the same with activation_checkpointing=false
  26m                configs/llama-26m.yaml, vocab 8192, batch_size=4 data.seq_len=512
Full size (the default): all three, about 1 minute on 2 idle cores (CPU); `--quick`: only 100m-checkpointed (the
4 GB GPU recipe of configs/llama-100m.yaml), about 20 s. Both times are estimates from a 1-step run on a loaded
2-core machine, not measured. Each recipe runs in a fresh subprocess, so that no peak of one reaches the next.

Estimate (bytes), labelled as such, with what xiaolm does on CUDA whatever machine prints it: weights 4·N,
gradients 4·N, AdamW moments 8·N (all fp32: master weights stay fp32 under autocast); under bf16/fp16 autocast,
half-precision copies of every matmul weight 2·N_matmul (autocast caches them for the forward pass, and each
matmul keeps its copy for its backward); saved activations, per token and layer about 34·d + 10·h bytes in
bf16/fp16 autocast and twice that in fp32 (residual and norm inputs in fp32, q/k/v, attention output, gate/up/silu
products in half precision; d = model dim, h = SwiGLU width), with activation checkpointing only each block's input
(4·d per token) plus one block's activations during its recomputation; the fused cross-entropy's fp32 gradients of
the output weight (4·V·d) and of the hidden states (4·tokens·d), both built in the forward pass, and one chunk of
logits at 8 bytes an element, the chunk being what model/loss.py picks on CUDA (CHUNK_ELEMENTS["cuda"] logits,
whole rows). The parts are added as if all were alive at once. Not counted: the CUDA context (~0.3–0.5 GB, outside
PyTorch's allocator), cuBLAS workspaces, the allocator's reserve beyond what is allocated, torch.compile (on by
default on CUDA, not used here). When this machine is not a CUDA GPU, the same estimate with this machine's
settings (its chunk size, its dtype) is printed beside it, to compare with what is measured here.
Measurement, 3 training steps (forward, backward, fused AdamW) after building the model and optimizer: on CUDA,
torch.cuda.max_memory_allocated (weights included) and max_memory_reserved; elsewhere, the growth of the process's
peak resident set (VmHWM) over the steps plus the fp32 weights already resident before them: CPU peak RSS growth,
from another allocator (glibc's, with its caches and fragmentation) and other kernels, so neither a bound nor a
proxy of what a GPU allocates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from harness import argument_parser, markdown_table, parse_args, print_header, run_json
from torch import nn

REPO = Path(__file__).resolve().parents[1]
# name: (config, vocabulary, overrides)
RECIPES = {
    "100m-checkpointed": ("configs/llama-100m.yaml", 32000,
                          ["batch_size=1", "data.seq_len=512", "activation_checkpointing=true", "dtype=bf16"]),
    "100m": ("configs/llama-100m.yaml", 32000,
             ["batch_size=1", "data.seq_len=512", "activation_checkpointing=false", "dtype=bf16"]),
    "26m": ("configs/llama-26m.yaml", 8192, ["batch_size=4", "data.seq_len=512", "dtype=bf16"]),
}
QUICK = {"recipes": "100m-checkpointed"}


def estimate_bytes(cfg, model: nn.Module, half: bool, device: str) -> dict[str, int]:
    """Training memory of one process (no sharding) by component, with `device`'s cross-entropy chunk."""
    from xiaolm.model.loss import CHUNK_ELEMENTS

    m, tokens = cfg.model, cfg.batch_size * cfg.data.seq_len
    n = sum(p.numel() for p in model.parameters())
    n_matmul = sum(p.numel() for p in {mod.weight for mod in model.modules() if isinstance(mod, nn.Linear)})
    per_token_layer = (34 * m.dim + 10 * m.hidden_dim) * (1 if half else 2)
    if cfg.activation_checkpointing:
        acts = tokens * (4 * m.dim * m.n_layers + per_token_layer)
    else:
        acts = tokens * per_token_layer * m.n_layers
    chunk_rows = min(tokens, max(1, CHUNK_ELEMENTS.get(device, 1 << 22) // m.vocab_size))
    est = {"weights": 4 * n, "gradients": 4 * n, "adamw": 8 * n}
    if half:
        est["half weight copies"] = 2 * n_matmul
    est["activations"] = acts
    est["cross-entropy"] = 4 * m.vocab_size * m.dim + 4 * tokens * m.dim + 8 * chunk_rows * m.vocab_size
    return est


def measure(config: str, vocab: int, overrides: list[str], steps: int) -> dict:
    """Estimates for CUDA and for this machine, then `steps` training steps measured (run in a fresh process)."""
    from xiaolm.config import load_config
    from xiaolm.device import peak_memory_mb, resolve_autocast_dtype, resolve_device
    from xiaolm.train.config import TrainConfig
    from xiaolm.train.loop import make_optimizer
    from xiaolm.train.objective import lm_loss
    from xiaolm.train.stage import build_model

    cfg = load_config(TrainConfig, REPO / config if not Path(config).is_file() else config, overrides)
    if cfg.model.arch != "llama":  # the activation formula below is the Llama block's
        sys.exit(f"{config}: model.arch={cfg.model.arch}; this estimate covers Llama models only")
    device = resolve_device(cfg.device)
    amp = resolve_autocast_dtype(cfg.dtype, device)
    cfg, model = build_model(cfg, vocab, device)
    opt = make_optimizer(model, cfg, device)
    n = model.num_params()
    row = {"params": n, "batch": cfg.batch_size, "seq": cfg.data.seq_len,
           "checkpointing": cfg.activation_checkpointing, "device": device.type,
           "dtype": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp],
           "cuda_dtype": {"auto": "bf16 (fp16 without bf16)"}.get(cfg.dtype, cfg.dtype),
           "estimate_cuda": estimate_bytes(cfg, model, half=cfg.dtype != "fp32", device="cuda")}
    if device.type != "cuda":
        row["estimate_here"] = estimate_bytes(cfg, model, half=amp is not None, device=device.type)
    x = torch.randint(0, vocab, (cfg.batch_size, cfg.data.seq_len + 1), device=device)
    batch = {"x": x[:, :-1], "y": x[:, 1:]}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_memory_mb(device)
    for _ in range(steps):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        row["measured_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    else:  # the weights were resident before the first step
        row["measured_mb"] = peak_memory_mb(device) - before + 4 * n / 2**20
    return row


def mb(est: dict[str, int]) -> str:
    """The total of an estimate, in MB."""
    return f"{sum(est.values()) / 2**20:,.0f} MB"


def main() -> None:
    """Run each recipe in a fresh subprocess; print estimates and measurements, then a Markdown table."""
    p = argument_parser(__doc__)
    p.add_argument("--config", help="one recipe: this YAML with --vocab and the overrides (else the built-in ones)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary of --config")
    p.add_argument("--recipes", default=",".join(RECIPES), help="built-in recipes to run, without --config")
    p.add_argument("--steps", type=int, default=3, help="training steps measured")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (each recipe's, then these)")
    a = parse_args(p, QUICK, "about 20 s")
    if a.measure:
        print(json.dumps(measure(a.config, a.vocab, a.overrides, a.steps)))
        return
    print_header(("torch",))
    if a.config:
        runs = {a.config: (a.config, a.vocab, [])}
    else:
        unknown = set(a.recipes.split(",")) - set(RECIPES)
        if unknown:
            p.error(f"unknown recipe(s) {', '.join(sorted(unknown))}: choose from {', '.join(RECIPES)}")
        runs = {name: RECIPES[name] for name in a.recipes.split(",")}
    table = []
    for name, (config, vocab, overrides) in runs.items():
        r = run_json([sys.executable, __file__, "--measure", "--config", config, "--vocab", str(vocab),
                      "--steps", str(a.steps), *overrides, *a.overrides])
        shape = f"{r['batch']} × {r['seq']}"
        print(f"\n{'' if name == config else name + ': '}{config}, vocab {vocab}, "
              f"{' '.join(overrides + a.overrides)}: {r['params'] / 1e6:.1f}M params, batch {shape}, "
              f"activation checkpointing {'on' if r['checkpointing'] else 'off'}")
        estimates = [(f"estimate on CUDA, {r['cuda_dtype']}", r["estimate_cuda"])]
        if "estimate_here" in r:
            estimates.append((f"estimate with {r['device']} settings, {r['dtype']}", r["estimate_here"]))
        for label, est in estimates:
            parts = ", ".join(f"{k} {v / 2**20:,.1f}" for k, v in est.items())
            print(f"  {label}: {mb(est)} ({parts} MB)")
        if r["device"] == "cuda":
            what = "torch.cuda.max_memory_allocated"
            print(f"  measured on CUDA, {r['dtype']}: max_memory_allocated {r['measured_mb']:,.0f} MB, "
                  f"max_memory_reserved {r['reserved_mb']:,.0f} MB")
        else:
            what = f"{r['device'].upper()} peak RSS growth + weights"
            print(f"  measured, {r['dtype']}: {what} {r['measured_mb']:,.0f} MB (another allocator: neither a bound "
                  "nor a proxy of GPU memory)")
        table.append([name, f"{r['params'] / 1e6:.1f}M", shape, "on" if r["checkpointing"] else "off",
                      f"{mb(r['estimate_cuda'])}, {r['cuda_dtype']}",
                      f"{mb(r['estimate_here'])}, {r['dtype']}" if "estimate_here" in r else "—",
                      f"{r['measured_mb']:,.0f} MB, {r['dtype']}", what])
    print()
    print(markdown_table(["recipe", "params", "batch × seq", "activation checkpointing", "estimate on CUDA",
                          "estimate with this machine's settings", "measured", "what was measured"], table))

if __name__ == "__main__":
    main()
