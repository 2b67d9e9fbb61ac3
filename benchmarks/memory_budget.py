"""Training memory of a recipe: the estimate from its shapes, and the measurement on this machine.

    python benchmarks/memory_budget.py --config configs/llama-100m.yaml --vocab 32000 \
        batch_size=1 data.seq_len=512 activation_checkpointing=true

Estimate (bytes): weights 4·N + gradients 4·N + AdamW moments 8·N (fp32 master copies under autocast),
plus saved activations. Per token and layer a block keeps about 34·d + 10·h bytes in bf16/fp16 autocast (about
twice that in fp32): residual and norm inputs in fp32, q/k/v, attention output, gate/up/silu products in half
precision (d = model dim, h = SwiGLU width). With activation checkpointing only each block's input (4·d per token)
stays, plus one block's activations during its recomputation. The fused cross-entropy adds one float32 copy of
the output weight (its gradient, built in the forward pass) and one chunk of logits.
Measurement: on CUDA, torch.cuda.max_memory_allocated over 3 steps; on CPU, growth of the peak resident set
(VmHWM) from just before the first step, which also counts the allocator's caches, so it reads high.
"""

from __future__ import annotations

import argparse

import torch

from xiaolm.config import load_config
from xiaolm.device import peak_memory_mb, resolve_autocast_dtype, resolve_device
from xiaolm.model.loss import CHUNK_ELEMENTS
from xiaolm.train.config import TrainConfig
from xiaolm.train.loop import make_optimizer
from xiaolm.train.objective import lm_loss
from xiaolm.train.stage import build_model


def estimate_bytes(cfg: TrainConfig, n_params: int, half: bool, device: str) -> dict[str, float]:
    """Component-wise training memory estimate for one process (no sharding)."""
    m, tokens = cfg.model, cfg.batch_size * cfg.data.seq_len
    per_token_layer = (34 * m.dim + 10 * m.hidden_dim) * (1 if half else 2)
    if cfg.activation_checkpointing:
        acts = tokens * (4 * m.dim * m.n_layers + per_token_layer)
    else:
        acts = tokens * per_token_layer * m.n_layers
    chunk = CHUNK_ELEMENTS.get(device, 1 << 22)
    return {"weights": 4 * n_params, "gradients": 4 * n_params, "adamw": 8 * n_params, "activations": acts,
            "cross-entropy": 4 * m.vocab_size * m.dim + 8 * min(chunk, tokens * m.vocab_size)}


def main() -> None:
    """Print the estimate, then train 3 steps and print what was measured."""
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args()
    cfg = load_config(TrainConfig, a.config, a.overrides)
    device = resolve_device(cfg.device)
    amp = resolve_autocast_dtype(cfg.dtype, device)
    cfg, model = build_model(cfg, a.vocab, device)
    opt = make_optimizer(model, cfg, device)
    n = model.num_params()
    est = estimate_bytes(cfg, n, half=amp is not None, device=device.type)
    print(f"{a.config}: {n / 1e6:.1f}M params, batch {cfg.batch_size} × {cfg.data.seq_len}, {amp or 'fp32'}, "
          f"activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}, device {device}")
    for k, v in est.items():
        print(f"  estimate {k:13s} {v / 2**20:9.1f} MB")
    print(f"  estimate {'total':13s} {sum(est.values()) / 2**20:9.1f} MB")
    x = torch.randint(0, a.vocab, (cfg.batch_size, cfg.data.seq_len + 1), device=device)
    batch = {"x": x[:, :-1], "y": x[:, 1:]}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = peak_memory_mb(device) * 2**20 - 4 * n  # the weights were already resident before the first step
    for _ in range(a.steps):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        print(f"  measured max_memory_allocated {torch.cuda.max_memory_allocated(device) / 2**20:9.1f} MB "
              f"(weights before the first step: {base / 2**20:.1f} MB)")
    else:
        grown = peak_memory_mb(device) * 2**20 - base
        print(f"  measured CPU peak RSS growth incl. weights {grown / 2**20:9.1f} MB "
              f"(an upper bound: allocator caches count too)")


if __name__ == "__main__":
    main()
