"""The base of every architecture's config: `arch` names the registry entry that builds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from xiaolm.errors import XiaolmError

WHERE = "model config"


@dataclass
class ModelConfig:
    """`model.arch` picks the architecture (and so the config class) when a config file is parsed.

    Each architecture's config subclasses this with its own `arch` default, which registers it here.
    """

    arch: str = "llama"
    variants: ClassVar[dict[str, type[ModelConfig]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ModelConfig.variants[cls.arch] = cls

    @classmethod
    def config_variant(cls, data: Any) -> type:
        """The config class that `data` (a mapping with an optional `arch`) describes."""
        arch = data.get("arch") if isinstance(data, dict) else None
        if arch is None:
            return cls
        if arch not in ModelConfig.variants:
            raise XiaolmError(f"unknown model.arch={arch!r}", where="model.arch",
                              hint=f"use one of {', '.join(sorted(ModelConfig.variants))}")
        return ModelConfig.variants[arch]

    def check_positive(self, *names: str) -> None:
        """Refuse a shape field that is not positive, naming it."""
        for name in names:
            if getattr(self, name) <= 0:
                raise XiaolmError(f"model.{name}={getattr(self, name)} must be positive", where=WHERE)

    def check_token_ids(self) -> None:
        """Refuse an eos, pad or bos id outside the vocabulary, naming it."""
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise XiaolmError(f"model.{name}={value} is outside the vocabulary "
                                  f"(model.vocab_size={self.vocab_size})", where=WHERE)
