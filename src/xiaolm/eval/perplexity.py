"""Perplexity of a model on held-out text records, overall and per source."""

from __future__ import annotations

import math

import torch
from torch import nn

from xiaolm.tokenizer.chat import collate


def sliding_windows(ids: list[int], seq_len: int, stride: int) -> list[tuple[list[int], int]]:
    """(window of at most seq_len + 1 ids, how many of its last next-token targets it scores) such that every
    target of `ids` is scored once: the first window scores all its targets, each later one starts `stride` ids
    further and scores the targets no earlier window reached, with up to seq_len - stride ids of context."""
    windows, done, start = [], 0, 0  # done: targets up to this position are scored
    while len(ids) > 1:
        end = min(start + seq_len + 1, len(ids))
        windows.append((ids[start:end], end - 1 - done))
        done = end - 1
        if end == len(ids):
            break
        start += stride
    return windows


@torch.no_grad()
def score_streams(model: nn.Module, streams: list[list[int]], seq_len: int, stride: int,
                  batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed next-token NLL in nats, targets scored) per token stream, by sliding windows, batched."""
    windows = [(s, w, new) for s, ids in enumerate(streams) for w, new in sliding_windows(ids, seq_len, stride)]
    windows.sort(key=lambda t: len(t[1]))  # similar lengths share a batch: little padding
    nll, count = [0.0] * len(streams), [0] * len(streams)
    device = next(model.parameters()).device
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        width = max(len(w) for _, w, _ in chunk) - 1
        x = torch.full((len(chunk), width), tokenizer_pad(model), dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (_, w, new) in enumerate(chunk):
            x[r, :len(w) - 1] = torch.tensor(w[:-1])
            y[r, len(w) - 1 - new:len(w) - 1] = torch.tensor(w[len(w) - new:])  # right padding: causal, harmless
        logps = model(x.to(device), y.to(device), output="logprobs").double().sum(-1).tolist()
        for (s, _, new), logp in zip(chunk, logps, strict=True):
            nll[s] -= logp
            count[s] += new
    return list(zip(nll, count, strict=True))


def tokenizer_pad(model: nn.Module) -> int:
    """The id that fills padding (never scored)."""
    return model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0


def _summary(nll: float, tokens: int, chars: int) -> dict:
    mean = nll / max(1, tokens)
    return {"loss": mean, "ppl": math.exp(min(mean, 50)), "tokens": tokens, "characters": chars,
            "bits_per_char": nll / math.log(2) / max(1, chars)}


def _streams(tokenizer, texts: list[str], doc_mask: bool) -> tuple[list[list[int]], list[int]]:
    """(token streams, characters each stream's scored tokens cover): one stream a document with doc_mask, else
    all the texts laid end to end; EOS ends each document. A stream's first token is never scored (nothing
    precedes it), so its characters are not counted."""
    eos = tokenizer.eos_token_id
    docs = [ids + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    if not doc_mask:
        docs, texts = [[t for d in docs for t in d]], ["".join(texts)]
    chars = [max(0, len(text) - len(tokenizer.decode(ids[:1]))) if len(ids) > 1 else 0
             for ids, text in zip(docs, texts, strict=True)]
    return docs, chars


def perplexity(model: nn.Module, tokenizer, texts: list[str], seq_len: int = 256, batch_size: int = 8,
               doc_mask: bool = True, stride: int | None = None) -> dict:
    """exp(mean next-token NLL) and bits per character over the texts, each followed by EOS.

    With `doc_mask` (as pretraining's `data.doc_mask`, on by default) each document is scored alone, as training
    with document masking sees it: attention stays inside it and its first token is not scored. Without, the
    texts are one stream and attention crosses documents. A stream longer than seq_len is scored by sliding
    windows `stride` apart (default seq_len // 2), each target once with at least seq_len - stride of context.
    Bits per character divide the NLL in bits by the characters of the scored tokens: comparable across
    tokenizers, unlike perplexity.
    """
    seq_len = min(seq_len, model.cfg.max_seq_len)
    stride = min(seq_len, stride or max(1, seq_len // 2))
    streams, chars = _streams(tokenizer, texts, doc_mask)
    was = model.training
    model.eval()
    scores = score_streams(model, streams, seq_len, stride, batch_size)
    model.train(was)
    result = _summary(sum(n for n, _ in scores), sum(c for _, c in scores), sum(chars))
    result.update(seq_len=seq_len, stride=stride, doc_mask=doc_mask)
    if doc_mask:
        result["per_text"] = [_summary(n, c, ch) for (n, c), ch in zip(scores, chars, strict=True)]
    return result


def perplexity_by_source(model: nn.Module, tokenizer, records: list[dict], seq_len: int = 256, batch_size: int = 8,
                         doc_mask: bool = True, stride: int | None = None) -> dict:
    """perplexity() of all the records' texts, plus `by_source`: each `source` field's texts scored on their own.

    `by_source` is empty when no record carries a source; records without one are grouped under "(none)". With
    doc_mask a source's figures sum its documents' scores; without, its texts form a stream of their own.
    """
    result = perplexity(model, tokenizer, [r["text"] for r in records], seq_len, batch_size, doc_mask, stride)
    per_text = result.pop("per_text", None)
    groups: dict[str, list[int]] = {}
    if any("source" in r for r in records):
        for i, r in enumerate(records):
            groups.setdefault(str(r.get("source", "(none)")), []).append(i)
    by_source = {}
    for source, members in groups.items():
        if per_text is not None:
            parts = [per_text[i] for i in members]
            by_source[source] = _summary(sum(p["loss"] * p["tokens"] for p in parts), sum(p["tokens"] for p in parts),
                                         sum(p["characters"] for p in parts))
        else:
            by_source[source] = perplexity(model, tokenizer, [records[i]["text"] for i in members], seq_len,
                                           batch_size, doc_mask, stride)
    result["by_source"] = by_source
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
