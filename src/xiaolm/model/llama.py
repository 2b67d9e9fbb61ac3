"""Decoder-only Llama-style transformer; parameter names and math identical to HF LlamaForCausalLM.

Read top to bottom: config, RMSNorm, rotary embeddings, attention (GQA + KV cache), SwiGLU MLP, block, model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xiaolm.errors import XiaolmError


@dataclass
class LlamaConfig:
    """Model shape; `ffn_dim=None` picks the usual SwiGLU width (≈ 8/3·dim, rounded up to 64)."""

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
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim or 64 * math.ceil(8 * self.dim / 3 / 64)

    def check(self) -> None:
        """Refuse shapes that cannot work, naming the clashing fields."""
        if self.dim % self.n_heads:
            raise XiaolmError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise XiaolmError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise XiaolmError(f"head dim dim/n_heads={self.head_dim} must be even for rotary embeddings")

    def hf_config(self, torch_dtype: str = "float32") -> dict:
        """A transformers LlamaConfig dict for config.json."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype, "dtype": torch_dtype, "use_cache": True,
        }

    @classmethod
    def from_hf_config(cls, d: dict) -> LlamaConfig:
        """Inverse of hf_config()."""
        if d.get("model_type") != "llama":
            raise XiaolmError(f"config.json describes model_type={d.get('model_type')!r}, not 'llama'",
                              hint="xiaolm loads Llama-architecture models")
        rope = (d.get("rope_parameters") or {}).get("rope_theta", d.get("rope_theta", 10000.0))
        eos = d.get("eos_token_id", 0)
        return cls(vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
                   n_heads=d["num_attention_heads"], n_kv_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
                   ffn_dim=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 512),
                   rope_theta=float(rope), norm_eps=d.get("rms_norm_eps", 1e-5),
                   tie_embeddings=d.get("tie_word_embeddings", True),
                   eos_token_id=eos[0] if isinstance(eos, list) else (eos if eos is not None else 0),
                   pad_token_id=d.get("pad_token_id") or 0, bos_token_id=d.get("bos_token_id"))


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 as HF does."""

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
    """cos/sin of shape [max_len, head_dim] in HF's half-split ("rotate_half") layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys/values per layer, [B, n_kv_heads, max_len, head_dim]; `length` tokens are filled."""

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's k/v for `layer` and return everything cached so far."""
        t = k.shape[2]
        self.k[layer][:, :, self.length:self.length + t] = k
        self.v[layer][:, :, self.length:self.length + t] = v
        end = self.length + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention: n_kv_heads key/value heads shared by n_heads query heads."""

    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, self.cfg.n_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.cfg.n_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.cfg.n_kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        groups = self.cfg.n_heads // self.cfg.n_kv_heads
        if groups > 1:  # expand shared kv heads to match the query heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if mask is None:
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

    def forward(self, x, cos, sin, cache, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, blocks and final norm: HF's `model.` prefix."""

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
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        # GPT-2 style: scale residual projections so the residual stream's variance stays ~1 with depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """An empty cache for generation."""
        p = self.model.embed_tokens.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, device or p.device, dtype or p.dtype)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B,T,V] and, given already-shifted targets, mean cross-entropy over targets != -100.

        With a kv_cache, positions continue from cache.length. attn_mask (bool [B,1,T,S], True = attend)
        overrides the causal mask, for left-padded batches.
        """
        b, t = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + t > self.cfg.max_seq_len:
            raise XiaolmError(f"sequence of {start + t} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.model.embed_tokens(input_ids)
        cos = self.rope_cos[start:start + t].to(x.dtype)
        sin = self.rope_sin[start:start + t].to(x.dtype)
        mask = attn_mask
        if mask is None and kv_cache is not None and start > 0 and t > 1:
            # chunked prefill after earlier tokens: causal within the chunk, full view of the cache
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
        for block in self.model.layers:
            x = block(x, cos, sin, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.length += t
        x = self.model.norm(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embeddings else n


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (matmul params, fwd+bwd) + 12·L·dim·T (attention scores), as in PaLM."""
    n = cfg.n_layers * (2 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim
                        + 3 * cfg.dim * cfg.hidden_dim) + cfg.dim * cfg.vocab_size
    return 6 * n + 12 * cfg.n_layers * cfg.dim * seq_len
