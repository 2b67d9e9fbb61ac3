"""DPO with LoRA vs full DPO, and the reference as a frozen copy, the adapter-free base or precomputed log-probs:
peak memory and step time of `xiaolm dpo`, same machine, same run.

    python benchmarks/dpo_memory.py [--size 26m|100m|toy] [--rounds 3] [--steps 6] [--batch-size 8] [--lora-r 16]
                                    [--device cpu|cuda]

Variants: full+copy (a full run's default), full+precompute, lora+adapter (the default with lora.r > 0) and
lora+precompute (LoRA on the architecture's default projections). Each run is a real `run_dpo` (configs/dpo.yaml,
the one training loop) from the same init_from model: --size 26m is configs/llama-26m.yaml's shape with its
vocabulary of 8,192 (26.7M parameters); 100m, configs/llama-100m.yaml's with its 32,000 (100.1M: d768, 12 layers,
12 heads, 4 KV heads), the size to measure on a GPU; toy, a d64 2-layer model, checks the script. The tokenizer
(1,200 tokens) is trained on tests/fixtures/corpus_zh.jsonl and the pairs are spans of that corpus: prompts of 40
tokens, answers of 30–60; batch_size × steps training pairs (one epoch: precompute makes one reference forward
per training pair) and batch_size validation pairs, the same for every variant. fp32 on CPU, bf16 autocast on
CUDA; torch.compile off (every batch has its own width). Every run is a fresh subprocess that first makes a 1-step
run of its variant on a tiny model (imports, TensorBoard, the fused optimizer's first step); the variants alternate
over --rounds rounds.
Timing run (--steps steps): the step time from log.jsonl (tokens / tokens_per_s, logged every step; the first
step left out), the set-up time between run_dpo's "training pairs" and "reference =" log lines (loading init_from,
adding adapters, building the reference: the copy or the precompute pass), and the peak RSS as a user's process
sees it. glibc keeps freed large blocks resident, so that peak says more about the allocator than the variant; on
CPU a memory run (2 steps: from the second on AdamW's moments exist) therefore sets MALLOC_MMAP_THRESHOLD_ so
blocks over 128 KiB go back to the OS when freed (slower steps, not timed): its peak above the memory right
before run_dpo is the variant's training memory. Peaks: VmHWM, reset after the warm-up run (/proc/self/clear_refs;
ru_maxrss cannot be reset and keeps a parent's peak across fork + exec); on CUDA max_memory_allocated (reset
likewise; no memory run). Both are read from the last step's log row, before the final evaluation and checkpoint.
Printed per variant: median (min–max) over rounds, and the median (min–max) of the per-round ratios against
full+copy. The estimate is arithmetic, not measured: trainable parameters × 16 bytes (fp32 weights, gradients,
AdamW's moments) + frozen × 4 + the reference copy (parameters × 4); no activations.
Time, measured once with 1 torch thread on a loaded 2-core machine: --size toy --rounds 1, 1 minute; --quick
(--size 26m --rounds 1 --steps 4), 4.5 minutes. The defaults: about 16 minutes (an estimate, not measured).
--size 100m --device cuda --rounds 1 on an H200: about 1 minute, 4 runs of ~12 s, mostly start-up (an estimate).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from harness import (
    RECIPE_VOCAB,
    argument_parser,
    load_average,
    markdown_table,
    parse_args,
    print_header,
    recipe_shape,
    run_json,
    spread,
)

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "fixtures" / "corpus_zh.jsonl"
VARIANTS = {"full+copy": (False, "copy"), "full+precompute": (False, "precompute"),
            "lora+adapter": (True, "adapter"), "lora+precompute": (True, "precompute")}
BASELINE = "full+copy"
PROMPT_TOKENS, ANSWER_TOKENS = 40, (30, 60)
TOY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)
WARMUP = dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=256)
QUICK = {"rounds": 1, "steps": 4}
MEMORY_STEPS, MMAP_THRESHOLD = 2, 128 * 1024


def corpus_spans(tokenizer, rng: random.Random):
    """span(tokens): a random span of the fixture corpus cut to that many tokens, as text."""
    text = "".join(json.loads(line)["text"].replace("\n", "") for line in CORPUS.open(encoding="utf-8"))

    def span(tokens: int) -> str:
        start = rng.randrange(len(text) - 4 * tokens)
        ids = tokenizer.encode(text[start:start + 4 * tokens], add_special_tokens=False)[:tokens]
        return tokenizer.decode(ids).replace("\ufffd", "")

    return span


def make_pairs(tokenizer, n: int, rng: random.Random) -> list[dict]:
    """Preference records whose prompt and answers are spans of the fixture corpus, cut to token counts."""
    span = corpus_spans(tokenizer, rng)
    return [{"prompt": span(PROMPT_TOKENS), "chosen": span(rng.randint(*ANSWER_TOKENS)),
             "rejected": span(rng.randint(*ANSWER_TOKENS))} for _ in range(n)]


def write_records(path: Path, records: list[dict]) -> None:
    """Records as JSON lines."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def init_shape(size: str, tokenizer) -> tuple[dict, int]:
    """(model shape, vocabulary) of init_from: a recipe's (its vocabulary), or the toy one (the tokenizer's)."""
    if size in RECIPE_VOCAB:
        shape = recipe_shape(size)
        return shape, shape.pop("vocab_size")
    return dict(TOY), len(tokenizer)


