"""Terminal chat: multi-turn history, streaming replies, /reset and /exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, TextIO

from xiaolm.infer.generate import Engine, GenerationConfig, chat_reply

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HELP = "commands: /reset clears the conversation, /exit or /quit (or Ctrl-D) quits, Ctrl-C stops a reply"


def trim_history(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_tokens: int) -> list[dict]:
    """Drop the oldest exchanges (keeping a system message and the last message) until the prompt fits."""
    from xiaolm.tokenizer import encode_prompt

    msgs = list(messages)
    first = 1 if msgs and msgs[0]["role"] == "system" else 0
    while len(msgs) - first > 1 and len(encode_prompt(tokenizer, msgs)) > max_tokens:
        del msgs[first]
        # drop the answer with its question, so the history never starts with an assistant turn
        while len(msgs) - first > 1 and msgs[first]["role"] == "assistant":
            del msgs[first]
    return msgs


def run_chat(model_path: str, gen: GenerationConfig, system: str | None = None,
             input_fn: Callable[[str], str] = input, output: TextIO = sys.stdout) -> None:
    """Chat with the model at `model_path` until /exit, /quit or end of input."""
    from xiaolm.device import resolve_device
    from xiaolm.errors import XiaolmError
    from xiaolm.model.export import load_model
    from xiaolm.tokenizer import encode_prompt

    model, tokenizer = load_model(model_path, device=resolve_device("auto"))
    if tokenizer is None:
        raise XiaolmError("model has no tokenizer", where=model_path,
                          hint="chat with a training run dir or an exported model dir")
    ctx = model.cfg.max_seq_len
    # the reply gets at most half the context, so a long max_new_tokens cannot squeeze out the question
    gen = replace(gen, max_new_tokens=max(1, min(gen.max_new_tokens, ctx // 2)))
    prompt_budget = ctx - gen.max_new_tokens
    print(f"xiaolm chat · {model.num_params() / 1e6:.2f}M parameters · {ctx}-token context · {model_path}",
          file=output)
    print(HELP, file=output)
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    # one engine for the whole conversation: each turn prefills only what was said since the last one
    engine = Engine(model, 1, tokenizer=tokenizer if gen.stop_strings else None)
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
        history = trim_history(tokenizer, history + [{"role": "user", "content": line}], prompt_budget)
        if len(encode_prompt(tokenizer, history)) > prompt_budget:
            print(f"(message longer than the {prompt_budget}-token prompt budget: its start is ignored)",
                  file=output)
        output.write("xiaolm> ")
        output.flush()
        reply = ""
        try:
            for piece in chat_reply(model, tokenizer, history, gen, engine):
                reply += piece
                output.write(piece)
                output.flush()
        except KeyboardInterrupt:
            output.write(" [stopped]")
        output.write("\n")
        output.flush()
        history.append({"role": "assistant", "content": reply})
