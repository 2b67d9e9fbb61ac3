"""Decoding with a KV cache: one slot-based engine behind every caller (CLI chat, eval, the server).

The prompt is run once (prefill), then each step feeds only the newest token: its keys/values join the cache,
so a step costs one token's worth of compute instead of the whole sequence's. The engine's cache has a row per
slot and a length per row, so requests that started at different times decode in one batch, join it between
steps and leave it when they finish (continuous batching). generate, generate_stream and generate_batch are
the engine with one or a fixed set of rows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.infer.text_stream import TextStream, stream_text
from xiaolm.model.registry import arch_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Engine", "Event", "GenerationConfig", "apply_repetition_penalty", "chat_reply", "filter_logits",
           "generate", "generate_batch", "generate_stream", "pick_next", "stream_text"]


@dataclass
class GenerationConfig:
    """How to pick each next token and when to stop; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0 = off; keeps tokens at least min_p × the best token's probability
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in prompt or reply
    stop_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None  # fixes sampling; None draws from torch's global RNG


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """HF's rule on seen tokens (bool mask [B,V] or ids [B,S]): positive logits ÷ penalty, negative × it."""
    if isinstance(penalty, float | int) and penalty == 1.0:
        return logits
    if seen.dtype != torch.bool:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, seen, True)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def _per_row(value: float | torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, device=logits.device).reshape(-1, 1).expand(logits.shape[0], 1)


def filters(top_k: int, top_p: float, min_p: float, vocab: int) -> bool:
    """Whether these settings remove any token (else sampling needs no sort)."""
    return 0 < top_k < vocab or top_p < 1.0 or min_p > 0.0


