"""Decoding with a KV cache: greedy or sampled (temperature, top-k, top-p, repetition penalty), streaming."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from xiaolm.model.llama import Llama


@dataclass
class GenerationConfig:
    """How to pick each next token and when to stop; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF convention: divide positive logits of seen tokens by `penalty`, multiply negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def pick_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Choose next token ids [B] from logits [B,V]."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_stream(model: Llama, input_ids: list[int], cfg: GenerationConfig) -> Iterator[int]:
    """Yield new token ids one at a time until a stop id, max_new_tokens or the context end."""
    device = model.model.embed_tokens.weight.device
    ctx = model.cfg.max_seq_len
    budget = max(1, min(cfg.max_new_tokens, ctx - 1))
    prompt = input_ids[-(ctx - budget):] if len(input_ids) > ctx - budget else list(input_ids)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    cache = model.new_kv_cache(1, min(ctx, len(prompt) + budget))
    seen = torch.tensor([prompt], device=device)
    logits, _ = model(seen, kv_cache=cache)
    stops = set(cfg.stop_ids)
    for _ in range(budget):
        last = apply_repetition_penalty(logits[:, -1].float(), seen, cfg.repetition_penalty)
        nxt = pick_next(last, cfg, generator)
        token = int(nxt[0])
        if token in stops:
            return
        yield token
        if cache.length >= cache.max_len:
            return
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        logits, _ = model(nxt[:, None], kv_cache=cache)


def generate(model: Llama, input_ids: list[int], cfg: GenerationConfig) -> list[int]:
    """All new token ids (stop token excluded)."""
    return list(generate_stream(model, input_ids, cfg))


@torch.inference_mode()
def generate_batch(model: Llama, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[int]]:
    """Greedy/sampled answers for many prompts at once, left-padded; each stops at its own stop id."""
    if not prompts:
        return []
    device = model.model.embed_tokens.weight.device
    ctx = model.cfg.max_seq_len
    budget = max(1, min(cfg.max_new_tokens, ctx - 1))
    prompts = [p[-(ctx - budget):] for p in prompts]
    b, width = len(prompts), max(len(p) for p in prompts)
    pad = model.cfg.pad_token_id
    ids = torch.full((b, width), pad, dtype=torch.long, device=device)
    valid = torch.zeros((b, width + budget), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        valid[i, width - len(p):] = True
    valid[:, width:] = True
    # rotary positions follow the cache index, so left padding shifts a prompt's positions; RoPE attention
    # depends only on relative offsets, so the result matches unpadded decoding up to float rounding
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = causal[None, None] & valid[:, None, None, :width]
    mask = mask | torch.eye(width, dtype=torch.bool, device=device)[None, None]  # pad rows attend to themselves
    cache = model.new_kv_cache(b, width + budget)
    logits, _ = model(ids, kv_cache=cache, attn_mask=mask)
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    seen = ids
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stops = torch.tensor(cfg.stop_ids or [-1], device=device)
    for _ in range(budget):
        last = logits[:, -1].float()
        if cfg.repetition_penalty != 1.0:
            last = torch.stack([apply_repetition_penalty(last[i:i + 1], seen[i:i + 1][:, valid[i, :seen.shape[1]]],
                                                         cfg.repetition_penalty)[0] for i in range(b)])
        nxt = pick_next(last, cfg, generator)
        done |= torch.isin(nxt, stops)
        for i in range(b):
            if not done[i]:
                out[i].append(int(nxt[i]))
        if bool(done.all()) or cache.length >= cache.max_len:
            break
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        step_mask = valid[:, None, None, :cache.length + 1]
        logits, _ = model(nxt[:, None], kv_cache=cache, attn_mask=step_mask)
    return out


def stream_text(tokenizer, tokens: Iterator[int], stop_strings: list[str] | None = None) -> Iterator[str]:
    """Turn a token stream into text pieces, never splitting a UTF-8 character, honouring stop strings."""
    ids: list[int] = []
    emitted = ""
    stop_strings = stop_strings or []
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # a multi-byte character is still incomplete
        cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
        if cut >= 0:
            if cut > len(emitted):
                yield text[len(emitted):cut]
            return
        # hold back a tail that could be the start of a stop string
        hold = max((len(s) - 1 for s in stop_strings), default=0)
        safe = len(text) - hold if hold else len(text)
        if safe > len(emitted):
            yield text[len(emitted):safe]
            emitted = text[:safe]
    text = tokenizer.decode(ids, skip_special_tokens=True).replace("\ufffd", "")
    if len(text) > len(emitted):
        yield text[len(emitted):]


def chat_reply(model: Llama, tokenizer, messages: list[dict], cfg: GenerationConfig) -> Iterator[str]:
    """Stream the assistant's reply to a conversation, as text pieces."""
    from xiaolm.tokenizer import IM_END, encode_prompt

    stops = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id]
    run = GenerationConfig(**{**cfg.__dict__, "stop_ids": list(cfg.stop_ids) + stops})
    yield from stream_text(tokenizer, generate_stream(model, encode_prompt(tokenizer, messages), run),
                           cfg.stop_strings)
