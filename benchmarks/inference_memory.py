"""Resident memory while generating: the 100M recipe model in xiaolm (PyTorch, CPU) and in llama.cpp (GGUF).

    python benchmarks/inference_memory.py [--quick] [--tokens 128] [--threads 2] [--runtimes torch-fp16,gguf-f16]

The model: configs/llama-100m.yaml's shape (dim 768, 12 layers, 12 heads, 4 KV heads, context 1024, tied
embeddings) with its 32,000-token vocabulary and random weights, exported once with `xiaolm export` as an fp16 HF
dir and as GGUF f16 and q8_0 files. The tokenizer is a character-level one (cjk_chars, what GGUF export accepts)
trained on tests/fixtures/corpus_zh.jsonl; it has fewer than 32,000 tokens, so the GGUF vocabulary is padded with
unused ids (the weights are the recipe's size). Each runtime runs in a fresh subprocess: it loads the model, then
generates --tokens tokens greedily after a 20-token ChatML prompt (no early stop). Printed per runtime: VmRSS after
the imports, VmHWM (peak resident set) over loading, VmRSS once loaded, and VmHWM over the generation alone (reset
by /proc/self/clear_refs after loading); the generation's tokens per second on this (shared) machine.
  torch-fp32/bf16/fp16  xiaolm's generate() (the KV cache of `xiaolm chat`), the model loaded by load_model in that
                        dtype: load_model builds the model in fp32 and then casts, so its loading peak holds both
  gguf-f16/q8_0         llama-cpp-python, n_ctx 256 (llama.cpp's minimum), mmap on (file pages count as resident
                        once read), n_threads --threads
Default: every runtime, 9 minutes on a loaded 2-core machine; --quick: torch-fp16 and gguf-f16 with 32 tokens,
2 minutes there (measured once each).
Needs llama-cpp-python for the gguf runtimes (`pip install 'xiaolm[llama-cpp]'`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from harness import argument_parser, markdown_table, parse_args, print_header, proc_status_mb, run_json

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "fixtures" / "corpus_zh.jsonl"
SHAPE = dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=1024, tie_embeddings=True)
RUNTIMES = ("torch-fp32", "torch-bf16", "torch-fp16", "gguf-f16", "gguf-q8_0")
QUICK = {"tokens": 32, "runtimes": "torch-fp16,gguf-f16"}
PROMPT = [{"role": "user", "content": "请介绍一下长城的历史。"}]


def build(work: Path) -> None:
    """The recipe model (random weights) and a character-level tokenizer, exported as HF fp16 and GGUF f16/q8_0."""
    import torch

    from xiaolm.chat_format import load_tokenizer, render_chat
    from xiaolm.model.export import export_hf, save_model_weights
    from xiaolm.model.gguf import export_gguf
    from xiaolm.model.llama import Llama, LlamaConfig
    from xiaolm.tokenizer import train_tokenizer

    torch.manual_seed(0)
    run = work / "run"
    train_tokenizer([str(CORPUS)], run / "tokenizer", vocab_size=2000, cjk_chars=True)
    model = Llama(LlamaConfig(**SHAPE))
    print(f"model: {model.num_params() / 1e6:.1f}M parameters", file=sys.stderr)
    save_model_weights(model, run / "checkpoints" / "step-1")
    (run / "latest").write_text("step-1\n")
    export_hf(run, work / "hf-fp16", dtype="fp16")
    for dtype in ("f16", "q8_0"):
        export_gguf(run, work / f"model-{dtype}.gguf", dtype=dtype)
    prompt = load_tokenizer(run / "tokenizer").encode(render_chat(PROMPT, True), add_special_tokens=False)
    (work / "prompt.json").write_text(json.dumps(prompt))  # llama.cpp's process then imports no transformers


def measure(runtime: str, work: Path, tokens: int, threads: int) -> dict:
    """One runtime in this (fresh) process: memory figures in MB and tokens per second."""
    prompt = json.loads((work / "prompt.json").read_text())
    if runtime.startswith("torch"):
        import torch

        from xiaolm.infer.generate import GenerationConfig, generate
        from xiaolm.model.export import load_model

        torch.set_num_threads(threads)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[runtime.split("-")[1]]
        start = proc_status_mb("VmRSS")
        model, _ = load_model(work / "hf-fp16", dtype=dtype, with_tokenizer=False)

        def run() -> int:
            return len(generate(model, prompt, GenerationConfig(max_new_tokens=tokens, temperature=0.0)))
    else:
        import llama_cpp

        start = proc_status_mb("VmRSS")
        llm = llama_cpp.Llama(model_path=str(work / f"model-{runtime.split('-')[1]}.gguf"), n_ctx=256,
                              n_threads=threads, verbose=False)

        def run() -> int:
            out = []
            for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
                out.append(t)
                if len(out) == tokens:
                    return len(out)
            return len(out)
    load_peak, loaded = proc_status_mb("VmHWM"), proc_status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # VmHWM restarts from the current resident set
    t0 = time.perf_counter()
    n = run()
    seconds = time.perf_counter() - t0
    return {"runtime": runtime, "imports_mb": start, "load_peak_mb": load_peak, "loaded_mb": loaded,
            "generate_peak_mb": proc_status_mb("VmHWM"), "tokens": n, "tokens_per_s": n / seconds}


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per runtime")
    parser.add_argument("--threads", type=int, default=2, help="torch threads / llama.cpp threads")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated, of " + ", ".join(RUNTIMES))
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child's runtime
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parse_args(parser, QUICK, "about 2 minutes")
    if args.measure:  # the child: one runtime, one JSON line
        print(json.dumps(measure(args.measure, Path(args.work), args.tokens, args.threads)))
        return
    print_header(("torch", "transformers", "gguf", "llama-cpp-python"), threads=f"{args.threads} threads")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build(work)
        sizes = {p.name: p.stat().st_size / 1e6 for p in [work / "hf-fp16" / "model.safetensors",
                                                          *work.glob("model-*.gguf")]}
        for runtime in args.runtimes.split(","):
            r = run_json([sys.executable, __file__, "--measure", runtime, "--work", str(work),
                          "--tokens", str(args.tokens), "--threads", str(args.threads)])
            print(json.dumps(r), file=sys.stderr)
            rows.append([r["runtime"], f"{r['imports_mb']:,.0f}", f"{r['load_peak_mb']:,.0f}", f"{r['loaded_mb']:,.0f}",
                         f"{r['generate_peak_mb']:,.0f}", f"{r['tokens_per_s']:.1f}"])
    print("files (MB): " + ", ".join(f"{k} {v:,.0f}" for k, v in sizes.items()))
    print(markdown_table(["runtime", "RSS after imports (MB)", "peak while loading (MB)", "RSS loaded (MB)",
                          f"peak while generating {args.tokens} tokens (MB)", "tokens/s"], rows))


if __name__ == "__main__":
    main()