def filter_logits(logits: torch.Tensor, top_k: int | torch.Tensor = 0, top_p: float | torch.Tensor = 1.0,
                  min_p: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Set to -inf every logit outside the top_k, then outside the nucleus top_p, then under min_p × the best
    token's probability (HF's rules, in HF's order); each setting a number or one value per row [B]."""
    if isinstance(top_k, int) and isinstance(top_p, float) and isinstance(min_p, float) \
            and not filters(top_k, top_p, min_p, logits.size(-1)):
        return logits  # nothing to filter: skip the sort
    vocab = logits.size(-1)
    k, p, m = _per_row(top_k, logits), _per_row(top_p, logits), _per_row(min_p, logits)
    k = torch.where((k > 0) & (k < vocab), k, vocab).long()
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    kth = sorted_logits.gather(-1, k - 1)
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(-1)
    # keep a token while the mass ranked above it is short of top_p; min_p against the best; always keep the best
    drop = ((probs.cumsum(-1) - probs >= p) & (p < 1.0)) | ((probs < m * probs[:, :1]) & (m > 0.0))
    drop[..., 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def pick_next(logits: torch.Tensor, cfg: GenerationConfig,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from float logits [B,V] (repetition penalty already applied)."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def fit_prompt(input_ids: Sequence[int], max_new_tokens: int, max_len: int, eos_id: int,
               encoder_decoder: bool = False, source_len: int = 0) -> tuple[list[int], int]:
    """(prompt cut from the left so prompt + reply fit max_len, reply budget). An encoder-decoder model's prompt
    is cut to the encoder's source_len and its reply (after the decoder's start token) to max_len."""
    budget = min(max_new_tokens, max_len - 1)  # at least one prompt token (the decoder's start token) must fit
    prompt = list(input_ids) or [eos_id]  # EOS separates documents: a neutral start
    if encoder_decoder:
        return prompt[-source_len:], max(budget, 0)
    if budget > 0 and len(prompt) > max_len - budget:
        prompt = prompt[len(prompt) - (max_len - budget):]
    return prompt, max(budget, 0)


@dataclass
class Event:
    """What one step did to one slot: `token` (None when a stop id ended it), its text, and why it finished."""

    slot: int
    token: int | None
    text: str = ""
    finish: str | None = None  # "stop" (stop id or string), "length" (budget or context), None (goes on)
    stop_id: int | None = None  # the stop id that ended the slot (not part of its text)


@dataclass
class _Row:
    cfg: GenerationConfig
    budget: int
    stops: set[int]
    generator: torch.Generator | None
    text: TextStream | None
    tokens: list[int] = field(default_factory=list)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two token lists share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


class Engine:
    """Slots of one preallocated KV cache: add() prefills prompts into free slots, step() picks one token for
    every active slot and runs one decode forward for those that go on, release() frees a slot.

    A freed slot keeps its keys and values: a later prompt that begins with the same tokens (the next turn of a
    chat, which resends the history; a shared system prompt) goes to that slot and prefills only the rest."""

    def __init__(self, model: nn.Module, slots: int = 1, max_len: int | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, compile: bool = False):
        self.model, self.cfg, self.tokenizer = model, model.cfg, tokenizer
        # an encoder-decoder model keeps the prompt in the encoder: the cache holds the reply alone
        self.encoder_decoder = arch_of(model).encoder_decoder
        self.device = next(model.parameters()).device
        self.max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        self.cache = model.new_kv_cache(slots, self.max_len)
        self.lengths = [0] * slots  # positions filled per slot (the host's copy of cache.lengths)
        self.rows: dict[int, _Row] = {}
        self.logits = torch.zeros(slots, self.cfg.vocab_size, device=self.device)  # each slot's next-token logits
        self.seen = torch.zeros(slots, self.cfg.vocab_size, dtype=torch.bool, device=self.device)
        self.kept: list[list[int]] = [[] for _ in range(slots)]  # tokens whose keys/values each slot holds
        self.prefilled = self.reused = 0  # prompt tokens computed, and found in a slot's cache instead
        self.steps = 0  # decode forwards run
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # rows in each recent decode forward
        # on a CPU, a C++ wrapper calls the compiled kernels one after another, without Python between them
        options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
        self._decode = torch.compile(model, dynamic=True, options=options) if compile else model

    @property
    def free(self) -> int:
        """Slots available to add()."""
        return len(self.lengths) - len(self.rows)

    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]], cfgs: Sequence[GenerationConfig]) -> list[int]:
        """Prefill prompts (cut from the left to fit) into free slots in one forward; returns their slots."""
        if len(prompts) > self.free:
            raise XiaolmError(f"{len(prompts)} prompts for {self.free} free slots", hint="release slots first")
        if not prompts:
            return []
        fitted = [fit_prompt(p, c.max_new_tokens, self.max_len, self.cfg.eos_token_id, self.encoder_decoder,
                             self.cfg.max_seq_len) for p, c in zip(prompts, cfgs, strict=True)]
        for prompt, _ in fitted:
            if max(prompt) >= self.cfg.vocab_size or min(prompt) < 0:
                raise XiaolmError(f"prompt has token id {max(prompt)} outside the model's vocabulary "
                                  f"({self.cfg.vocab_size})", hint="use the tokenizer the model was trained with")
        slots, reuse = self._place([p for p, _ in fitted])
        width = max(len(p) - r for (p, _), r in zip(fitted, reuse, strict=True))
        if max(reuse) + width > self.max_len:  # the rows' padded chunks would run past the cache: prefill whole
            reuse, width = [0] * len(slots), max(len(p) for p, _ in fitted)
        ids = torch.full((len(slots), width), self.cfg.pad_token_id, dtype=torch.long)
        for i, ((prompt, _), r) in enumerate(zip(fitted, reuse, strict=True)):
            ids[i, :len(prompt) - r] = torch.tensor(prompt[r:])  # right-padded: a row's tokens never see the padding
        for slot, r in zip(slots, reuse, strict=True):  # the forward overwrites what lies past the reused prefix
            del self.kept[slot][r:]
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        rows = slice(slots[0], slots[-1] + 1) if contiguous else torch.tensor(slots, device=self.device)
        self.cache.lengths[rows] = torch.tensor(reuse, device=self.device)
        view = self.cache.view(rows, max(reuse), ragged=min(reuse) != max(reuse))
        if self.encoder_decoder:  # the encoder reads the prompt, the decoder its start token
            lengths = torch.tensor([len(p) for p, _ in fitted], device=self.device)
            self.logits[rows] = self.model.prefill(ids.to(self.device), lengths, view).float()
            filled = [1] * len(slots)
        else:
            hidden = self.model(ids.to(self.device), kv_cache=view, output="hidden")
            last = torch.tensor([len(p) - r - 1 for (p, _), r in zip(fitted, reuse, strict=True)], device=self.device)
            # the output layer only at each prompt's last position: the others' logits would go unused
            self.logits[rows] = self.model.lm_head(hidden[torch.arange(len(slots), device=self.device), last]).float()
            filled = [len(p) for p, _ in fitted]
        self.seen[rows] = False
        self.reused += sum(reuse)
        self.prefilled += sum(len(p) for p, _ in fitted) - sum(reuse)
        for slot, (prompt, budget), cfg, used in zip(slots, fitted, cfgs, filled, strict=True):
            self.lengths[slot] = used
            self.kept[slot] = [] if self.encoder_decoder else list(prompt)
            self.seen[slot, torch.tensor(prompt, device=self.device)] = True
            seed = cfg.seed
            generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
            text = TextStream(self.tokenizer, cfg.stop_strings) if self.tokenizer is not None else None
            self.rows[slot] = _Row(cfg, min(budget, self.max_len - used), set(cfg.stop_ids), generator, text)
        return slots

    def _place(self, prompts: list[list[int]]) -> tuple[list[int], list[int]]:
        """A free slot for each prompt, the one whose kept tokens share its longest prefix (else the emptiest), and
        how many of its tokens are kept there (never the last: its logits are needed)."""
        free = [s for s in range(len(self.lengths)) if s not in self.rows]
        slots, reuse = [], []
        for prompt in prompts:
            shared = {s: common_prefix(self.kept[s], prompt) for s in free}
            best = max(free, key=lambda s: (shared[s], -len(self.kept[s])))
            free.remove(best)
            slots.append(best)
            reuse.append(0 if self.encoder_decoder else min(shared[best], len(prompt) - 1))
        return slots, reuse

    def release(self, slot: int) -> None:
        """Free a slot (finished, or its client went away); its row leaves the batch at the next step. Its kept
        tokens stay: while idle, its row writes (and ignores) one position past them."""
        self.rows.pop(slot, None)
        del self.kept[slot][self.max_len - 1:]
        self.lengths[slot] = len(self.kept[slot])

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One token for every active slot; finished slots are released, the others advance one decode step."""
        if not self.rows:
            return []
        slots = sorted(self.rows)
        tokens = self._pick(slots)
        events, going = [], []
        for slot, token in zip(slots, tokens, strict=True):
            row = self.rows[slot]
            if row.budget <= 0:
                events.append(Event(slot, None, "", "length"))
            elif token in row.stops:
                events.append(Event(slot, None, row.text.finish() if row.text else "", "stop", token))
            else:
                row.tokens.append(token)
                text = row.text.push(token) if row.text else ""
                finish = "stop" if row.text and row.text.stopped else None
                if finish is None and len(row.tokens) >= row.budget:
                    finish = "length"
                    text += row.text.finish() if row.text else ""
                events.append(Event(slot, token, text, finish))
                if finish is None:
                    going.append((slot, token))
                    continue
            self.release(slot)
        if going:
            self._forward(going)
        return events

    def _pick(self, slots: list[int]) -> list[int]:
        """Each slot's next token from its pending logits under its own settings."""
        idx = torch.tensor(slots, device=self.device)
        cfgs = [self.rows[s].cfg for s in slots]
        logits = self.logits[idx]
        penalty = torch.tensor([c.repetition_penalty for c in cfgs], device=self.device)[:, None]
        if any(c.repetition_penalty != 1.0 for c in cfgs):
            logits = apply_repetition_penalty(logits, self.seen[idx], penalty)
        out = logits.argmax(-1)
        hot = [i for i, c in enumerate(cfgs) if c.temperature > 0]
        if not hot:
            return out.tolist()
        h = torch.tensor(hot, device=self.device)
        temps = torch.tensor([cfgs[i].temperature for i in hot], device=self.device)[:, None]
        scaled = logits[h] / temps
        sift = [j for j, i in enumerate(hot) if filters(cfgs[i].top_k, cfgs[i].top_p, cfgs[i].min_p, scaled.size(-1))]
        if sift:  # only rows whose settings remove tokens pay for the sort
            f = torch.tensor(sift, device=self.device)
            scaled[f] = filter_logits(scaled[f], torch.tensor([cfgs[hot[j]].top_k for j in sift], device=self.device),
                                      torch.tensor([cfgs[hot[j]].top_p for j in sift], device=self.device),
                                      torch.tensor([cfgs[hot[j]].min_p for j in sift], device=self.device))
        probs = scaled.softmax(-1)
        free = [j for j, i in enumerate(hot) if self.rows[slots[i]].generator is None]
        if free:  # rows without a seed draw together, one uniform number each, by inverting their cumulative sums
            f = torch.tensor(free, device=self.device)
            cdf = probs[f].double().cumsum(-1)
            total = cdf[:, -1:].contiguous()
            u = torch.rand(total.shape, dtype=cdf.dtype, device=self.device) * total
            # the first token whose cumulative sum passes u; never past the last token with any probability
            out[h[f]] = torch.minimum(torch.searchsorted(cdf, u, right=True), torch.searchsorted(cdf, total))[:, 0]
        for j, i in enumerate(hot):  # a seeded row draws from its own generator, so others cannot shift it
            generator = self.rows[slots[i]].generator
            if generator is not None:
                out[i] = torch.multinomial(probs[j], 1, generator=generator)[0]
        return out.tolist()

    def _forward(self, going: list[tuple[int, int]]) -> None:
        """One decode forward over the slots from the lowest to the highest active one; idle rows in between
        compute and are ignored (each writes one position past its kept tokens)."""
        lo, hi = min(s for s, _ in going), max(s for s, _ in going) + 1
        ids = torch.full((hi - lo, 1), self.cfg.pad_token_id, dtype=torch.long)
        for slot, token in going:
            ids[slot - lo, 0] = token
        active = [self.lengths[s] for s, _ in going]
        ragged = len(going) < hi - lo or min(active) != max(active)
        self.cache.lengths[lo:hi] = torch.tensor(self.lengths[lo:hi])
        view = self.cache.view(slice(lo, hi), max(active), ragged)
        logits = self._decode(ids.to(self.device), kv_cache=view)[0][:, -1]
        index = torch.tensor([s for s, _ in going], device=self.device)
        self.logits[index] = logits[index - lo].float()
        self.seen[index, torch.tensor([t for _, t in going], device=self.device)] = True
        for slot, token in going:
            self.lengths[slot] += 1
            if not self.encoder_decoder:
                self.kept[slot].append(token)
        self.steps += 1
        self.batch_sizes.append(len(going))


