"""Terminal chat: multi-turn history, streaming replies, /reset and /exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from xiaolm.infer.generate import GenerationConfig, chat_reply

HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


def trim_history(tokenizer, messages: list[dict], max_tokens: int) -> list[dict]:
    """Drop the oldest user/assistant turns (keeping a system message) until the prompt fits."""
    from xiaolm.tokenizer import encode_prompt

    msgs = list(messages)
    while len(encode_prompt(tokenizer, msgs)) > max_tokens and len(msgs) > 1:
        drop = 1 if msgs[0]["role"] == "system" else 0
        if len(msgs) - drop <= 1:
            break
        del msgs[drop]
    return msgs


def run_chat(model_path: str, gen: GenerationConfig, system: str | None = None,
             input_fn: Callable[[str], str] = input, output: TextIO = sys.stdout) -> None:
    """Chat with the model at `model_path` until /exit or end of input."""
    from xiaolm.errors import XiaolmError
    from xiaolm.model.export import load_model
    from xiaolm.train.loop import resolve_device

    model, tokenizer = load_model(model_path, device=resolve_device("auto"))
    if tokenizer is None:
        raise XiaolmError("model has no tokenizer", where=model_path, hint="chat with a run dir or an exported model")
    print(f"xiaolm chat · {model.num_params() / 1e6:.1f}M parameters · {model_path}", file=output)
    print(HELP, file=output)
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    budget = model.cfg.max_seq_len - min(gen.max_new_tokens, model.cfg.max_seq_len // 2)
    while True:
        try:
            line = input_fn("你> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=output)
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = list(base)
            print("(conversation cleared)", file=output)
            continue
        if line.startswith("/"):
            print(HELP, file=output)
            continue
        history = trim_history(tokenizer, history + [{"role": "user", "content": line}], budget)
        gen_cfg = GenerationConfig(**{**gen.__dict__, "max_new_tokens": gen.max_new_tokens})
        output.write("xiaolm> ")
        reply = ""
        try:
            for piece in chat_reply(model, tokenizer, history, gen_cfg):
                reply += piece
                output.write(piece)
                output.flush()
        except KeyboardInterrupt:
            output.write(" [stopped]")
        output.write("\n")
        history.append({"role": "assistant", "content": reply})
