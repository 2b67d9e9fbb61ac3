"""Decoding with a KV cache: greedy or sampled (temperature, top-k, top-p, repetition penalty), streaming.

The prompt is run once (prefill), then each step feeds only the newest token: its keys/values join the cache,
so a step costs one token's worth of compute instead of the whole sequence's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from xiaolm.errors import XiaolmError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class GenerationConfig:
    """How to pick each next token and when to stop; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in prompt or reply
    stop_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None  # fixes sampling; None draws from torch's global RNG


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's rule on seen tokens (bool mask [B,V] or ids [B,S]): positive logits ÷ penalty, negative × it."""
    if penalty == 1.0:
        return logits
    if seen.dtype != torch.bool:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, seen, True)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top_k, then outside the nucleus of probability mass top_p."""
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # keep a token while the mass ranked above it is short of top_p (HF's rule); always keep the best
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def pick_next(logits: torch.Tensor, cfg: GenerationConfig,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from float logits [B,V] (repetition penalty already applied)."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _fit_prompt(model: nn.Module, input_ids: Sequence[int], max_new_tokens: int) -> tuple[list[int], int]:
    """(prompt cut from the left so prompt + reply fit the context, reply budget)."""
    ctx = model.cfg.max_seq_len
    budget = min(max_new_tokens, ctx - 1)  # at least one prompt token must fit
    prompt = list(input_ids) or [model.cfg.eos_token_id]  # EOS separates documents: a neutral start
    if budget > 0 and len(prompt) > ctx - budget:
        prompt = prompt[len(prompt) - (ctx - budget):]
    if max(prompt) >= model.cfg.vocab_size or min(prompt) < 0:
        raise XiaolmError(f"prompt has token id {max(prompt)} outside the model's vocabulary "
                          f"({model.cfg.vocab_size})", hint="use the tokenizer the model was trained with")
    return prompt, budget


def _generator(cfg: GenerationConfig, device: torch.device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None


# A stop id ends generation without being yielded. With a tokenizer, a stop string also ends it, just after
# the token that completes it: stream_text then cuts the text at the stop string.
@torch.inference_mode()
def generate_stream(model: nn.Module, input_ids: Sequence[int], cfg: GenerationConfig,
                    tokenizer: PreTrainedTokenizerBase | None = None) -> Iterator[int]:
    """Yield new token ids one at a time until a stop id or string, max_new_tokens or the context's end."""
    prompt, budget = _fit_prompt(model, input_ids, cfg.max_new_tokens)
    if budget <= 0:
        return
    device = next(model.parameters()).device
    generator = _generator(cfg, device)
    stops = set(cfg.stop_ids)
    watch = tokenizer is not None and bool(cfg.stop_strings)
    cache = model.new_kv_cache(1, len(prompt) + budget)
    seen = torch.zeros(1, model.cfg.vocab_size, dtype=torch.bool, device=device)
    ids = torch.tensor([prompt], device=device)
    seen[0, ids[0]] = True
    logits = model(ids, kv_cache=cache)[0][:, -1]
    new: list[int] = []
    for step in range(budget):
        logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
        nxt = pick_next(logits, cfg, generator)
        token = int(nxt[0])
        if token in stops:
            return
        yield token
        new.append(token)
        if watch and any(s in tokenizer.decode(new, skip_special_tokens=True) for s in cfg.stop_strings):
            return
        if step == budget - 1:
            return  # the last token needs no forward pass
        seen[0, token] = True
        logits = model(nxt[:, None], kv_cache=cache)[0][:, -1]


def generate(model: nn.Module, input_ids: Sequence[int], cfg: GenerationConfig,
             tokenizer: PreTrainedTokenizerBase | None = None) -> list[int]:
    """All new token ids (a stop id excluded)."""
    return list(generate_stream(model, input_ids, cfg, tokenizer))


