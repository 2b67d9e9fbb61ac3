"""Multiple choice on the 26M recipe shape: xiaolm's batched scorer (each question's prompt run once into a KV
cache, its four options as one batch of continuations) against a plain transformers loop.

    python benchmarks/eval_choice.py [--items 1000] [--prompt-tokens 128] [--option-tokens 8] [--batch-items 32]
                                     [--threads 2] [--baselines hf,full] [--baseline-items 100]
                                     [--dtypes fp32] [--quick]

The model is configs/llama-26m.yaml's shape (dim 512, 8 layers, 8 heads, 2 KV heads, context 512) with its
vocabulary of 8,192 and random weights, saved and loaded back by both sides. The items are synthetic four-way
questions of token ids: a prompt of --prompt-tokens (±25%, like C-Eval's zero-shot prompts of 100–200 characters)
and options of --option-tokens (±50%), plus each option's letter as the next token. Compared, on the same items:
  xiaolm    eval/choice.py score_options (shared prefix, --batch-items questions a batch, inference_mode), in
            each of --dtypes (bf16: the weights loaded as bf16)
  full      the same scorer in fp32 with share_prefix=False: one batched forward of the four full sequences
  hf        transformers LlamaForCausalLM from the same directory, one item at a time: its four sequences
            right-padded into one batch under inference_mode, log-softmax over the logits at the option positions
The baselines score only the first --baseline-items items (they are the slow ones); items/s compares the rates.
Printed: seconds and items/s per system, the ratio of items/s to hf's, and the largest difference of an option's
summed log-prob against hf on the items both scored. Time: a few minutes on 2 idle cores (an estimate); measured
on a 2-core machine shared with other jobs (load 8–11): about 25 minutes.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import argument_parser, markdown_table, parse_args, print_header

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
SHAPE = dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=512, tie_embeddings=True)


def make_items(n: int, prompt_tokens: int, option_tokens: int, seed: int = 0) -> list:
    """(prompt ids, four options' ids, four letter ids) per item, lengths drawn around the given sizes."""
    rng = random.Random(seed)
    letters = [30, 31, 32, 33]

    def ids(mean: int, spread: float) -> list[int]:
        return [rng.randrange(100, 8192) for _ in range(max(1, round(mean * rng.uniform(1 - spread, 1 + spread))))]

    return [(ids(prompt_tokens, 0.25), [ids(option_tokens, 0.5) for _ in range(4)], letters) for _ in range(n)]


@torch.inference_mode()
def hf_scores(model, items: list) -> list[list[float]]:
    """Summed log-prob of each option after its prompt: one item's four sequences a batch."""
    out = []
    for prompt, options, _ in items:
        width = len(prompt) + max(len(o) for o in options)
        ids = torch.zeros(len(options), width, dtype=torch.long)
        for j, o in enumerate(options):
            ids[j, :len(prompt) + len(o)] = torch.tensor(prompt + o)
        logits = model(input_ids=ids).logits
        sums = []
        for j, o in enumerate(options):
            logp = torch.log_softmax(logits[j, len(prompt) - 1:len(prompt) - 1 + len(o)].float(), dim=-1)
            sums.append(float(logp.gather(1, torch.tensor(o)[:, None]).sum()))
        out.append(sums)
    return out


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--option-tokens", type=int, default=8)
    p.add_argument("--batch-items", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--baselines", default="hf,full", help="comma-separated: hf, full (or none)")
    p.add_argument("--baseline-items", type=int, default=100, help="items the baselines score")
    p.add_argument("--dtypes", default="fp32", help="xiaolm's dtypes, comma-separated: fp32, bf16")
    args = parse_args(p, {"items": 200, "baseline_items": 20}, "about 2 minutes")
    torch.set_num_threads(args.threads)
    print_header(threads=f"{args.threads} torch threads")
    from transformers import LlamaForCausalLM

    from xiaolm.eval.choice import score_options
    from xiaolm.model.export import load_model, save_model_weights
    from xiaolm.model.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    items = make_items(args.items, args.prompt_tokens, args.option_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        save_model_weights(Llama(LlamaConfig(**SHAPE)), tmp)
        ours = {d: load_model(tmp, dtype=dtype, with_tokenizer=False)[0] for d, dtype in
                (("fp32", torch.float32), ("bf16", torch.bfloat16)) if d in args.dtypes.split(",") + ["fp32"]}
        hf = LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").eval()
    runs = [(f"xiaolm {d}", d, True, args.items) for d in args.dtypes.split(",")]
    runs += [(s, "fp32", s == "xiaolm", args.baseline_items) for s in args.baselines.split(",") if s in ("hf", "full")]
    timings, scores, counts = {}, {}, {}
    for system, dtype, shared, n in runs:
        model = ours[dtype]
        if system != "hf":
            score_options(model, items[:8], args.batch_items)  # warm-up: first-call allocations
        start = time.perf_counter()
        if system == "hf":
            scores[system] = hf_scores(hf, items[:n])
        else:
            result = score_options(model, items[:n], args.batch_items, share_prefix=shared)
            scores[system] = [sums for sums, _ in result]
        timings[system], counts[system] = time.perf_counter() - start, n
        print(f"{system}: {n} items, {timings[system]:.1f} s", flush=True)
    base = "hf" if "hf" in timings else runs[0][0]
    rate = {s: counts[s] / timings[s] for s in timings}
    rows = []
    for system in timings:
        diff = max(abs(a - b) for x, y in zip(scores[system], scores[base], strict=False)
                   for a, b in zip(x, y, strict=True))
        rows.append([system, str(counts[system]), f"{timings[system]:.1f}", f"{rate[system]:.1f}",
                     f"{rate[system] / rate[base]:.1f}×", f"{diff:.1e}"])
    tokens = sum(len(pr) + sum(len(o) for o in opts) for pr, opts, _ in items) / len(items)
    print(f"\n{args.items} four-way items, {tokens:.0f} prompt + option tokens per item on average, 26M shape "
          f"(random weights), fp32 CPU")
    print(markdown_table(["system", "items", "seconds", "items/s", f"items/s vs {base}",
                          f"max |Δ log-prob| vs {base}"], rows))


if __name__ == "__main__":
    main()
