"""`xiaolm serve`: its arguments and what it runs (kept apart from server.py so `xiaolm --help` stays fast)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, where to listen, the API key and the limits."""
    p.add_argument("model", metavar="MODEL", help="a run dir or an exported model dir (with its tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 request")
    p.add_argument("--name", default=None, help="model id clients send (default: the model folder's name)")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|mps")
    p.add_argument("--max-running", type=int, help="sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=int, help="sequences waiting for a slot; beyond them: 429 (default 64)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 1000000)")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt (default: the context minus one)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is often fastest for "
                                               "small models on a busy machine)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")


def run_serve(args: argparse.Namespace) -> None:
    """Load the model and serve it until interrupted."""
    from pathlib import Path

    import torch
    import uvicorn

    from xiaolm.device import resolve_device
    from xiaolm.errors import XiaolmError
    from xiaolm.infer.server import Limits, create_app
    from xiaolm.model.export import load_model

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # fp32 on CPU; half precision on a GPU (bf16 where supported)
    dtype = torch.float32 if device.type == "cpu" else (
        torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16)
    model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    if tokenizer is None:
        raise XiaolmError("model has no tokenizer", where=args.model, hint="serve a run dir or an exported model dir")
    given = {k: getattr(args, k) for k in ("max_body_bytes", "max_prompt_tokens", "max_running", "max_queue")}
    limits = Limits(**{k: v for k, v in given.items() if v is not None})
    name = args.name or Path(args.model).resolve().name
    app = create_app(model, tokenizer, name, api_key=args.api_key, limits=limits, compile=args.compile)
    print(f"xiaolm serve · {name} · {model.num_params() / 1e6:.2f}M parameters on {device} · "
          f"http://{args.host}:{args.port}/v1 (web page at /)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
