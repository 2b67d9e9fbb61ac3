"""The base of every architecture's config: `arch` names the registry entry that builds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ModelConfig:
    """`model.arch` picks the architecture (and so the config class) when a config file is parsed."""

    arch: str = "llama"

    @classmethod
    def config_variant(cls, data: Any) -> type:
        """The config class that `data` (a mapping with an optional `arch`) describes."""
        from xiaolm.model.registry import config_class

        arch = data.get("arch") if isinstance(data, dict) else None
        return config_class(arch) if arch else cls