def prepare(work: Path, a: argparse.Namespace) -> dict:
    """Tokenizer, training and validation pairs, and the init_from models (the measured one, the warm-up one)."""
    from xiaolm.model.export import save_model_weights
    from xiaolm.model.llama import Llama, LlamaConfig
    from xiaolm.tokenizer import load_tokenizer, train_tokenizer
    from xiaolm.tokenizer.chat import encode_pair

    tok_dir = train_tokenizer([str(CORPUS)], work / "tokenizer", vocab_size=1200, workers=1)
    tokenizer = load_tokenizer(tok_dir)
    rng = random.Random(0)
    pairs = make_pairs(tokenizer, a.batch_size * a.steps, rng)
    for name, records in (("train", pairs), ("val", make_pairs(tokenizer, a.batch_size, rng))):
        write_records(work / f"{name}.jsonl", records)
    shape, vocab = init_shape(a.size, tokenizer)
    params = {}
    for name, (dims, size) in {"base": (shape, vocab), "warmup": (WARMUP, len(tokenizer))}.items():
        torch.manual_seed(0)
        model = Llama(LlamaConfig(vocab_size=size, **dims))
        params[name] = model.num_params()
        save_model_weights(model, work / name)
        for f in Path(tok_dir).iterdir():
            shutil.copy2(f, work / name / f.name)
    rows = [len(ids) for pair in pairs for ids, _ in encode_pair(tokenizer, pair, 256)]
    return {"params": params["base"], "vocab": vocab, "shape": shape, "rows": rows}


class LogLines(logging.Handler):
    """Keeps (time, message) of every log record."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.created, record.getMessage()))

    def time_of(self, part: str) -> float:
        """When the first message holding `part` was logged."""
        return next(t for t, msg in self.lines if part in msg)


def current_memory_mb(device: torch.device) -> float:
    """Memory in use now: this process's VmRSS, or CUDA's allocated tensors."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak afresh: CUDA's peak statistics, or the process's VmHWM (Linux /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")


def run_variant(a: argparse.Namespace) -> dict:
    """In a fresh process: a 1-step warm-up run of the variant on the tiny model, then the measured run."""
    from xiaolm.config import load_config
    from xiaolm.device import resolve_device
    from xiaolm.train.config import TrainConfig
    from xiaolm.train.dpo import run_dpo

    work, device = Path(a.work), resolve_device(a.device)
    lora, ref = VARIANTS[a.child]
    lines = LogLines()
    logging.getLogger("xiaolm").addHandler(lines)
    logging.getLogger("xiaolm").setLevel(logging.INFO)

    def config(name: str, init_from: str, steps: int, batch: int) -> TrainConfig:
        out = work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        return load_config(TrainConfig, REPO / "configs" / "dpo.yaml", [
            f"out={out}", f"init_from={work / init_from}", f"data.path={work / 'train.jsonl'}",
            f"data.val_path={work / 'val.jsonl'}", f"max_steps={steps}", f"batch_size={batch}", "log_every=1",
            f"eval_every={steps}", f"save_every={steps}", "eval_batches=1", f"device={device}", "compile=false",
            f"dtype={'bf16' if device.type == 'cuda' else 'fp32'}", f"dpo.ref={ref}",
            f"lora.r={a.lora_r if lora else 0}", f"lora.alpha={2 * a.lora_r}"])

    run_dpo(config(f"warmup-{a.child}", "warmup", 1, 1))
    gc.collect()
    reset_peak_memory(device)
    lines.lines.clear()
    cfg = config(a.child, "base", a.steps, a.batch_size)
    start_mb = current_memory_mb(device)
    summary = run_dpo(cfg)
    rows = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    tokens = [0] + [r["tokens"] for r in rows]
    step_s = [(tokens[i + 1] - tokens[i]) / r["tokens_per_s"] for i, r in enumerate(rows)]
    used = next(msg for _, msg in lines.lines if msg.startswith("dpo: reference = ")).rsplit(" ", 1)[1]
    shutil.rmtree(work / "runs")
    return {"step_s": step_s, "peak_mb": rows[-1]["peak_mem_mb"], "start_mb": start_mb,
            "setup_s": lines.time_of("dpo: reference = ") - lines.time_of(" training pairs, "),
            "ref": used, "params": summary["params"], "trainable": summary["trainable_params"]}


