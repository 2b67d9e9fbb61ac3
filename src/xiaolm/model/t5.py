"""Encoder-decoder T5 (text to text); parameter names and math identical to HF T5ForConditionalGeneration.

The original T5 layout, as ChatLM-mini-Chinese trains it: T5's RMS norm without bias, relative position buckets
shared by a stack's layers (bidirectional in the encoder, causal in the decoder), unscaled dot products, a ReLU
feed-forward (not gated), and the output layer tied to the embeddings with the decoder output scaled by dim^-0.5.
The output layer is always tied: transformers 5 ties T5's lm_head to its embeddings whatever config.json says,
so an untied head could not be loaded back. The decoder starts from the padding token, as T5 does.

**Batch layout.** The model takes the decoder-only batch every objective builds (x = ids[:-1], y = labels[1:],
-100 on what is not trained): in each row the last labelled run of y is the target and everything before it is
the source. So the chat history goes into the encoder and the last answer is the decoder's target, with no
objective knowing which architecture it trains; per-token outputs (log-probs, hidden states) come back in the
decoder-only layout, at the positions of y they belong to, 0 elsewhere. Packed rows (doc_ids, as SFT's packing
numbers its chats) split per document: each chat's source and target to themselves (model/t5_rows.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.model.kv_cache import KVCache
from xiaolm.model.loss import linear_cross_entropy, linear_token_logprobs
from xiaolm.model.t5_config import T5Config
from xiaolm.model.t5_rows import split_packed_rows, split_rows

__all__ = ["T5", "T5Config", "Seq2SeqCache", "flops_per_token"]


class T5LayerNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) · weight: no mean, no bias; the statistic in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_buckets(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
                     ) -> torch.Tensor:
    """T5's bucket of each relative position (key - query): exact up to half the buckets, logarithmic beyond."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -relative.clamp(max=0)
    exact = num_buckets // 2
    large = exact + (torch.log(relative.float() / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(relative < exact, relative, large)


class Attention(nn.Module):
    """Multi-head attention without scaling; scores get the position bias (and the mask) added."""

    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.q = nn.Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.dim, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.n_heads)

    def heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return proj(x).view(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = q.shape
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class SelfAttention(nn.Module):
    """layer_norm → attention over the same sequence (cached keys/values in a decoding decoder) → residual."""

    def __init__(self, cfg: T5Config, relative_bias: bool, layer: int):
        super().__init__()
        self.SelfAttention = Attention(cfg, relative_bias)
        self.layer_norm = T5LayerNorm(cfg.dim, cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layer = layer

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        h, att = self.layer_norm(x), self.SelfAttention
        q, k, v = att.heads(att.q, h), att.heads(att.k, h), att.heads(att.v, h)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return x + self.dropout(att.attend(q, k, v, bias))


class CrossAttention(nn.Module):
    """layer_norm → attention over the encoder's output (keys/values made once per prompt when decoding)."""

    def __init__(self, cfg: T5Config, layer: int):
        super().__init__()
        self.EncDecAttention = Attention(cfg, relative_bias=False)
        self.layer_norm = T5LayerNorm(cfg.dim, cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layer = layer

    def kv(self, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        att = self.EncDecAttention
        return att.heads(att.k, enc), att.heads(att.v, enc)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
        att = self.EncDecAttention
        return x + self.dropout(att.attend(att.heads(att.q, self.layer_norm(x)), *kv, bias))


class FeedForward(nn.Module):
    """layer_norm → wo(relu(wi(x))) → residual."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = nn.Module()
        self.DenseReluDense.wi = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.DenseReluDense.wo = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.layer_norm = T5LayerNorm(cfg.dim, cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ff = self.DenseReluDense
        return x + self.dropout(ff.wo(self.dropout(F.relu(ff.wi(self.layer_norm(x))))))


class Block(nn.Module):
    """HF's `block.N.layer`: [self-attention, (cross-attention,) feed-forward]."""

    def __init__(self, cfg: T5Config, index: int, decoder: bool):
        super().__init__()
        parts: list[nn.Module] = [SelfAttention(cfg, relative_bias=index == 0, layer=index)]
        if decoder:
            parts.append(CrossAttention(cfg, index))
        parts.append(FeedForward(cfg))
        self.layer = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: KVCache | None = None,
                cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                cross_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self.layer[0](x, bias, cache)
        if len(self.layer) == 3:
            x = self.layer[1](x, cross_kv, cross_bias)
        return self.layer[-1](x)


class Stack(nn.Module):
    """Blocks and the final norm; the first block's relative bias serves every block of the stack."""

    def __init__(self, cfg: T5Config, n_blocks: int, decoder: bool):
        super().__init__()
        self.cfg, self.decoder = cfg, decoder
        self.block = nn.ModuleList(Block(cfg, i, decoder) for i in range(n_blocks))
        self.final_layer_norm = T5LayerNorm(cfg.dim, cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def position_bias(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[B or 1, H, Tq, Tk] from query positions [B or 1, Tq] and key positions [Tk] or [B, Tk]."""
        relative = (keys[None, None, :] if keys.dim() == 1 else keys[:, None, :]) - queries[:, :, None]
        buckets = relative_buckets(relative, not self.decoder, self.cfg.num_buckets, self.cfg.max_distance)
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(0, 3, 1, 2)


def _masked(bias: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The bias where attention is allowed, the dtype's lowest value elsewhere (as HF: no -inf, no NaN rows)."""
    return bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)


class Seq2SeqCache(KVCache):
    """The decoder's self-attention cache (a length per row) plus each row's encoder keys/values per layer."""

    def __init__(self, cfg: T5Config, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        super().__init__(cfg.decoder_layers, batch_size, cfg.n_heads, cfg.head_dim, max_len, device, dtype)
        shape = (batch_size, cfg.n_heads, cfg.max_seq_len, cfg.head_dim)
        self.cross_k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.decoder_layers)]
        self.cross_v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.decoder_layers)]
        self.src_mask = torch.zeros(batch_size, cfg.max_seq_len, dtype=torch.bool, device=device)
        self._src_end = [0]  # no row's source is longer; a list, so views (shallow copies) share it

    @property
    def src_end(self) -> int:
        return self._src_end[0]

    @src_end.setter
    def src_end(self, n: int) -> None:
        self._src_end[0] = n

    def pick(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t[self.rows]


class T5(nn.Module):
    """The text-to-text model: forward returns what Llama's does, in the same layout (see the module doc)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.encoder = Stack(cfg, cfg.n_layers, decoder=False)
        self.decoder = Stack(cfg, cfg.decoder_layers, decoder=True)
        self.activation_checkpointing = False
        self._init()

    @property
    def lm_head(self) -> nn.Module:
        """The output layer: the embedding table (tied), applied to decoder states scaled by dim^-0.5."""
        return self.shared

    @torch.no_grad()
    def _init(self) -> None:
        """HF's T5 initialization (initializer_factor 1)."""
        c = self.cfg
        nn.init.normal_(self.shared.weight, std=1.0)
        for name, p in self.named_parameters():
            if name.endswith((".q.weight",)):
                nn.init.normal_(p, std=(c.dim * c.head_dim) ** -0.5)
            elif name.endswith((".k.weight", ".v.weight", ".wi.weight", "relative_attention_bias.weight")):
                nn.init.normal_(p, std=c.dim ** -0.5)
            elif name.endswith(".o.weight"):
                nn.init.normal_(p, std=c.inner_dim ** -0.5)
            elif name.endswith(".wo.weight"):
                nn.init.normal_(p, std=c.ffn_dim ** -0.5)

    def blocks(self) -> list[nn.Module]:
        return [*self.encoder.block, *self.decoder.block]

    def _run(self, block: nn.Module, *args: Any) -> torch.Tensor:
        if self.activation_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor, seg: torch.Tensor | None = None,
               pos: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output [B,S,D] of source ids [B,S] (src_mask True on real tokens). Packed rows give each token's
        segment `seg` and position in it `pos` [B,S]: attention stays inside a segment, positions restart."""
        allowed = src_mask[:, None, None, :]
        if seg is None:
            pos = torch.arange(src.shape[1], device=src.device)[None]
        else:
            allowed = allowed & (seg[:, :, None] == seg[:, None, :])[:, None]
        bias = _masked(self.encoder.position_bias(pos, pos[0] if seg is None else pos), allowed)
        x = self.encoder.dropout(self.shared(src))
        for block in self.encoder.block:
            x = self._run(block, x, bias)
        return self.encoder.dropout(self.encoder.final_layer_norm(x))

    def decode(self, dec: torch.Tensor, enc: torch.Tensor | None, src_mask: torch.Tensor,
               cache: Seq2SeqCache | None = None, packed: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Final decoder states [B,T,D], scaled for the tied output layer. Without a cache dec is the whole target
        prefix; with one, dec continues each row from its cached length and the encoder side comes from it.
        `packed` (split's dec_seg, dec_pos, src_seg) keeps each target to itself and to its own source."""
        t = dec.shape[1]
        if packed is not None:
            queries = keys = packed["dec_pos"]
        elif cache is None:
            queries = torch.arange(t, device=dec.device)[None]
            keys = queries[0]
        else:
            positions, _ = cache.prepare(t)
            queries = positions if positions is not None else cache.end + torch.arange(t, device=dec.device)[None]
            keys = torch.arange(cache.end + t, device=dec.device)
        if int(queries.max()) >= self.cfg.max_seq_len:
            raise XiaolmError(f"target of {int(queries.max()) + 1} tokens exceeds model.max_seq_len="
                              f"{self.cfg.max_seq_len}", hint="ask for fewer new tokens")
        cross_allowed = src_mask[:, None, None, :]
        if packed is None:
            causal = keys[None, None, None, :] <= queries[:, None, :, None]
        else:  # causal by index within the same segment; its own source only
            index = torch.arange(t, device=dec.device)
            same = packed["dec_seg"][:, :, None] == packed["dec_seg"][:, None, :]
            causal = (same & (index[None, None, :] <= index[None, :, None]))[:, None]
            cross_allowed = cross_allowed & (packed["dec_seg"][:, :, None] == packed["src_seg"][:, None, :])[:, None]
        bias = _masked(self.decoder.position_bias(queries, keys), causal)
        cross = _masked(torch.zeros((), device=dec.device), cross_allowed)
        x = self.decoder.dropout(self.shared(dec))
        for i, block in enumerate(self.decoder.block):
            if cache is None:
                kv = block.layer[1].kv(enc)
            else:
                end = cache.src_end
                kv = cache.pick(cache.cross_k[i])[:, :, :end], cache.pick(cache.cross_v[i])[:, :, :end]
            x = self._run(block, x, bias, cache, kv, cross) if cache is None else block(x, bias, cache, kv, cross)
        if cache is not None:
            cache.advance(t)
        x = self.decoder.dropout(self.decoder.final_layer_norm(x))
        return x * self.cfg.dim ** -0.5

    def new_kv_cache(self, batch_size: int, max_len: int | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Seq2SeqCache:
        """An empty cache for generation: decoder positions up to max_len, sources up to max_seq_len."""
        p = self.shared.weight
        return Seq2SeqCache(self.cfg, batch_size, min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len),
                            device or p.device, dtype or p.dtype)

    def prefill(self, src: torch.Tensor, lengths: torch.Tensor, cache: Seq2SeqCache) -> torch.Tensor:
        """Encode prompts [B,S] (right-padded to `lengths`) into the cache's rows, run the decoder's start token;
        returns the logits of each row's first reply token [B,V]."""
        src_mask = torch.arange(src.shape[1], device=src.device)[None] < lengths[:, None]
        enc = self.encode(src, src_mask)
        s = src.shape[1]
        rows = cache.rows if cache.rows is not None else slice(None)
        for i, block in enumerate(self.decoder.block):
            k, v = block.layer[1].kv(enc)
            cache.cross_k[i][rows, :, :s] = k.to(cache.cross_k[i].dtype)
            cache.cross_v[i][rows, :, :s] = v.to(cache.cross_v[i].dtype)
        cache.src_mask[rows] = False
        cache.src_mask[rows, :s] = src_mask
        cache.src_end = max(cache.src_end, s)
        start = torch.full((src.shape[0], 1), self.cfg.pad_token_id, dtype=torch.long, device=src.device)
        h = self.decode(start, None, cache.pick(cache.src_mask)[:, :cache.src_end], cache)
        return F.linear(h[:, -1], self.shared.weight)

    def split(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decoder-only rows (x, y) → source, decoder input and target of each row's last labelled run of y."""
        return split_rows(x, y, self.cfg.pad_token_id)

    def split_packed(self, x: torch.Tensor, y: torch.Tensor, doc: torch.Tensor) -> dict[str, torch.Tensor]:
        """split() for packed rows, one source and one target per document (model/t5_rows.py)."""
        return split_packed_rows(x, y, doc, self.cfg.pad_token_id)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: Seq2SeqCache | None = None, attn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                output: str = "auto") -> Any:
        """As Llama.forward on decoder-only rows (x, y): "auto" → (None, mean cross-entropy over the targets);
        "logprobs" → log p(target) [B,T]; "hidden" → decoder states [B,T,D]; both at y's positions, 0 elsewhere.
        With a kv_cache (generation) input_ids are the next decoder tokens: → (logits [B,t,V], None)."""
        if attn_mask is not None or position_ids is not None:
            raise XiaolmError("a T5 model takes no attention mask or positions: packed rows come with doc_ids",
                              where="model.arch=t5")
        if kv_cache is not None:
            h = self.decode(input_ids, None, kv_cache.pick(kv_cache.src_mask)[:, :kv_cache.src_end], kv_cache)
            return F.linear(h, self.shared.weight), None
        if targets is None:
            raise XiaolmError("a T5 model needs the targets to tell source from target", where="model.arch=t5",
                              hint="this method works with decoder-only models only")
        parts = self.split(input_ids, targets) if doc_ids is None else self.split_packed(input_ids, targets, doc_ids)
        packed = parts if doc_ids is not None else None
        enc = self.encode(parts["src"], parts["src_mask"], parts.get("src_seg"), parts.get("src_pos"))
        h = self.decode(parts["dec"], enc, parts["src_mask"], packed=packed)
        flat_h, flat_t = h.reshape(-1, h.size(-1)), parts["tgt"].reshape(-1)
        if output == "auto":
            return None, linear_cross_entropy(flat_h, self.shared.weight, flat_t)
        keep = parts["tgt_mask"]
        if output == "logprobs":
            logps = linear_token_logprobs(flat_h, self.shared.weight, flat_t).view(parts["tgt"].shape)
            return torch.zeros(targets.shape, dtype=logps.dtype, device=logps.device).scatter_add(
                1, parts["at"], logps * keep)
        if output == "hidden":
            at = parts["at"][..., None].expand(-1, -1, h.size(-1))
            return torch.zeros(*targets.shape, h.size(-1), dtype=h.dtype, device=h.device).scatter_add(
                1, at, h * keep[..., None])
        raise ValueError(f"unknown output {output!r}: use auto, logprobs or hidden")

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (the tied output layer counted once); optionally without the embedding table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.shared.weight.numel() if exclude_embeddings else n

    def hf_config(self, torch_dtype: str | None = None) -> dict[str, Any]:
        """config.json dict for this model, dtype taken from its weights unless given."""
        return self.cfg.hf_config(torch_dtype or str(self.shared.weight.dtype).removeprefix("torch."))


# Per token of a row (source and target tokens counted alike, as the loop counts them), assuming about half of
# them are source: an encoder token costs 6·N_enc, a decoder token 6·(N_dec + the output layer), plus attention
# (QKᵀ and ·V: 12·inner·T per layer, the decoder's cross-attention one more). Halved for the even split.
def flops_per_token(cfg: T5Config, seq_len: int) -> float:
    """Approximate training FLOPs per token of a text-to-text row of seq_len tokens."""
    attn, ff = 4 * cfg.dim * cfg.inner_dim, 2 * cfg.dim * cfg.ffn_dim
    n_enc = cfg.n_layers * (attn + ff)
    n_dec = cfg.decoder_layers * (2 * attn + ff) + cfg.dim * cfg.vocab_size
    attention = 12 * cfg.inner_dim * seq_len / 2 * (cfg.n_layers + 2 * cfg.decoder_layers)
    return 3.0 * (n_enc + n_dec) + attention / 2
