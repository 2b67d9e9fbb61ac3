"""Decoder-only Llama-style transformer; parameter names and math identical to HF LlamaForCausalLM.

Read top to bottom: config, RMSNorm, rotary embeddings, KV cache, attention (GQA), SwiGLU MLP, block, model,
FLOPs. Keeping HF's names and rotary layout means a state_dict moves between the two with no conversion.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.model.config import WHERE, ModelConfig
from xiaolm.model.kv_cache import KVCache
from xiaolm.model.loss import linear_cross_entropy, linear_token_logprobs

log = logging.getLogger(__name__)


@dataclass
class LlamaConfig(ModelConfig):
    """Model shape; `ffn_dim=None` picks the usual SwiGLU width (≈ 8/3·dim, rounded up to 64)."""

    arch: str = "llama"
    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int | None = None
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    eos_token_id: int = 0
    pad_token_id: int = 0
    bos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden width: ffn_dim, or 8/3·dim rounded up to a multiple of 64 (keeps matmuls aligned)."""
        return self.ffn_dim or 64 * math.ceil(8 * self.dim / 3 / 64)

    def check(self) -> None:
        """Refuse shapes that cannot work, naming the clashing fields."""
        self.check_positive("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len")
        if self.ffn_dim is not None and self.ffn_dim <= 0:
            raise XiaolmError(f"model.ffn_dim={self.ffn_dim} must be positive", where=WHERE,
                              hint="or leave it unset (null) for ≈ 8/3·dim")
        if self.dim % self.n_heads:
            raise XiaolmError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}",
                              where=WHERE, hint="pick n_heads so that dim / n_heads is a whole number")
        if self.n_heads % self.n_kv_heads:
            raise XiaolmError(f"model.n_heads={self.n_heads} is not divisible by "
                              f"model.n_kv_heads={self.n_kv_heads}", where=WHERE,
                              hint="each key/value head must serve the same number of query heads")
        if self.head_dim % 2:
            raise XiaolmError(f"head dim = model.dim / model.n_heads = {self.head_dim} must be even for "
                              "rotary embeddings", where=WHERE, hint="change dim or n_heads")
        self.check_token_ids()

    def hf_config(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A transformers LlamaConfig dict for config.json (both 4.x and 5.x spellings of dtype and rope)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,  # transformers 4.x
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},  # transformers 5.x
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype,  # transformers 4.x
            "dtype": torch_dtype,  # transformers 5.x
            "use_cache": True,
        }

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], where: str | None = None) -> LlamaConfig:
        """Inverse of hf_config(); refuses configs that describe something this model cannot compute."""
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        # a reward model's backbone is the same Llama (model/reward.py reads its score head)
        if d.get("model_type") != "llama" or not {"LlamaForCausalLM", "LlamaForSequenceClassification"} & set(archs):
            raise XiaolmError(f"config.json describes {d.get('model_type')!r} / {archs}, not a Llama "
                              "causal LM", where=where, hint="xiaolm loads LlamaForCausalLM models")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if not isinstance(d.get(k), int)]
        if missing:
            raise XiaolmError(f"config.json lacks integer field(s) {', '.join(missing)}", where=where)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        unsupported = []
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            unsupported.append(f"rope_type={rope.get('rope_type', rope.get('type'))!r}")
        if d.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={d['hidden_act']!r}")
        if d.get("attention_bias") or d.get("mlp_bias"):
            unsupported.append("attention_bias/mlp_bias")
        if d.get("head_dim") not in (None, d["hidden_size"] // d["num_attention_heads"]):
            unsupported.append(f"head_dim={d['head_dim']} ≠ hidden_size / num_attention_heads")
        if unsupported:
            raise XiaolmError(f"config.json uses features xiaolm's Llama lacks: {', '.join(unsupported)}",
                              where=where)
        eos = d.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if not isinstance(eos, int):
            raise XiaolmError("config.json has no eos_token_id", where=where,
                              hint="set eos_token_id to the id of the tokenizer's end-of-text token")
        pad = d.get("pad_token_id")
        if not isinstance(pad, int):  # documented choice: EOS doubles as padding, as in xiaolm's chat format
            log.info("config.json has no pad_token_id: padding with eos_token_id=%d", eos)
            pad = eos
        return cls(vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
                   n_heads=d["num_attention_heads"],
                   n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                   ffn_dim=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 512),
                   rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                   norm_eps=d.get("rms_norm_eps", 1e-5), tie_embeddings=d.get("tie_word_embeddings", True),
                   eos_token_id=eos, pad_token_id=pad,
                   bos_token_id=d.get("bos_token_id"))