def _capacity(model: nn.Module, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> int:
    """Cache length the prompts need (as cut to fit the context) plus the reply budget."""
    ctx = model.cfg.max_seq_len
    if arch_of(model).encoder_decoder:  # the start token and the reply
        return min(cfg.max_new_tokens, ctx - 1) + 1
    fitted = [fit_prompt(p, cfg.max_new_tokens, ctx, model.cfg.eos_token_id) for p in prompts]
    return max(len(p) + b for p, b in fitted)


# A stop id ends generation without being yielded. With a tokenizer, a stop string also ends it, just after
# the token that completes it: stream_text then cuts the text at the stop string.
def generate_stream(model: nn.Module, input_ids: Sequence[int], cfg: GenerationConfig,
                    tokenizer: PreTrainedTokenizerBase | None = None, engine: Engine | None = None) -> Iterator[int]:
    """Yield new token ids one at a time until a stop id or string, max_new_tokens or the context's end. An
    `engine` kept from call to call (one with a free slot) reuses what its slots hold of the prompt's start."""
    if min(cfg.max_new_tokens, model.cfg.max_seq_len - 1) <= 0:
        return
    if engine is None:
        watch = tokenizer if cfg.stop_strings else None
        engine = Engine(model, 1, _capacity(model, [input_ids], cfg), tokenizer=watch)
    slot = engine.add([input_ids], [cfg])[0]
    try:
        while slot in engine.rows:
            for event in engine.step():
                if event.token is not None:
                    yield event.token
    finally:  # a consumer that stops early frees the slot
        engine.release(slot)


def generate(model: nn.Module, input_ids: Sequence[int], cfg: GenerationConfig,
             tokenizer: PreTrainedTokenizerBase | None = None) -> list[int]:
    """All new token ids (a stop id excluded)."""
    return list(generate_stream(model, input_ids, cfg, tokenizer))


def generate_batch(model: nn.Module, prompts: Sequence[Sequence[int]], cfg: GenerationConfig) -> list[list[int]]:
    """New token ids for many prompts decoded together; each row stops at its own stop id (row i samples with
    seed + i when cfg.seed is set)."""
    if not prompts or min(cfg.max_new_tokens, model.cfg.max_seq_len - 1) <= 0:
        return [[] for _ in prompts]
    engine = Engine(model, len(prompts), _capacity(model, prompts, cfg))
    cfgs = [cfg if cfg.seed is None else replace(cfg, seed=cfg.seed + i) for i in range(len(prompts))]
    slots = engine.add(prompts, cfgs)
    out: dict[int, list[int]] = {s: [] for s in slots}
    while engine.rows:
        for event in engine.step():
            if event.token is not None:
                out[event.slot].append(event.token)
    return [out[s] for s in slots]


def chat_stop_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end an assistant turn: <|im_end|> and <|endoftext|> (and the tokenizer's EOS)."""
    from xiaolm.tokenizer import EOS, IM_END

    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in (IM_END, EOS) if t in vocab]
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def chat_reply(model: nn.Module, tokenizer: PreTrainedTokenizerBase, messages: list[dict],
               cfg: GenerationConfig, engine: Engine | None = None) -> Iterator[str]:
    """Stream the assistant's reply to a conversation as text pieces; stops at <|im_end|> or <|endoftext|>. With
    the same `engine` every turn, a turn prefills only what the conversation added since the last one."""
    from xiaolm.tokenizer import encode_prompt

    run = replace(cfg, stop_ids=[*cfg.stop_ids, *chat_stop_ids(tokenizer)])
    tokens = generate_stream(model, encode_prompt(tokenizer, messages), run, tokenizer, engine)
    yield from stream_text(tokenizer, tokens, cfg.stop_strings)
