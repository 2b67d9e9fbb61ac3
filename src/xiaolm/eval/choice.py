"""Multiple choice by log-likelihood, batched, with each question's prefix run once.

Two scores per option, both reported: `text`, the log-likelihood of the option's text after the prompt divided by
its characters (lm-eval's acc_norm idea: long options are not penalized for their length; the default), and
`letter`, the probability of the option's letter as the next token after "答案：" (C-Eval's own protocol).
A batch of questions runs its prompts once, left-padded, into a KV cache; the cache rows are then repeated for
the options, which run as one batch of continuations, so no prompt token is computed twice.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from xiaolm.eval.choice_data import ChoiceItem, ceval_prompt
from xiaolm.model.registry import arch_of
from xiaolm.tokenizer import IM_END, encode_prompt

METHODS = {"text": "log-likelihood of each option's text after the prompt, summed and divided by its characters",
           "letter": "log-probability of each option's letter as the next token after the prompt (C-Eval's own)"}


def encode_items(tokenizer, items: list[ChoiceItem]) -> list[tuple[list[int], list[list[int]], list[int]]]:
    """(prompt ids, each option's text ids, each option letter's first id) per item.

    Items from C-Eval, CMMLU or with a subject use C-Eval's plain-text prompt; other JSONL items are a chat turn
    (the question alone, as the demo asks them), their option texts end with <|im_end|>, and they have no letters.
    """
    end = tokenizer.convert_tokens_to_ids(IM_END)
    encoded = []
    for item in items:
        if item.benchmark != "jsonl" or item.subject:
            prompt = tokenizer(ceval_prompt(item), add_special_tokens=False)["input_ids"]
            texts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in item.options.values()]
            letters = [tokenizer(k, add_special_tokens=False)["input_ids"][0] for k in item.options]
        else:
            prompt = encode_prompt(tokenizer, [{"role": "user", "content": item.question}])
            texts = [tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in item.options.values()]
            letters = []
        encoded.append((list(prompt), [t or [end] for t in texts], letters))
    return encoded


def _logprobs_at(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for hidden states [..., D] and targets [...]."""
    return F.log_softmax(model.lm_head(hidden).float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


@torch.inference_mode()
def score_options(model: nn.Module, encoded: list[tuple[list[int], list[list[int]], list[int]]],
                  batch_items: int = 32, share_prefix: bool = True) -> list[tuple[list[float], list[float]]]:
    """(summed log-prob of each option's tokens, log-prob of each letter id) per item; prompts cut from the left
    to fit the context. share_prefix=False runs each option as one full sequence instead (the same numbers)."""
    ctx = model.cfg.max_seq_len
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths share a batch
    results: list = [None] * len(encoded)
    for b in range(0, len(order), batch_items):
        chunk = order[b:b + batch_items]
        opt_len = min(ctx - 1, max(len(o) for i in chunk for o in encoded[i][1]))
        prompts = [encoded[i][0][-(ctx - opt_len):] for i in chunk]
        options = [[o[:opt_len] for o in encoded[i][1]] for i in chunk]
        run = _shared_prefix_batch if share_prefix else _full_sequence_batch
        if arch_of(model).encoder_decoder:
            run = _text_to_text_batch
        for i, prompt, scores in zip(chunk, prompts, run(model, prompts, options, [encoded[i][2] for i in chunk]),
                                     strict=True):
            results[i] = scores
            # the letter needs room for one token only: a prompt cut shorter to fit the option texts is scored
            # again, cut to the context alone, so the letter sees what C-Eval's protocol (and lm-eval) shows it
            whole = encoded[i][0][-(ctx - 1):]
            if encoded[i][2] and len(whole) > len(prompt):
                results[i] = (scores[0], _letter_logprobs(model, whole, encoded[i][2]))
    return results


def _next_token_logprobs(model: nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    """log p(next token) [B,V] after each prompt, right-padded into one batch (a T5: its decoder's first step)."""
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), max(map(len, prompts))), model.cfg.pad_token_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    if arch_of(model).encoder_decoder:
        logits = model.prefill(ids, lengths, model.new_kv_cache(len(prompts), 1))
    else:  # right padding: causal attention never reaches it; the output layer at each last position only
        logits = model.lm_head(model(ids, output="hidden")[torch.arange(len(prompts), device=device), lengths - 1])
    return F.log_softmax(logits.float(), dim=-1)


