"""`xiaolm serve` under concurrent streaming clients (the official `openai` client): throughput, latency, failures.

    python benchmarks/serve.py [--quick] [--model runs/demo/model | --shape demo|26m|100m] [--clients 1,4,16,64]
                               [--seconds 20] [--rounds 3] [--max-tokens 64] [--threads 1] [--device auto|cpu|cuda]
                               [--distinct]

Starts `xiaolm serve MODEL --device DEVICE` (default limits: 16 sequences decoding together, 64 waiting; fp32 on
CPU, bf16 on CUDA) in a subprocess and sends it one short untimed request (lazy imports, first kernels), then for
each client count runs that many threads, each with its own `openai.OpenAI` client, sending streaming chat
requests (temperature 0.7, max_tokens --max-tokens, usage included) back to back for --seconds. Per level:
aggregate completion tokens/s (tokens of the requests that finished inside the window ÷ the window), time to first
token p50/p95 (request sent → first content chunk), requests done, clean 429 refusals, and failures (any other
error, including a client timeout: a hang). Levels run in rounds (the order reverses every other round), so the
16-vs-1 ratio is measured side by side; printed: median (min–max) over rounds, the CPU time per completion token
that the server's process, its engine process and the clients took (Linux /proc; tokens of unfinished requests
count in the CPU time, not in the tokens), and the end of the server's output
(its start-up line names the device), and how many prompt tokens the server found kept in a slot instead of
prefilling them (GET /health). The clients cycle through six short chat messages, so a prompt often meets one
already kept whole; `--distinct` numbers every message, so prompts share only the chat template's first tokens.
--quick: 1 round of 10 s per level (~1.5 minutes with the server's start);
full: 3 rounds of 20 s (~5 minutes), estimates on 2 idle cores.
`--shape` serves random weights of a shape instead of --model: demo = the demo's model (vocab 4096, d256, 4
layers), 26m and 100m = configs/llama-26m.yaml and llama-100m.yaml with their vocabularies (8,192 and 32,000),
written to a temporary model dir with a real tokenizer: trained on tests/fixtures/corpus_zh.jsonl (1,200 tokens,
chat template included) and padded with plain added tokens `[id]` up to the model's vocabulary, so that every
token the random model picks is text (stop tokens are ~3 in 32,000: replies run to --max-tokens). On an H200,
`--shape 100m --device cuda --rounds 1 --seconds 10 --threads 4`: about 1.2 minutes (an estimate).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

from harness import SHAPES, argument_parser, markdown_table, model_shape, parse_args, print_header, spread

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "corpus_zh.jsonl"
QUICK = {"rounds": 1, "seconds": 10}
PROMPTS = ["你好", "介绍一下你自己", "春天的天气怎么样？", "讲一个小故事", "什么是机器学习？", "推荐一本书"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_model_dir(shape: str, out: Path) -> Path:
    """A model dir for `xiaolm serve`: random weights of the shape, and the fixture corpus's tokenizer padded with
    plain added tokens up to the model's vocabulary (every id decodes to text)."""
    import torch

    from xiaolm.model.export import save_model_weights
    from xiaolm.model.llama import Llama, LlamaConfig
    from xiaolm.tokenizer import load_tokenizer, train_tokenizer

    cfg = LlamaConfig(**model_shape(shape))
    tokenizer = load_tokenizer(train_tokenizer([str(CORPUS)], out / "tokenizer", vocab_size=1200, workers=1))
    trained = len(tokenizer)
    tokenizer.add_tokens([f"[{i}]" for i in range(trained, cfg.vocab_size)])
    torch.manual_seed(0)
    model = Llama(cfg)
    save_model_weights(model, out / shape)
    tokenizer.save_pretrained(out / shape)
    print(f"model: {shape} shape, random weights, {model.num_params() / 1e6:.1f}M parameters, context "
          f"{cfg.max_seq_len}; tokenizer of {trained:,} trained tokens + {len(tokenizer) - trained:,} padding",
          flush=True)
    return out / shape


