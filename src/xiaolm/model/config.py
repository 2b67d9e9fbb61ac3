"""The base of every architecture's config: `arch` names the registry entry that builds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from xiaolm.errors import XiaolmError


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
