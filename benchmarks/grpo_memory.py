"""GRPO's peak memory: LoRA with the adapter-disabled base as reference (one copy of the model) against full
fine-tuning with a frozen reference copy, and full fine-tuning without a reference (grpo.beta 0, TRL's default).

    python benchmarks/grpo_memory.py [--size 100m|26m|toy] [--group 8] [--new-tokens 256] [--prompts 4]
                                     [--batch-size 8] [--steps 2] [--lora-r 16] [--device cpu|cuda]
                                     [--variants lora+adapter,full+copy,full+no-ref]

Each variant is a real `run_grpo` (the one training loop) in a fresh subprocess, from the same random-weight
init_from model of the recipe's shape (--size 100m: configs/llama-100m.yaml, vocab 32,000; the tokenizer, 1,200
tokens trained on tests/fixtures/corpus_zh.jsonl, is smaller than the model's vocabulary, which the model allows).
Per step: --prompts prompts × --group samples of --new-tokens new tokens (a random model rarely stops, so nearly every
answer is the full budget: the worst case), trained in micro-batches of --batch-size rows (grad_accum = rows ÷
batch). bf16 autocast on CUDA, fp32 on CPU; torch.compile off. KL variants use grpo.beta 0.04.
Measured, read from the last step's log row (`peak_mem_mb`): on CUDA torch.cuda.max_memory_allocated since the
process started (weights, reference, optimizer, rollouts, training); on CPU the process's peak RSS as a user sees it
(imports included, glibc's caches too: a check of the estimate's order, not a bound).
Estimate from shapes (arithmetic, printed beside): fp32 weights 4N, the reference copy 4N, trainable parameters'
gradients and AdamW moments 12T, plus the larger of the two phases: rollout (the KV cache, fp32 like the weights:
rows × (prompt + new) × layers × 2 × kv_heads × head_dim × 4, and the prefill's logits rows × prompt × V × 4) and
training (one micro-batch's saved activations and cross-entropy buffers, benchmarks/memory_budget.py's formula,
bf16 weight copies 2·N_matmul under autocast). Not counted: the CUDA context, cuBLAS workspaces, allocator slack.
--variants picks which of the three run, in that order. Time: --size 100m --device cuda on an H200, about a minute per
variant (the LoRA run took 60 s there, mostly its rollouts' 256 decode steps). On 2 CPU cores, --quick
(--size 26m --group 4 --new-tokens 32 --prompts 2) about 2 minutes (an estimate).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from dpo_memory import CORPUS, REPO, corpus_spans, init_shape, write_records
from harness import RECIPE_VOCAB, argument_parser, markdown_table, parse_args, print_header, run_json

# name: (LoRA, rl.ref, grpo.beta)
VARIANTS = {"lora+adapter": (True, "adapter", 0.04), "full+copy": (False, "copy", 0.04),
            "full+no-ref": (False, "auto", 0.0)}
QUICK = {"size": "26m", "group": 4, "new_tokens": 32, "prompts": 2}
PROMPT_TOKENS = 24


def prepare(work: Path, a: argparse.Namespace) -> dict:
    """Tokenizer, prompt records, and the init_from model."""
    from xiaolm.model.export import save_model_weights
    from xiaolm.model.llama import Llama, LlamaConfig
    from xiaolm.tokenizer import load_tokenizer, train_tokenizer

    tok_dir = train_tokenizer([str(CORPUS)], work / "tokenizer", vocab_size=1200, workers=1)
    tokenizer = load_tokenizer(tok_dir)
    span = corpus_spans(tokenizer, random.Random(0))
    write_records(work / "prompts.jsonl", [{"prompt": span(PROMPT_TOKENS), "answer": "好"}
                                           for _ in range(a.prompts * a.steps + 8)])
    shape, vocab = init_shape(a.size, tokenizer)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=vocab, **shape))
    save_model_weights(model, work / "base")
    for f in Path(tok_dir).iterdir():
        shutil.copy2(f, work / "base" / f.name)
    return {"params": model.num_params(), "shape": shape, "vocab": vocab}


def run_variant(a: argparse.Namespace) -> dict:
    """In a fresh process: one GRPO run of the variant; its peak memory and what trained."""
    from xiaolm.config import load_config
    from xiaolm.device import resolve_device
    from xiaolm.train.config import TrainConfig
    from xiaolm.train.grpo import run_grpo

    work, device = Path(a.work), resolve_device(a.device)
    lora, ref, beta = VARIANTS[a.child]
    rows = a.prompts * a.group
    cfg = load_config(TrainConfig, REPO / "configs" / "grpo.yaml", [
        f"out={work / 'run'}", f"init_from={work / 'base'}", f"data.path={work / 'prompts.jsonl'}",
        "data.val_fraction=0.05", f"data.seq_len={PROMPT_TOKENS * 3 + a.new_tokens}", f"max_steps={a.steps}",
        f"batch_size={a.batch_size}", f"grad_accum={rows // a.batch_size}", "log_every=1", f"eval_every={10**6}",
        f"save_every={10**6}", f"device={device}", "compile=false",
        f"dtype={'bf16' if device.type == 'cuda' else 'fp32'}",
        f"rl.max_new_tokens={a.new_tokens}", "rl.rewards=[format]", "rl.reward_weights=[]", "rl.eval_prompts=1",
        f"rl.ref={ref}", f"grpo.group_size={a.group}", f"grpo.beta={beta}", f"lora.r={a.lora_r if lora else 0}",
        f"lora.alpha={2 * a.lora_r}"])
    shutil.rmtree(cfg.out, ignore_errors=True)
    summary = run_grpo(cfg)
    log_rows = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log_rows if "loss" in r]
    last = steps[-1]
    shutil.rmtree(cfg.out)
    trained = last["tokens"] - (steps[-2]["tokens"] if len(steps) > 1 else 0)  # answer tokens of the last step
    return {"peak_mb": last["peak_mem_mb"], "length": last["response_length"], "params": summary["params"],
            "trainable": summary["trainable_params"], "step_s": trained / max(last["tokens_per_s"], 1e-9)}


def estimate_mb(a: argparse.Namespace, info: dict, r: dict, ref_copy: bool) -> tuple[float, float, float]:
    """(total, rollout phase, training phase) in MB from the shapes (see the module docstring)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from memory_budget import estimate_bytes

    from xiaolm.model.llama import Llama, LlamaConfig
    from xiaolm.train.config import DataConfig, TrainConfig

    shape, vocab, n, t = info["shape"], info["vocab"], r["params"], r["trainable"]
    model_cfg = LlamaConfig(vocab_size=vocab, **shape)
    rows, length = a.prompts * a.group, PROMPT_TOKENS + a.new_tokens
    kv = rows * length * model_cfg.n_layers * 2 * model_cfg.n_kv_heads * model_cfg.head_dim * 4
    rollout = kv + rows * PROMPT_TOKENS * vocab * 4
    with torch.device("meta"):
        model = Llama(model_cfg)
    cfg = TrainConfig(model=model_cfg, batch_size=a.batch_size, data=DataConfig(seq_len=length))
    parts = estimate_bytes(cfg, model, half=a.device == "cuda", device=a.device)
    training = sum(v for k, v in parts.items() if k not in ("weights", "gradients", "adamw"))
    fixed = 4 * n + (4 * n if ref_copy else 0) + 12 * t
    return (fixed + max(rollout, training)) / 2**20, rollout / 2**20, training / 2**20


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--size", choices=[*RECIPE_VOCAB, "toy"], default="100m")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (grpo.group_size)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (micro-batch)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, in the order to run them")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = parse_args(p, QUICK, "about 2 minutes on 2 CPU cores")
    if (a.prompts * a.group) % a.batch_size:
        p.error("--prompts × --group must be a multiple of --batch-size")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants: a comma-separated choice of {', '.join(VARIANTS)}")
    if a.child:
        print(json.dumps(run_variant(a)))
        return
    print_header(("torch", "peft"))
    with tempfile.TemporaryDirectory(prefix="xiaolm-grpo-memory-") as tmp:
        info = prepare(Path(tmp), a)
        print(f"init_from: {a.size} ({', '.join(f'{k} {v}' for k, v in info['shape'].items())}, vocab {info['vocab']})"
              f", {info['params'] / 1e6:.2f}M params; {a.prompts} prompts × G={a.group} samples of {a.new_tokens} new "
              f"tokens a step, micro-batch {a.batch_size}, {a.steps} steps, lora.r {a.lora_r}, device {a.device}",
              flush=True)
        table = []
        for name in variants:
            _, ref, beta = VARIANTS[name]
            r = run_json([sys.executable, __file__, "--child", name, "--work", tmp, *sum(
                ([f"--{k.replace('_', '-')}", str(getattr(a, k))] for k in ("size", "group", "new_tokens", "prompts",
                                                                            "batch_size", "steps", "lora_r", "device")),
                [])])
            total, rollout, training = estimate_mb(a, info, r, ref == "copy")
            print(f"{name}: {json.dumps(r)}; estimate {total:,.0f} MB (rollout phase {rollout:,.0f}, training phase "
                  f"{training:,.0f})", flush=True)
            table.append([name, f"{r['trainable'] / 1e6:.2f}M", "copy" if ref == "copy" else
                          ("adapter-disabled base" if beta else "none (beta 0)"), f"{r['length']:.0f}",
                          f"{total:,.0f} MB", f"{r['peak_mb']:,.0f} MB", f"{r['step_s']:.2f}"])
    what = "torch.cuda.max_memory_allocated" if a.device == "cuda" else "peak RSS (VmHWM)"
    print()
    print(markdown_table(["variant", "trainable", "reference", "mean answer tokens", "estimate from shapes",
                          f"measured: {what}", "s, last step (rollout + training)"], table))


if __name__ == "__main__":
    main()
