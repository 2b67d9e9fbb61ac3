"""Single-stream greedy decoding: xiaolm's engine vs transformers' `generate` on the same exported model.

    python benchmarks/decode.py [--quick] [--shapes demo,26m] [--new-tokens 256] [--rounds 7] [--threads 1]
                                [--device cpu|cuda] [--dtype fp32|bf16] [--compile] [--model DIR] [--profile]

Each shape gets random weights (speed does not depend on them), is written with `save_model_weights` in --dtype
(the exported safetensors + config.json) and loaded back by xiaolm's `load_model` and by transformers'
`LlamaForCausalLM.from_pretrained` in that dtype onto --device, so both sides run the same weights, batch 1, from
the same 16-token prompt, greedy, no stop token: exactly --new-tokens new tokens each. transformers gets its best
settings: use_cache, do_sample=False, and whichever of eager and sdpa attention was faster in a warm-up (printed).
`--model DIR` adds an exported model dir (e.g. the demo's), its new tokens capped by its context. Shapes: demo =
the demo model (vocab 4096, d256, 4 layers, 4 heads, 2 kv heads, 4.0M parameters); 26m = configs/llama-26m.yaml
(vocab 8192, d512, 8 layers, 8 heads, 2 kv heads); 100m = configs/llama-100m.yaml (vocab 32000, d768, 12 layers,
12 heads, 4 kv heads, 100.1M parameters).
Each round times each side once, ours first, transformers last (the order reverses between rounds), and gives one
ratio per xiaolm row; printed: the median tokens/s per side and the median ratio with its min–max over rounds, and
whether ours produced transformers' tokens (else how many leading tokens agreed in every round: bf16 kernels round
differently, so greedy paths may part).
On CUDA every timed call is bracketed by torch.cuda.synchronize(). `--compile`: a second xiaolm row, the engine
with its decode step under torch.compile (`Engine(compile=True)`, dynamic shapes; one engine reused, so the compile
happens once, in an untimed warm-up whose time is printed). `--profile`: where our decode step spends its time
(torch.profiler, top operators). Full: 7 rounds (~4 minutes on 2 idle cores, an estimate); --quick: 3 rounds
(~2 minutes). On an H200, `--device cuda --dtype bf16 --shapes 100m,26m --rounds 5`: about 1–1.5 minutes (an
estimate); --compile adds its compile time (~1 minute per shape, an estimate).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import SHAPES, argument_parser, markdown_table, model_shape, parse_args, print_header, spread

from xiaolm.infer.generate import Engine, GenerationConfig, common_prefix, generate
from xiaolm.model.export import DTYPES, load_model, save_model_weights
from xiaolm.model.llama import Llama, LlamaConfig

QUICK = {"rounds": 3}


def timed(fn, device: torch.device) -> tuple[float, list[int]]:
    """(seconds, tokens) of one call; on CUDA the queued work before and inside it is waited for."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def engine_fn(engine: Engine, prompt: list[int], cfg: GenerationConfig):
    """What generate() does, on one engine kept across calls (its compiled decode step with it)."""
    def run() -> list[int]:
        engine.add([prompt], [cfg])
        out: list[int] = []
        while engine.rows:
            out += [e.token for e in engine.step() if e.token is not None]
        return out
    return run