def estimate_mb(r: dict) -> float:
    """Weights, gradients and AdamW moments of what trains, frozen weights, and the reference copy (fp32)."""
    copy = 4 * r["params"] if r["ref"] == "copy" else 0
    return (16 * r["trainable"] + 4 * (r["params"] - r["trainable"]) + copy) / 2**20


def ratio_spread(ours: list[float], base: list[float]) -> str:
    """Median of the per-round ratios with their min–max, e.g. '0.62x (0.60–0.65x)'."""
    r = [o / b for o, b in zip(ours, base, strict=True)]
    return f"{statistics.median(r):.2f}x ({min(r):.2f}–{max(r):.2f}x)"


def child_run(a: argparse.Namespace, work: str, name: str, steps: int, env: list[str]) -> dict:
    """One run of a variant in a fresh subprocess (`env NAME=VALUE` in front when given)."""
    r = run_json([*env, sys.executable, __file__, "--child", name, "--work", work, "--size", a.size, "--steps",
                  str(steps), "--batch-size", str(a.batch_size), "--lora-r", str(a.lora_r), "--device", a.device])
    if r["ref"] != VARIANTS[name][1]:
        sys.exit(f"{name}: the run used dpo.ref={r['ref']}, not {VARIANTS[name][1]}")
    return r


def main() -> None:
    """Prepare once, run the variants alternately over the rounds, print every run, then a Markdown table."""
    p = argument_parser(__doc__)
    p.add_argument("--size", choices=[*RECIPE_VOCAB, "toy"], default="26m", help="model shape of init_from")
    p.add_argument("--rounds", type=int, default=3, help="rounds of one run per variant, variants alternating")
    p.add_argument("--steps", type=int, default=6, help="training steps per timing run (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step (2 rows each)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the lora variants (alpha 2r)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: bf16 autocast, CUDA's allocated memory, no memory runs")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = parse_args(p, QUICK, "about 4.5 minutes at --size 26m")
    if a.steps < 2:
        p.error("--steps must be at least 2: the first step is not timed")
    if a.child:
        print(json.dumps(run_variant(a)))
        return
    print_header(("torch", "peft"))
    cuda = a.device == "cuda"
    peak, grown = (("CUDA max_memory_allocated", "of it above the start") if cuda else
                   ("peak RSS, timing run", f"memory run: peak RSS above the start, blocks ≥ {MMAP_THRESHOLD >> 10} "
                                            "KiB returned to the OS"))
    with tempfile.TemporaryDirectory(prefix="xiaolm-dpo-memory-") as tmp:
        info = prepare(Path(tmp), a)
        print(f"init_from: {a.size} ({', '.join(f'{k} {v}' for k, v in info['shape'].items())}, vocab "
              f"{info['vocab']}), {info['params'] / 1e6:.2f}M params; {a.batch_size * a.steps} training pairs, "
              f"rows of {spread(info['rows'])} tokens (median, min–max); batch {a.batch_size} pairs, {a.steps} "
              f"steps, lora.r {a.lora_r}, device {a.device}")
        runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        for rnd in range(a.rounds):
            for name in VARIANTS:
                r = child_run(a, tmp, name, a.steps, [])
                mem = r if cuda else child_run(a, tmp, name, MEMORY_STEPS,
                                               ["env", f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"])
                r["step"], r["grown"] = statistics.median(r["step_s"][1:]), mem["peak_mb"] - mem["start_mb"]
                runs[name].append(r)
                print(f"round {rnd + 1} {name:16s} step {r['step']:.3f} s (all: "
                      f"{', '.join(f'{s:.3f}' for s in r['step_s'])}), set-up {r['setup_s']:.2f} s, "
                      f"peak {r['peak_mb']:,.0f} MB, {'of it' if cuda else 'memory run:'} {r['grown']:,.0f} MB "
                      "above the start", flush=True)
    base = runs[BASELINE]
    table = []
    for name, rs in runs.items():
        table.append([name, f"{rs[0]['trainable'] / 1e6:.2f}M of {rs[0]['params'] / 1e6:.2f}M",
                      f"{estimate_mb(rs[0]):,.0f} MB", spread([r["step"] for r in rs], "{:.3f}"),
                      ratio_spread([r["step"] for r in rs], [r["step"] for r in base]),
                      spread([r["setup_s"] for r in rs], "{:.2f}"), f"{spread([r['peak_mb'] for r in rs])} MB",
                      f"{spread([r['grown'] for r in rs])} MB",
                      ratio_spread([r["grown"] for r in rs], [r["grown"] for r in base])])
    print(f"load {load_average()} at the end\n")
    print(markdown_table(["variant", "trainable params", "estimate: weights + grads + AdamW + ref copy",
                          f"step s, median (min–max of {a.rounds} rounds)", "step time vs full+copy",
                          "set-up s (load, adapters, reference)", peak, grown, "that vs full+copy"], table))


if __name__ == "__main__":
    main()
