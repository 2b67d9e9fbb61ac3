"""Perplexity of a model on held-out text records."""

from __future__ import annotations

import math

import torch

from xiaolm.model.llama import Llama
from xiaolm.tokenizer.chat import collate


@torch.no_grad()
def perplexity(model: Llama, tokenizer, texts: list[str], seq_len: int = 256, batch_size: int = 8) -> dict:
    """exp(mean next-token loss) over the texts, each followed by EOS, cut into non-overlapping windows."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    seq_len = min(seq_len, model.cfg.max_seq_len)
    n_windows = max(1, (len(ids) - 1) // seq_len)
    device = next(model.parameters()).device
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for b in range(0, n_windows, batch_size):
        rows = [ids[w * seq_len: w * seq_len + seq_len + 1] for w in range(b, min(n_windows, b + batch_size))]
        batch = collate([(r, r) for r in rows], eos)  # every next token counts: labels are the ids themselves
        x, y = batch["x"], batch["y"]
        _, loss = model(x.to(device), y.to(device))
        n = int((y != -100).sum())
        total_loss += float(loss) * n
        total_tokens += n
    mean = total_loss / max(1, total_tokens)
    return {"loss": mean, "ppl": math.exp(min(mean, 50)), "tokens": total_tokens}