# Each row gets its own positions (0 at its first real token) and a mask hiding its padding, so a row's
# tokens match generate() on it alone, up to float rounding in the larger matmuls.
@torch.inference_mode()
def generate_batch(model: nn.Module, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> list[list[int]]:
    """New token ids for many prompts in one left-padded batch; each row stops at its own stop id."""
    if not prompts:
        return []
    fitted = [_fit_prompt(model, p, cfg.max_new_tokens) for p in prompts]
    budget = fitted[0][1]
    if budget <= 0:
        return [[] for _ in prompts]
    rows = [p for p, _ in fitted]
    device = next(model.parameters()).device
    b, width = len(rows), max(len(p) for p in rows)
    pad = torch.tensor([width - len(p) for p in rows], device=device)
    ids = torch.full((b, width), model.cfg.pad_token_id, dtype=torch.long, device=device)
    for i, p in enumerate(rows):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
    cols = torch.arange(width + budget, device=device)
    valid = cols[None, :] >= pad[:, None]  # [B, width+budget]: False on the left padding
    positions = (cols[None, :width] - pad[:, None]).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # padding rows see only themselves: an all-masked row would make softmax produce NaN
    mask = (causal & valid[:, None, :width]) | torch.eye(width, dtype=torch.bool, device=device)
    cache = model.new_kv_cache(b, width + budget)
    logits = model(ids, kv_cache=cache, attn_mask=mask[:, None], position_ids=positions)[0][:, -1]
    seen = torch.zeros(b, model.cfg.vocab_size, dtype=torch.bool, device=device)
    for i, p in enumerate(rows):
        seen[i, torch.tensor(p, device=device)] = True
    generator = _generator(cfg, device)
    stops = set(cfg.stop_ids)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    for step in range(budget):
        logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
        nxt = pick_next(logits, cfg, generator)
        for i, token in enumerate(nxt.tolist()):
            if not done[i]:
                if token in stops:
                    done[i] = True
                else:
                    out[i].append(token)
        if all(done) or step == budget - 1:
            break
        seen[torch.arange(b, device=device), nxt] = True
        length = cache.length
        logits = model(nxt[:, None], kv_cache=cache, attn_mask=valid[:, None, None, :length + 1],
                       position_ids=(length - pad)[:, None])[0][:, -1]
    return out


def _partial_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest tail of `text` that begins some stop string (held back until resolved)."""
    return max((k for s in stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def stream_text(tokenizer: PreTrainedTokenizerBase, tokens: Iterable[int],
                stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Text pieces of a token stream, never splitting a UTF-8 character, cut before any stop string."""
    ids: list[int] = []
    emitted = 0  # characters of the decoded text already yielded
    stop_strings = [s for s in stop_strings if s]
    text = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # byte-level BPE ended a token mid-character: wait for the rest of its bytes
        cut = _first_stop(text, stop_strings)
        if cut is not None:
            yield from _clean(text[emitted:cut])
            return
        safe = len(text) - _partial_stop(text, stop_strings)
        if safe > emitted:
            yield from _clean(text[emitted:safe])
            emitted = safe
    # the stream ended: flush what was held back, minus an unfinished last character
    text = text.rstrip("\ufffd")
    cut = _first_stop(text, stop_strings)
    yield from _clean(text[emitted:len(text) if cut is None else cut])


def _first_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    return min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=None)


def _clean(piece: str) -> Iterator[str]:
    """The piece without replacement characters (bytes that never formed a character), if anything is left."""
    piece = piece.replace("\ufffd", "")
    if piece:
        yield piece


def chat_reply(model: nn.Module, tokenizer: PreTrainedTokenizerBase, messages: list[dict],
               cfg: GenerationConfig) -> Iterator[str]:
    """Stream the assistant's reply to a conversation as text pieces; stops at <|im_end|> or <|endoftext|>."""
    from xiaolm.tokenizer import EOS, IM_END, encode_prompt

    vocab = tokenizer.get_vocab()
    run = replace(cfg, stop_ids=[*cfg.stop_ids, *(vocab[t] for t in (IM_END, EOS) if t in vocab)])
    tokens = generate_stream(model, encode_prompt(tokenizer, messages), run, tokenizer)
    yield from stream_text(tokenizer, tokens, cfg.stop_strings)