def start_server(model: str, port: int, threads: int, device: str, log: IO[str]) -> tuple[subprocess.Popen, str]:
    """`xiaolm serve` in a subprocess writing to `log`, once it answers and has served one short warm-up request
    (lazy imports, the device's first kernels); (process, model id)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "xiaolm.cli", "serve", model, "--port", str(port), "--threads",
                             str(threads), "--device", device], env=env, stdout=log, stderr=subprocess.STDOUT)
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=5)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"xiaolm serve exited: {tail(log.name)}")
        try:
            name = client.models.list().data[0].id
        except Exception:
            time.sleep(0.5)
            continue
        try:
            client.with_options(timeout=60).chat.completions.create(
                model=name, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8)
        except Exception as e:
            proc.kill()
            sys.exit(f"xiaolm serve failed its warm-up request ({e!r}): {tail(log.name)}")
        return proc, name
    proc.kill()
    sys.exit(f"xiaolm serve did not start within 120 s: {tail(log.name)}")


def tail(path: str, chars: int = 3000) -> str:
    """The end of the server's output."""
    return Path(path).read_text(encoding="utf-8", errors="replace")[-chars:]


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the server process and by its child processes (the engine),
    from /proc (Linux; empty elsewhere); the clients' from this process's own times."""
    def of(p: int | str) -> float:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        out = {"server": of(pid), "engine": sum(of(c) for c in children)}
    except (OSError, ValueError, IndexError):
        return {}
    t = os.times()
    return {**out, "clients": t.user + t.system}


def level(url: str, name: str, clients: int, seconds: float, max_tokens: int, distinct: bool = False,
          server_pid: int | None = None) -> dict:
    """Run `clients` streaming clients for `seconds`; their statistics. `distinct`: every message is new (numbered),
    so prompts share only the chat template's first tokens. With `server_pid`, the CPU time each process took."""
    import openai

    cpu_before = cpu_seconds(server_pid) if server_pid else {}
    stop_at = time.perf_counter() + seconds
    lock = threading.Lock()
    stats = {"tokens": 0, "done": 0, "refused": 0, "failed": 0, "ttft": [], "errors": []}

    def client_loop(i: int) -> None:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        n = 0
        while time.perf_counter() < stop_at:
            n += 1
            start, first, usage = time.perf_counter(), None, None
            try:
                message = PROMPTS[(i + n) % len(PROMPTS)]
                stream = client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": f"{i}.{n}：{message}" if distinct else message}],
                    max_tokens=max_tokens, temperature=0.7, stream=True, stream_options={"include_usage": True})
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - start
                    usage = chunk.usage or usage
                finished = time.perf_counter() <= stop_at
                with lock:
                    if finished:
                        stats["tokens"] += usage.completion_tokens if usage else 0
                        stats["done"] += 1
                    if first is not None:
                        stats["ttft"].append(first)
            except openai.RateLimitError:
                with lock:
                    stats["refused"] += 1
                time.sleep(0.5)
            except Exception as e:  # a timeout (hang) or a broken stream
                with lock:
                    stats["failed"] += 1
                    stats["errors"].append(repr(e)[:200])

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["tokens_per_s"] = stats["tokens"] / seconds
    cpu_after = cpu_seconds(server_pid) if cpu_before else {}
    stats["cpu"] = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
    return stats


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else (values or [float("nan")])[0]


def cpu_per_token(s: dict) -> str:
    """CPU ms per completion token of each process over a level, e.g. "server 0.31, engine 1.92, clients 0.40"."""
    return ", ".join(f"{k} {v * 1000 / max(s['tokens'], 1):.2f}" for k, v in s["cpu"].items())


def run_levels(url: str, name: str, results: dict[int, list[dict]], a, server_pid: int) -> None:
    """--rounds rounds over the client counts (the order reverses every other round), each level's stats added."""
    levels = list(results)
    for r in range(a.rounds):
        for c in levels if r % 2 == 0 else levels[::-1]:
            s = level(url, name, c, a.seconds, a.max_tokens, a.distinct, server_pid)
            results[c].append(s)
            print(f"round {r + 1}, {c} clients: {s['tokens_per_s']:,.0f} tok/s, {s['done']} done, "
                  f"{s['refused']} refused (429), {s['failed']} failed {s['errors'][:2]}; CPU ms per token: "
                  f"{cpu_per_token(s) or 'not measured'}", flush=True)


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--model", default="runs/demo/model", help="an exported model dir or run dir")
    p.add_argument("--shape", choices=SHAPES, help="serve random weights of this shape instead of --model")
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="the server's device")
    p.add_argument("--distinct", action="store_true", help="number every message, so no two prompts are alike")
    a = parse_args(p, QUICK, "~1.5 minutes")
    print_header(packages=("torch", "transformers", "fastapi", "uvicorn", "openai"), threads=f"server: {a.threads} "
                 f"torch thread(s), device {a.device}; clients in this process")
    levels = [int(c) for c in a.clients.split(",")]
    results: dict[int, list[dict]] = {c: [] for c in levels}
    with tempfile.TemporaryDirectory(prefix="xiaolm-serve-bench-") as tmp:
        model = str(random_model_dir(a.shape, Path(tmp))) if a.shape else a.model
        port = free_port()
        with open(Path(tmp) / "server.log", "w", encoding="utf-8") as log:
            proc, name = start_server(model, port, a.threads, a.device, log)
            try:
                run_levels(f"http://127.0.0.1:{port}/v1", name, results, a, proc.pid)
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
                    health = json.load(r)
                kept, done = health["prompt_tokens_reused"], health["prompt_tokens_prefilled"]
                print(f"prompt tokens found kept in a slot (prefix reuse): {kept:,} of {kept + done:,} "
                      f"({kept / max(kept + done, 1):.0%})")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            print(f"the server's output (its end):\n{tail(log.name).rstrip()}")
    base = [s["tokens_per_s"] for s in results[levels[0]]]
    rows = []
    for c in levels:
        runs = results[c]
        ttft = [t for s in runs for t in s["ttft"]]
        ratio = [s["tokens_per_s"] / b for s, b in zip(runs, base, strict=True) if b > 0]
        cpu = [statistics.median(s["cpu"][k] * 1000 / max(s["tokens"], 1) for s in runs) for k in runs[0]["cpu"]]
        rows.append([str(c), spread([s["tokens_per_s"] for s in runs]), spread(ratio, "{:.2f}x") if ratio else "-",
                     " / ".join(f"{v:.2f}" for v in cpu) or "-",
                     f"{quantile(ttft, 0.5) * 1000:,.0f}", f"{quantile(ttft, 0.95) * 1000:,.0f}",
                     str(sum(s["done"] for s in runs)), str(sum(s["refused"] for s in runs)),
                     str(sum(s["failed"] for s in runs))])
    print()
    print(markdown_table(["clients", "aggregate tok/s", f"vs {levels[0]} client(s)",
                          "CPU ms per token: server / engine / clients (median)", "TTFT p50 ms", "TTFT p95 ms",
                          "requests done", "429s", "failures"], rows))


if __name__ == "__main__":
    main()