def compare(name: str, model_dir: Path, prompt: list[int], new: int, a) -> list[list[str]]:
    """Time both sides (and ours compiled, with --compile) on one exported model; returns table rows."""
    from transformers import LlamaForCausalLM

    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    ours, _ = load_model(model_dir, device=device, dtype=dtype, with_tokenizer=False)
    new = min(new, ours.cfg.max_seq_len - len(prompt))
    cfg = GenerationConfig(max_new_tokens=new, temperature=0.0)
    ids = torch.tensor([prompt], device=device)

    def theirs_fn(model):
        def run() -> list[int]:
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                                     eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None,
                                     repetition_penalty=1.0)  # the dir's generation_config.json sets 1.1
            return out[0, len(prompt):].tolist()
        return run

    hf = {impl: LlamaForCausalLM.from_pretrained(model_dir, attn_implementation=impl, dtype=dtype).to(device).eval()
          for impl in ("sdpa", "eager")}
    warm = {impl: min(timed(theirs_fn(m), device)[0] for _ in range(2)) for impl, m in hf.items()}
    impl = min(warm, key=warm.get)
    sides = {"ours": lambda: generate(ours, prompt, cfg)}
    sides["ours"]()
    note = ""
    if a.compile:
        sides["ours, torch.compile"] = engine_fn(Engine(ours, 1, len(prompt) + new, compile=True), prompt, cfg)
        note = f"; torch.compile warm-up (compiles) {timed(sides['ours, torch.compile'], device)[0]:.1f} s"
    sides["transformers"] = theirs_fn(hf[impl])
    print(f"{name}: {ours.num_params() / 1e6:.1f}M parameters, {new} new tokens, {a.device} {a.dtype}; "
          "transformers warm-up " + ", ".join(f"{k} {new / v:,.0f} tok/s" for k, v in warm.items())
          + f" → {impl}{note}", flush=True)
    tps: dict[str, list[float]] = {side: [] for side in sides}
    same: dict[str, int] = {side: new for side in sides}
    for r in range(a.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        results = {side: timed(sides[side], device) for side in order}
        for side, (seconds, tokens) in results.items():
            tps[side].append(new / seconds)
            same[side] = min(same[side], common_prefix(tokens, results["transformers"][1]))
        print(f"  round {r + 1}/{a.rounds}: " + ", ".join(f"{side} {tps[side][-1]:,.0f} tok/s" for side in sides)
              + ", ratio " + ", ".join(f"{tps[side][-1] / tps['transformers'][-1]:.2f}x" for side in sides
                                       if side != "transformers"), flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            generate(ours, prompt, GenerationConfig(max_new_tokens=min(64, new), temperature=0.0))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    rows = []
    for side in (s for s in sides if s != "transformers"):
        ratios = [o / t for o, t in zip(tps[side], tps["transformers"], strict=True)]
        rows.append([name + ("" if side == "ours" else ", torch.compile"), f"{ours.num_params() / 1e6:.1f}M",
                     str(new), f"{statistics.median(tps[side]):,.0f}",
                     f"{statistics.median(tps['transformers']):,.0f} ({impl})", spread(ratios, "{:.2f}x"),
                     "yes" if same[side] == new else f"NO: the first {same[side]}"])
    return rows


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--shapes", default="demo,26m", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--model", action="append", default=[], help="also an exported model dir (repeatable)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="both sides")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the weights, both sides")
    p.add_argument("--compile", action="store_true", help="also ours with the decode step under torch.compile")
    p.add_argument("--profile", action="store_true")
    a = parse_args(p, QUICK, "~2 minutes")
    shapes = [s for s in a.shapes.split(",") if s]
    if unknown := set(shapes) - set(SHAPES):
        p.error(f"--shapes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SHAPES)}")
    torch.set_num_threads(a.threads)
    print_header()
    prompt = [(i * 37 + 11) % 4000 + 10 for i in range(16)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            torch.manual_seed(0)
            model = Llama(LlamaConfig(**{**model_shape(shape), "max_seq_len": len(prompt) + a.new_tokens}))
            save_model_weights(model, Path(tmp) / shape, DTYPES[a.dtype])
            rows += compare(f"{shape} shape (random weights)", Path(tmp) / shape, prompt, a.new_tokens, a)
        for model_dir in a.model:
            rows += compare(str(model_dir), Path(model_dir), prompt, a.new_tokens, a)
    print()
    print(markdown_table(["model", "params", "new tokens", "ours tok/s", "transformers tok/s",
                          "ratio (median, min–max)", "same tokens"], rows))


if __name__ == "__main__":
    main()
