"""Perplexity of a model on held-out text records, overall and per source."""

from __future__ import annotations

import math

import torch
from torch import nn

from xiaolm.model.llama import document_ids
from xiaolm.tokenizer.chat import collate


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: list[str], seq_len: int = 256, batch_size: int = 8,
               doc_mask: bool = True) -> dict:
    """exp(mean next-token loss) over the texts, each followed by EOS, cut into non-overlapping windows.

    With `doc_mask` (as pretraining's `data.doc_mask`, on by default) each window numbers its documents the way
    training does, attention stays inside each document, and a document's first token is not scored: nothing of
    its own document precedes it. So each document counts as if evaluated alone, EOS after it.
    """
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
        doc_ids = None
        if doc_mask:  # numbered as pretraining's windows: an EOS ends its document
            doc_ids = document_ids(x, eos).to(device)
            y = y.masked_fill(x == eos, -100)  # the token after an EOS starts a new document
        n = int((y != -100).sum())
        if n == 0:
            continue
        _, loss = model(x.to(device), y.to(device), doc_ids=doc_ids)
        total_loss += float(loss) * n
        total_tokens += n
    mean = total_loss / max(1, total_tokens)
    return {"loss": mean, "ppl": math.exp(min(mean, 50)), "tokens": total_tokens}


def perplexity_by_source(model: nn.Module, tokenizer, records: list[dict], seq_len: int = 256, batch_size: int = 8,
                         doc_mask: bool = True) -> dict:
    """perplexity() of all the records' texts, plus `by_source`: each `source` field's texts scored on their own.

    `by_source` is empty when no record carries a source; records without one are grouped under "(none)".
    """
    result = perplexity(model, tokenizer, [r["text"] for r in records], seq_len, batch_size, doc_mask)
    groups: dict[str, list[str]] = {}
    if any("source" in r for r in records):
        for r in records:
            groups.setdefault(str(r.get("source", "(none)")), []).append(r["text"])
    result["by_source"] = {source: perplexity(model, tokenizer, texts, seq_len, batch_size, doc_mask)
                           for source, texts in groups.items()}
    return result


@torch.no_grad()
def answer_perplexity(model: nn.Module, tokenizer, items: list[dict], seq_len: int = 256,
                      batch_size: int = 8) -> dict:
    """exp(mean loss) on the assistant tokens only of `{"messages", "answer"}` items (answer as the last turn)."""
    from xiaolm.tokenizer.chat import encode_example

    chats = [{"messages": [*item["messages"], {"role": "assistant", "content": item["answer"]}]} for item in items]
    examples = [encode_example(tokenizer, chat, min(seq_len, model.cfg.max_seq_len)) for chat in chats]
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for b in range(0, len(examples), batch_size):
        batch = collate(examples[b:b + batch_size], tokenizer.pad_token_id)
        n = int((batch["y"] != -100).sum())
        _, loss = model(batch["x"].to(device), batch["y"].to(device))
        total_loss += float(loss) * n
        total_tokens += n
    mean = total_loss / max(1, total_tokens)
    return {"loss": mean, "ppl": math.exp(min(mean, 50)), "tokens": total_tokens}
