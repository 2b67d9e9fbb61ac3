"""Architectures by name: config class, model class, blocks, FLOPs per token, and loading from an HF dir.

Every place that needs "the model" goes through this table (training, export, generation, evaluation, config
parsing), so a new architecture is one entry here plus its model file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.model import t5
from xiaolm.model.llama import Llama, LlamaConfig, flops_per_token


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build it, find its repeated blocks, count its FLOPs, read its HF config."""

    name: str
    config_cls: type
    model_cls: type[nn.Module]
    hf_model_types: tuple[str, ...]  # config.json `model_type` values this entry loads
    blocks: Callable[[nn.Module], list[nn.Module]]  # compile, FSDP2 and activation checkpointing units
    flops_per_token: Callable[[Any, int], float]  # training FLOPs per token at a sequence length
    from_hf_config: Callable[..., Any]  # config.json dict → config
    lora_targets: tuple[str, ...]  # default LoRA target modules (HF names)
    freeze_groups: Callable[[Any], dict[str, tuple[str, ...]]]  # freeze= name → parameter name prefixes
    encoder_decoder: bool = False  # text to text: the prompt goes to an encoder, the reply comes from a decoder


def _llama_freeze_groups(cfg: LlamaConfig) -> dict[str, tuple[str, ...]]:
    groups = {"embeddings": ("model.embed_tokens.",), "norm": ("model.norm.",),
              "lm_head": ("lm_head.",) if not cfg.tie_embeddings else ("model.embed_tokens.",)}
    groups.update({f"layers.{i}": (f"model.layers.{i}.",) for i in range(cfg.n_layers)})
    return groups


def _t5_freeze_groups(cfg: t5.T5Config) -> dict[str, tuple[str, ...]]:
    groups = {"embeddings": ("shared.",), "lm_head": ("shared.",), "encoder": ("encoder.",), "decoder": ("decoder.",)}
    for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        groups.update({f"{stack}.layers.{i}": (f"{stack}.block.{i}.",) for i in range(n)})
    return groups


ARCHS: dict[str, Arch] = {
    "llama": Arch(
        name="llama", config_cls=LlamaConfig, model_cls=Llama, hf_model_types=("llama",),
        blocks=lambda m: list(m.model.layers), flops_per_token=flops_per_token,
        from_hf_config=LlamaConfig.from_hf_config,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        freeze_groups=_llama_freeze_groups,
    ),
    "t5": Arch(
        name="t5", config_cls=t5.T5Config, model_cls=t5.T5, hf_model_types=("t5",),
        blocks=lambda m: m.blocks(), flops_per_token=t5.flops_per_token, from_hf_config=t5.T5Config.from_hf_config,
        lora_targets=("q", "k", "v", "o", "wi", "wo"), freeze_groups=_t5_freeze_groups, encoder_decoder=True,
    ),
}


def get_arch(name: str) -> Arch:
    """The registry entry for `model.arch`, or an error listing the known ones."""
    if name not in ARCHS:
        raise XiaolmError(f"unknown model.arch={name!r}", where="model.arch", hint=f"use one of {', '.join(ARCHS)}")
    return ARCHS[name]


def arch_of(model: nn.Module) -> Arch:
    """The entry of a built model (unwrapping DDP, peft and objective wrappers)."""
    return get_arch(base_model(model).cfg.arch)


def base_model(module: nn.Module) -> nn.Module:
    """The registry model inside DDP (`.module`), an objective's wrapper (`.lm`) or a peft model."""
    while True:
        if isinstance(module, tuple(a.model_cls for a in ARCHS.values())):
            return module
        for attr in ("module", "lm", "base_model", "model"):
            inner = getattr(module, attr, None)
            if isinstance(inner, nn.Module):
                module = inner
                break
        else:
            raise XiaolmError(f"no registered model inside {type(module).__name__}",
                              hint="an objective's wrapper must keep the language model as `.lm`")


def build_model_from_config(cfg: Any) -> nn.Module:
    """A fresh model of cfg's architecture (the caller seeds torch first)."""
    return get_arch(cfg.arch).model_cls(cfg)


def config_from_hf(d: dict[str, Any], where: str | None = None) -> Any:
    """config.json → the config of the architecture whose HF model_type it names."""
    for arch in ARCHS.values():
        if d.get("model_type") in arch.hf_model_types:
            return arch.from_hf_config(d, where=where)
    known = sorted(t for a in ARCHS.values() for t in a.hf_model_types)
    raise XiaolmError(f"config.json describes model_type {d.get('model_type')!r}, which xiaolm cannot load",
                      where=where, hint=f"xiaolm loads model types {', '.join(known)}")
