"""LoRA adapters (through peft) and frozen parts: what a training stage trains besides whole models.

Our module names match HF's, so an adapter trained here is a plain peft adapter: it loads with
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_open, atomic_write_json

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraSettings:
    """LoRA on the attention and MLP projections; r=0 trains the whole model instead."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)  # module names; empty → the architecture's projections


def is_lora(model: nn.Module) -> bool:
    """Whether the model carries peft LoRA adapters."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def apply_lora(model: nn.Module, settings: LoraSettings, default_targets: tuple[str, ...]) -> nn.Module:
    """Wrap the model with fresh LoRA adapters; only the adapters train (the base is frozen by peft)."""
    from peft import LoraConfig, get_peft_model

    if settings.r <= 0:
        raise XiaolmError(f"lora.r={settings.r} must be positive to add adapters", where="lora.r")
    targets = list(settings.targets or default_targets)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise XiaolmError(f"lora.targets {unknown} name no module of this model", where="lora.targets",
                          hint=f"use some of {', '.join(default_targets)}")
    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets)
    return get_peft_model(model, cfg)


def freeze(model: nn.Module, spec: list[str], groups: dict[str, tuple[str, ...]]) -> list[str]:
    """Stop gradients for the named parts (`embeddings`, `lm_head`, `norm`, `layers.0-3`); returns what froze."""
    prefixes: list[str] = []
    for item in spec:
        m = re.fullmatch(r"((?:\w+\.)?)layers[.:](\d+)(?:-(\d+))?", item)
        if m:
            lo, hi = int(m.group(2)), int(m.group(3) or m.group(2))
            keys = [f"{m.group(1)}layers.{i}" for i in range(lo, hi + 1)]
        else:
            keys = [item]
        for key in keys:
            if key not in groups:
                named = sorted(k for k in groups if "layers." not in k)
                stacks = {k.rsplit("layers.", 1)[0] for k in groups if "layers." in k}
                ranges = [f"{s}layers.N-M ({s}layers 0 … {sum(k.startswith(s + 'layers.') for k in groups) - 1})"
                          for s in sorted(stacks)]
                raise XiaolmError(f"freeze={item!r}: no such part", where="freeze",
                                  hint=f"use {', '.join(named + ranges)}")
            prefixes.extend(groups[key])
    frozen = []
    for name, p in model.named_parameters():
        if name.startswith(tuple(prefixes)):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights alone, under peft's saved names."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Put saved adapter weights back into a model wrapped with the same LoRA settings."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise XiaolmError(f"adapter weights do not fit this model ({result.unexpected_keys[:3]})", where=where,
                          hint="resume with the lora.* settings the run was started with")


def save_adapter(state: dict[str, torch.Tensor], model: nn.Module, out_dir: str | Path,
                 base_model: str | None) -> None:
    """Write peft's adapter_config.json + adapter_model.safetensors, loadable by PeftModel.from_pretrained."""
    from safetensors.torch import save as safetensors_bytes

    out_dir = Path(out_dir)
    peft_cfg = model.peft_config["default"].to_dict()
    peft_cfg.update(task_type="CAUSAL_LM", base_model_name_or_path=base_model, inference_mode=True)
    peft_cfg.pop("auto_mapping", None)  # names our Python class: HF's classes load the adapter instead
    peft_cfg = json.loads(json.dumps(peft_cfg, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    state = {k: v.contiguous() for k, v in state.items()}
    with atomic_open(out_dir / ADAPTER_WEIGHTS, "wb") as f:
        f.write(safetensors_bytes(state, metadata={"format": "pt"}))
    atomic_write_json(out_dir / ADAPTER_CONFIG, peft_cfg)


def load_adapter(base: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """The base model with the adapter in adapter_dir attached (peft), ready to merge or to train on."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    try:
        saved: dict[str, Any] = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise XiaolmError(f"adapter_config.json is unreadable: {e}", where=str(adapter_dir)) from None
    settings = LoraSettings(r=saved["r"], alpha=saved["lora_alpha"], dropout=saved.get("lora_dropout", 0.0),
                            targets=sorted(saved["target_modules"]))
    model = apply_lora(base, settings, tuple(settings.targets))
    load_lora_state_dict(model, load_file(str(adapter_dir / ADAPTER_WEIGHTS)), str(adapter_dir))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """The plain model with each adapter folded into its weight (W + B·A·alpha/r), every weight trainable again
    (peft froze the base), as any loaded model is."""
    return model.merge_and_unload().requires_grad_(True)
