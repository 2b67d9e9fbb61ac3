"""The T5 model's shape (`model.arch=t5`) and its HF config.json; the model is in model/t5.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from xiaolm.errors import XiaolmError
from xiaolm.model.config import WHERE, ModelConfig


@dataclass
class T5Config(ModelConfig):
    """Model shape: `n_layers` encoder blocks and `n_decoder_layers` (None = as many) decoder blocks."""

    arch: str = "t5"
    vocab_size: int = 8192
    dim: int = 256  # d_model
    n_layers: int = 4
    n_decoder_layers: int | None = None
    n_heads: int = 4
    head_dim: int = 64  # d_kv: T5 does not tie it to dim / n_heads
    ffn_dim: int = 1024  # d_ff of the ReLU feed-forward
    max_seq_len: int = 512  # the longest source, and the longest target
    num_buckets: int = 32
    max_distance: int = 128
    dropout: float = 0.0
    norm_eps: float = 1e-6
    eos_token_id: int = 0
    pad_token_id: int = 0  # also the decoder's start token
    bos_token_id: int | None = None
    tie_embeddings: ClassVar[bool] = True
    encoder_decoder: ClassVar[bool] = True

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    @property
    def inner_dim(self) -> int:
        return self.n_heads * self.head_dim

    def check(self) -> None:
        """Refuse shapes that cannot work, naming the field."""
        self.check_positive("vocab_size", "dim", "n_layers", "decoder_layers", "n_heads", "head_dim", "ffn_dim",
                            "max_seq_len", "num_buckets", "max_distance")
        if not 0 <= self.dropout < 1:
            raise XiaolmError(f"model.dropout={self.dropout} must be in [0, 1)", where=WHERE)
        self.check_token_ids()

    def hf_config(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A transformers T5Config dict for config.json."""
        return {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "vocab_size": self.vocab_size,
            "d_model": self.dim,
            "d_kv": self.head_dim,
            "d_ff": self.ffn_dim,
            "num_layers": self.n_layers,
            "num_decoder_layers": self.decoder_layers,
            "num_heads": self.n_heads,
            "relative_attention_num_buckets": self.num_buckets,
            "relative_attention_max_distance": self.max_distance,
            "dropout_rate": self.dropout,
            "layer_norm_epsilon": self.norm_eps,
            "initializer_factor": 1.0,
            "feed_forward_proj": "relu",
            "is_encoder_decoder": True,
            "tie_word_embeddings": True,
            "n_positions": self.max_seq_len,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "decoder_start_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype,  # transformers 4.x
            "dtype": torch_dtype,  # transformers 5.x
            "use_cache": True,
        }

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], where: str | None = None) -> T5Config:
        """Inverse of hf_config(); refuses T5 variants this model does not compute (gated, untied)."""
        archs = d.get("architectures") or ["T5ForConditionalGeneration"]
        if d.get("model_type") != "t5" or "T5ForConditionalGeneration" not in archs:
            raise XiaolmError(f"config.json describes {d.get('model_type')!r} / {archs}, not a T5 text-to-text "
                              "model", where=where, hint="xiaolm loads T5ForConditionalGeneration models")
        missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
                   if not isinstance(d.get(k), int)]
        if missing:
            raise XiaolmError(f"config.json lacks integer field(s) {', '.join(missing)}", where=where)
        unsupported = []
        if d.get("feed_forward_proj", "relu") != "relu":
            unsupported.append(f"feed_forward_proj={d['feed_forward_proj']!r} (xiaolm's T5 has the ReLU one)")
        if d.get("tie_word_embeddings") is False:
            unsupported.append("tie_word_embeddings=false (T5 v1.1's unscaled output)")
        if d.get("decoder_start_token_id", d.get("pad_token_id")) != d.get("pad_token_id"):
            unsupported.append("decoder_start_token_id ≠ pad_token_id")
        if unsupported:
            raise XiaolmError(f"config.json uses T5 features xiaolm's T5 lacks: {', '.join(unsupported)}",
                              where=where)
        eos = d.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        pad = d.get("pad_token_id")
        if not isinstance(eos, int) or not isinstance(pad, int):
            raise XiaolmError("config.json needs integer eos_token_id and pad_token_id", where=where)
        return cls(vocab_size=d["vocab_size"], dim=d["d_model"], n_layers=d["num_layers"],
                   n_decoder_layers=None if d.get("num_decoder_layers") in (None, d["num_layers"])
                   else d["num_decoder_layers"], n_heads=d["num_heads"], head_dim=d["d_kv"],
                   ffn_dim=d["d_ff"], max_seq_len=d.get("n_positions") or 512,
                   num_buckets=d.get("relative_attention_num_buckets", 32),
                   max_distance=d.get("relative_attention_max_distance", 128),
                   dropout=d.get("dropout_rate", 0.0), norm_eps=d.get("layer_norm_epsilon", 1e-6),
                   eos_token_id=eos, pad_token_id=pad, bos_token_id=d.get("bos_token_id"))