class RMSNorm(nn.Module):
    """x / rms(x) · weight, with the statistics in float32 as HF does (fp16/bf16 overflow otherwise)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, head_dim] in HF's half-split ("rotate_half") layout, not interleaved pairs."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles: q·k then depends on relative position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention: n_kv_heads key/value heads, each shared by n_heads/n_kv_heads query heads."""

    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1 and t == 1:  # decoding: the groups' lone queries become queries of their shared kv head,
            # so no key or value is copied (a [B,1,1,S] mask broadcasts over them)
            y = F.scaled_dot_product_attention(q.view(b, self.n_kv_heads, groups, self.head_dim), k, v,
                                               attn_mask=mask)
            return self.o_proj(y.reshape(b, t, -1))
        if groups > 1:  # query head h reads kv head h // groups, as HF's repeat_kv does
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if mask is None:
            # a lone query (decoding) may see every cached key; otherwise queries and keys are aligned
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, blocks and final norm: the submodule HF calls `model`, hence the `model.` name prefix."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Llama(nn.Module):
    """The causal language model: forward returns (logits, loss)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # not persistent: recomputable, and HF's state_dict has no such entries
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # recompute each block's activations in the backward pass: less memory, ~30% more compute
        self.activation_checkpointing = False
        self.apply(self._init)
        # GPT-2 style: each block adds two residual outputs, so shrink those projections to keep the
        # residual stream's variance roughly independent of depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for generation, by default on the model's device and dtype, max_seq_len long."""
        p, c = self.model.embed_tokens.weight, self.cfg
        max_len = min(max_len or c.max_seq_len, c.max_seq_len)
        return KVCache(c.n_layers, batch_size, c.n_kv_heads, c.head_dim, max_len, device or p.device, dtype or p.dtype)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                output: str = "auto") -> Any:
        """By `output`: "auto" → (logits [B,T,V], None) without targets, (None, mean cross-entropy over targets
        != -100) with them; "logprobs" → log p(target) [B,T] (0 where target is -100); "hidden" → the final
        normed hidden states [B,T,D] (for value and reward heads)."""
        # With a kv_cache, each row's positions continue from its length (model/kv_cache.py) and its new
        # keys/values are written there. attn_mask (bool [B,1,T,S], True = may attend) and position_ids [B,T]
        # replace the causal mask and the positions (left-padded prompts, for instance). doc_ids [B,T] (packed documents
        # numbered along each row) keep attention inside each document and restart positions at its start.
        x = self.hidden_states(input_ids, kv_cache, attn_mask, position_ids, doc_ids)
        if output == "hidden":
            return x
        if output == "logprobs":
            if targets is None:
                raise ValueError("output='logprobs' needs targets")
            flat = linear_token_logprobs(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1))
            return flat.view(targets.shape)
        if output != "auto":
            raise ValueError(f"unknown output {output!r}: use auto, logprobs or hidden")
        if targets is None:
            return self.lm_head(x), None
        # the [tokens, vocab] logits never materialize at once: see model/loss.py
        return None, linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1))

    def hidden_states(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None,
                      attn_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [B,T,D]; the arguments mean what they mean in forward."""
        t = input_ids.shape[1]
        start = kv_cache.end if kv_cache is not None else 0
        if start + t > self.cfg.max_seq_len:
            raise XiaolmError(f"sequence of {start + t} tokens exceeds "
                              f"model.max_seq_len={self.cfg.max_seq_len}",
                              hint="truncate the input or train with a longer max_seq_len")
        if kv_cache is not None and start + t > kv_cache.max_len:
            raise XiaolmError(f"KV cache holds {kv_cache.max_len} tokens, {start + t} needed",
                              hint="create it with a larger max_len")
        if doc_ids is not None:
            attn_mask, position_ids = document_mask(doc_ids)
        if kv_cache is not None:  # rows at different lengths: their own positions and a mask per row
            row_positions, row_mask = kv_cache.prepare(t)
            position_ids = row_positions if position_ids is None else position_ids
            attn_mask = row_mask if attn_mask is None else attn_mask
        x = self.model.embed_tokens(input_ids)
        if position_ids is None:
            cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        else:  # per-row positions: [B,1,T,hd] broadcasts over heads
            cos, sin = self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = attn_mask
        if mask is None and start > 0 and t > 1:
            # a chunk after cached tokens: causal within the chunk, full view of the cache (is_causal would
            # align the triangle to the top-left and hide the cache)
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
        for block in self.model.layers:
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, None, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.advance(t)
        return self.model.norm(x)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied embedding counted once); optionally without the token embedding table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embeddings else n

    def hf_config(self, torch_dtype: str | None = None) -> dict[str, Any]:
        """config.json dict for this model, dtype taken from its weights unless given."""
        if torch_dtype is None:
            torch_dtype = str(self.model.embed_tokens.weight.dtype).removeprefix("torch.")
        return self.cfg.hf_config(torch_dtype)


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The document number of each token of packed rows [B,T]: an EOS ends its document, the next token starts one."""
    is_eos = (tokens == eos_id).long()
    return is_eos.cumsum(dim=1) - is_eos


def document_mask(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask [B,1,T,T] (causal, within a document) and positions [B,T] restarting at each document."""
    t = doc_ids.shape[1]
    idx = torch.arange(t, device=doc_ids.device)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, 0).cummax(dim=1).values  # index of each token's document start
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None], idx - first


# N counts the weights used in matmuls (attention and MLP projections plus the output head; the embedding
# lookup does no FLOPs): each costs 2 FLOPs per token forward and 4 backward, hence 6·N. The second term is
# QKᵀ and attention·V, which grow with context: 2·2·dim·T FLOPs forward per layer, times 3 for fwd+bwd.
def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token, as in PaLM's MFU: 6·N + 12·n_layers·dim·seq_len."""
    attn = 2 * cfg.dim * cfg.n_heads * cfg.head_dim + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim
    n = cfg.n_layers * (attn + 3 * cfg.dim * cfg.hidden_dim) + cfg.dim * cfg.vocab_size
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.dim * seq_len
