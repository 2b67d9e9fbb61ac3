"""Training-step throughput: xiaolm's Llama vs transformers' LlamaForCausalLM, same process, same shapes.

    python benchmarks/train_step.py [--dim 256 --layers 4 --vocab 8192 --batch 8 --seq 256 --steps 10 --rounds 3]

Prints tokens/s for each and the ratio (ours / HF). Runs alternate so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from xiaolm.model.llama import Llama, LlamaConfig


def time_steps(model: torch.nn.Module, step, batch: int, seq: int, vocab: int, steps: int) -> float:
    """Tokens per second of `steps` forward+backward+AdamW steps after 2 warm-up steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        loss = step(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return batch * seq * steps / (time.perf_counter() - start)


def main() -> None:
    """Run both models in alternation and print the median tokens/s and their ratio."""
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
    a = p.parse_args()
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                      max_seq_len=a.seq)
    torch.manual_seed(0)
    ours = Llama(cfg)
    hf = LlamaForCausalLM(HFConfig(**cfg.hf_config(), attn_implementation="sdpa"))
    hf.load_state_dict(ours.state_dict())

    def ours_step(m, x):
        return m(x[:, :-1], x[:, 1:])[1]

    def hf_step(m, x):
        return m(input_ids=x[:, :-1], labels=x[:, :-1]).loss

    results: dict[str, list[float]] = {"xiaolm": [], "hf": []}
    for _ in range(a.rounds):
        results["xiaolm"].append(time_steps(ours, ours_step, a.batch, a.seq, a.vocab, a.steps))
        results["hf"].append(time_steps(hf, hf_step, a.batch, a.seq, a.vocab, a.steps))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"params {ours.num_params() / 1e6:.2f}M, batch {a.batch} x seq {a.seq}, {torch.get_num_threads()} threads")
    for k, v in results.items():
        print(f"{k:7s} tokens/s median {med[k]:8.0f}  (min {min(v):.0f}, max {max(v):.0f})")
    print(f"ratio xiaolm/hf: {med['xiaolm'] / med['hf']:.2f}x")


if __name__ == "__main__":
    main()
