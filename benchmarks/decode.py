"""Single-stream greedy decoding: xiaolm's engine vs transformers' `generate` on the same exported model.

    python benchmarks/decode.py [--quick] [--shapes demo,26m] [--new-tokens 256] [--rounds 7] [--threads 1]
                                [--model DIR] [--profile]

Each shape gets random weights (speed does not depend on them), is written with `save_model_weights` (the
exported safetensors + config.json) and loaded back by `LlamaForCausalLM.from_pretrained`, so both sides run the
same weights in fp32 on the CPU, batch 1, from the same 16-token prompt, greedy, no stop token: exactly
--new-tokens new tokens each. transformers gets its best settings: use_cache, do_sample=False, and whichever of
eager and sdpa attention was faster in a warm-up (printed). `--model DIR` adds an exported model dir (e.g. the
demo's), its new tokens capped by its context. Shapes: demo = the demo model (vocab 4096, d256, 4 layers, 4 heads,
2 kv heads, 4.0M parameters); 26m = configs/llama-26m.yaml (vocab 8192, d512, 8 layers, 8 heads, 2 kv heads).
Each round times ours then theirs (the order alternates between rounds) and gives one ratio; printed: the median
tokens/s per side and the median ratio with its min–max over rounds, and whether both produced the same tokens.
`--profile`: where our decode step spends its time (torch.profiler, top operators). Full: 7 rounds (~4 minutes on
2 idle cores, an estimate); --quick: 3 rounds (~2 minutes).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import argument_parser, markdown_table, parse_args, print_header, spread

from xiaolm.infer.generate import GenerationConfig, generate
from xiaolm.model.export import load_model, save_model_weights
from xiaolm.model.llama import Llama, LlamaConfig

SHAPES = {
    "demo": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=2),
    "26m": dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=2),
}
QUICK = {"rounds": 3}


def timed(fn) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare(name: str, model_dir: Path, prompt: list[int], new: int, rounds: int, profile: bool) -> list[str]:
    """Time both sides on one exported model; returns a table row."""
    from transformers import LlamaForCausalLM

    ours, _ = load_model(model_dir, with_tokenizer=False)
    new = min(new, ours.cfg.max_seq_len - len(prompt))
    cfg = GenerationConfig(max_new_tokens=new, temperature=0.0)
    ids = torch.tensor([prompt])

    def theirs_fn(model):
        def run() -> list[int]:
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                                     eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None,
                                     repetition_penalty=1.0)  # the dir's generation_config.json sets 1.1
            return out[0, len(prompt):].tolist()
        return run

    hf = {impl: LlamaForCausalLM.from_pretrained(model_dir, attn_implementation=impl).eval()
          for impl in ("sdpa", "eager")}
    warm = {impl: min(timed(theirs_fn(m))[0] for _ in range(2)) for impl, m in hf.items()}
    impl = min(warm, key=warm.get)
    theirs = theirs_fn(hf[impl])
    ours_fn = lambda: generate(ours, prompt, cfg)  # noqa: E731
    ours_fn()
    print(f"{name}: {ours.num_params() / 1e6:.1f}M parameters, {new} new tokens; transformers warm-up "
          + ", ".join(f"{k} {new / v:,.0f} tok/s" for k, v in warm.items()) + f" → {impl}", flush=True)
    ours_tps, theirs_tps, ratios, same = [], [], [], True
    for r in range(rounds):
        sides = [("ours", ours_fn), ("theirs", theirs)]
        results = dict((side, timed(fn)) for side, fn in (sides if r % 2 == 0 else sides[::-1]))
        (t_ours, a), (t_theirs, b) = results["ours"], results["theirs"]
        same &= a == b
        ours_tps.append(new / t_ours)
        theirs_tps.append(new / t_theirs)
        ratios.append(t_theirs / t_ours)
        print(f"  round {r + 1}: ours {ours_tps[-1]:,.0f} tok/s, transformers {theirs_tps[-1]:,.0f} tok/s, "
              f"ratio {ratios[-1]:.2f}x", flush=True)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(ours, prompt, GenerationConfig(max_new_tokens=min(64, new), temperature=0.0))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return [name, f"{ours.num_params() / 1e6:.1f}M", str(new), f"{statistics.median(ours_tps):,.0f}",
            f"{statistics.median(theirs_tps):,.0f} ({impl})", spread(ratios, "{:.2f}x"), "yes" if same else "NO"]


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--shapes", default="demo,26m")
    p.add_argument("--model", action="append", default=[], help="also an exported model dir (repeatable)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--profile", action="store_true")
    a = parse_args(p, QUICK, "~2 minutes")
    torch.set_num_threads(a.threads)
    print_header()
    prompt = [(i * 37 + 11) % 4000 + 10 for i in range(16)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in filter(None, a.shapes.split(",")):
            torch.manual_seed(0)
            model = Llama(LlamaConfig(**SHAPES[shape], max_seq_len=len(prompt) + a.new_tokens))
            save_model_weights(model, Path(tmp) / shape)
            rows.append(compare(f"{shape} shape (random weights)", Path(tmp) / shape, prompt, a.new_tokens,
                                a.rounds, a.profile))
        for model_dir in a.model:
            rows.append(compare(str(model_dir), Path(model_dir), prompt, a.new_tokens, a.rounds, a.profile))
    print()
    print(markdown_table(["model", "params", "new tokens", "ours tok/s", "transformers tok/s",
                          "ratio (median, min–max)", "same tokens"], rows))


if __name__ == "__main__":
    main()