def _letter_logprobs(model: nn.Module, prompt: list[int], letters: list[int]) -> list[float]:
    """log p(letter) as the next token after one prompt."""
    return _next_token_logprobs(model, [prompt])[0, letters].tolist()


def _shared_prefix_batch(model: nn.Module, prompts: list[list[int]], options: list[list[list[int]]],
                         letters: list[list[int]]) -> list[tuple[list[float], list[float]]]:
    device = next(model.parameters()).device
    b, width = len(prompts), max(len(p) for p in prompts)
    opt_len = max(len(o) for opts in options for o in opts)
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    ids = torch.full((b, width), model.cfg.pad_token_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
    cols = torch.arange(width, device=device)
    valid = cols[None, :] >= pad[:, None]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = (causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)  # pads see themselves
    cache = model.new_kv_cache(b, width)
    hidden = model(ids, kv_cache=cache, attn_mask=mask[:, None], position_ids=(cols[None] - pad[:, None]).clamp(min=0),
                   output="hidden")
    last = F.log_softmax(model.lm_head(hidden[:, -1]).float(), dim=-1)  # [B, V]: the first option token, letters
    row_item = torch.tensor([i for i, opts in enumerate(options) for _ in opts], device=device)
    flat = [o for opts in options for o in opts]
    r = len(flat)
    opt = torch.full((r, opt_len), model.cfg.pad_token_id, dtype=torch.long, device=device)
    for j, o in enumerate(flat):
        opt[j, :len(o)] = torch.tensor(o, device=device)
    rows = model.new_kv_cache(r, width + opt_len)
    for layer in range(len(rows.k)):
        rows.k[layer][:, :, :width] = cache.k[layer][row_item]
        rows.v[layer][:, :, :width] = cache.v[layer][row_item]
    rows.set_length(width)
    seen = torch.ones(opt_len, opt_len, dtype=torch.bool, device=device).tril()
    opt_mask = torch.cat([valid[row_item][:, None, :].expand(r, opt_len, width),
                          seen[None].expand(r, opt_len, opt_len)], dim=-1)
    positions = (width - pad)[row_item][:, None] + torch.arange(opt_len, device=device)[None]
    logps = torch.zeros(r, opt_len, device=device)
    logps[:, 0] = last[row_item, opt[:, 0]]
    if opt_len > 1:
        h = model(opt[:, :-1], kv_cache=rows, attn_mask=opt_mask[:, None, :-1, :-1], position_ids=positions[:, :-1],
                  output="hidden")
        logps[:, 1:] = _logprobs_at(model, h, opt[:, 1:])
    return _collect(logps, [len(o) for o in flat], options, last, letters)


def _full_sequence_batch(model: nn.Module, prompts: list[list[int]], options: list[list[list[int]]],
                         letters: list[list[int]]) -> list[tuple[list[float], list[float]]]:
    device = next(model.parameters()).device
    seqs = [(i, p + o) for i, (p, opts) in enumerate(zip(prompts, options, strict=True)) for o in opts]
    width = max(len(s) for _, s in seqs)
    ids = torch.full((len(seqs), width), model.cfg.pad_token_id, dtype=torch.long, device=device)
    for j, (_, s) in enumerate(seqs):
        ids[j, :len(s)] = torch.tensor(s, device=device)  # right padding: causal attention never reaches it
    hidden = model(ids, output="hidden")
    opt_len = max(len(o) for opts in options for o in opts)
    logps = torch.zeros(len(seqs), opt_len, device=device)
    last_rows = []
    for j, (i, _) in enumerate(seqs):
        start, n = len(prompts[i]), len(seqs[j][1]) - len(prompts[i])
        logps[j, :n] = _logprobs_at(model, hidden[j, start - 1:start - 1 + n], ids[j, start:start + n])
        if not last_rows or seqs[j - 1][0] != i:
            last_rows.append(hidden[j, start - 1])
    last = F.log_softmax(model.lm_head(torch.stack(last_rows)).float(), dim=-1)
    return _collect(logps, [len(s) - len(prompts[i]) for i, s in seqs], options, last, letters)


def _text_to_text_batch(model: nn.Module, prompts: list[list[int]], options: list[list[list[int]]],
                        letters: list[list[int]]) -> list[tuple[list[float], list[float]]]:
    """An encoder-decoder model: the prompt is the source, each option a target; the letters are scored on the
    decoder's first step (the prompts are encoded once more for it: the options' forward encodes each row)."""
    device = next(model.parameters()).device
    pad = model.cfg.pad_token_id
    seqs = [(p, o) for p, opts in zip(prompts, options, strict=True) for o in opts]
    width = max(len(p) + len(o) for p, o in seqs) - 1
    x = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    y = torch.full((len(seqs), width), -100, dtype=torch.long, device=device)
    for j, (p, o) in enumerate(seqs):  # the decoder-only layout the model splits (model/t5.py)
        row = torch.tensor(p + o, device=device)
        x[j, :len(row) - 1], y[j, len(p) - 1:len(row) - 1] = row[:-1], row[len(p):]
    token_logps = model(x, y, output="logprobs").float()
    logps = torch.zeros(len(seqs), max(len(o) for _, o in seqs), device=device)
    for j, (p, o) in enumerate(seqs):
        logps[j, :len(o)] = token_logps[j, len(p) - 1:len(p) - 1 + len(o)]
    return _collect(logps, [len(o) for _, o in seqs], options, _next_token_logprobs(model, prompts), letters)


def _collect(logps: torch.Tensor, lengths: list[int], options: list[list[list[int]]], last: torch.Tensor,
             letters: list[list[int]]) -> list[tuple[list[float], list[float]]]:
    """Per item: each option's summed log-prob (its first `length` tokens) and each letter's next-token log-prob."""
    keep = torch.arange(logps.shape[1], device=logps.device)[None] < torch.tensor(lengths, device=logps.device)[:, None]
    sums = (logps * keep).sum(-1).tolist()
    out, j = [], 0
    for i, opts in enumerate(options):
        out.append((sums[j:j + len(opts)], last[i, letters[i]].tolist() if letters[i] else []))
        j += len(opts)
    return out


def choice_scores(model: nn.Module, tokenizer, items: list[ChoiceItem], method: str = "text",
                  batch_items: int = 32) -> tuple[dict, list[dict]]:
    """(accuracy overall, per subject and per category by both methods with the chance level; per-item picks)."""
    model.eval()
    scored = score_options(model, encode_items(tokenizer, items), batch_items)
    predictions = []
    for item, (sums, letter_logps) in zip(items, scored, strict=True):
        letters = list(item.options)
        per_char = [s / max(1, len(t)) for s, t in zip(sums, item.options.values(), strict=True)]
        pred = {"id": item.id, "where": item.where, "subject": item.subject, "category": item.category,
                "answer": item.answer, "text": letters[max(range(len(letters)), key=per_char.__getitem__)],
                "text_scores": [round(s, 4) for s in per_char], "chance": 1 / len(letters)}
        if letter_logps:
            pred["letter"] = letters[max(range(len(letters)), key=letter_logps.__getitem__)]
            pred["letter_logprobs"] = [round(s, 4) for s in letter_logps]
        predictions.append(pred)
    result = {"n": len(items), "shots": len(items[0].shots) if items else 0, "default_method": method,
              "methods": {m: METHODS[m] for m in METHODS if any(m in p for p in predictions)}}
    result.update(_accuracy(predictions, method))
    for key in ("subject", "category"):
        groups: dict[str, list[dict]] = defaultdict(list)
        for p in predictions:
            groups[p[key] or "(none)"].append(p)
        result[f"by_{key}"] = {name: _accuracy(group, method) for name, group in sorted(groups.items())}
    return result, predictions


def _accuracy(predictions: list[dict], method: str) -> dict:
    """n, accuracy by the default method, by each method, and the chance level (mean of 1 / options)."""
    n = len(predictions)
    out = {"n": n, "accuracy": 0.0, "chance": sum(p["chance"] for p in predictions) / max(1, n)}
    for m in METHODS:
        scored = [p for p in predictions if m in p]
        if scored:
            out[f"accuracy_{m}"] = sum(p[m] == p["answer"] for p in scored) / len(scored)
    out["accuracy"] = out.get(f"accuracy_{method}", 0.0)
    return out
