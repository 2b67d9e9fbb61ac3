"""The frozen reference policy of the preference and RL stages (`dpo`, `ppo`, `grpo`).

Either a frozen copy of the starting model (`copy`: a second model in memory), or, in a LoRA run, the same model
with its adapters switched off (`adapter`: peft's `disable_adapter()`, no second copy, as TRL does with peft).
`auto` picks `adapter` when the run has LoRA adapters, else `copy`.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.model.adapters import is_lora

log = logging.getLogger(__name__)

MODES = ("auto", "copy", "adapter")


def peft_inside(module: nn.Module) -> nn.Module | None:
    """The peft model inside DDP (`.module`) or an objective's wrapper (`.lm`), or None without LoRA."""
    while not is_lora(module):
        inner = getattr(module, "module", None) or getattr(module, "lm", None)
        if not isinstance(inner, nn.Module):
            return None
        module = inner
    return module


class Reference:
    """Per-token log-probs of the reference policy; `setup` builds it from the starting model."""

    def __init__(self, mode: str, where: str):
        if mode not in MODES:
            raise XiaolmError(f"{where}={mode!r}", where=where, hint=f"use one of {', '.join(MODES)}")
        self.mode, self.where = mode, where
        self.copy: nn.Module | None = None

    def setup(self, model: nn.Module) -> str:
        """Resolve `auto`, make the frozen copy if asked; returns the mode used."""
        lora = peft_inside(model) is not None
        if self.mode == "auto":
            self.mode = "adapter" if lora else "copy"
        if self.mode == "adapter" and not lora:
            raise XiaolmError(f"{self.where}=adapter needs LoRA adapters", where=self.where,
                              hint="set lora.r > 0, or use the copy reference")
        if self.mode == "copy":
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)
        log.info("reference policy: %s", "a frozen copy" if self.copy is not None else "the adapter-disabled base")
        return self.mode

    @torch.no_grad()
    def logprobs(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p_ref(y | x) per token [B,T] (0 where y is -100); `module` is the trained one (adapter mode)."""
        if self.copy is not None:
            return self.copy(x, y, output="logprobs")
        peft = peft_inside(module)
        with peft.disable_adapter():
            return peft(x, y, output="logprobs")
