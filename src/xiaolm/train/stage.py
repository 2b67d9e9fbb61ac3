"""One path from a training config to a finished run, shared by every training stage.

Device and process group, the model (fresh or from init_from), LoRA adapters and frozen parts, then the
stage's objective through the one loop.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xiaolm.device import resolve_device
from xiaolm.errors import XiaolmError
from xiaolm.model.adapters import apply_lora, freeze
from xiaolm.model.registry import build_model_from_config, get_arch
from xiaolm.train import distributed
from xiaolm.train.config import TrainConfig
from xiaolm.train.distributed import DistContext
from xiaolm.train.loop import train
from xiaolm.train.objective import Objective

log = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device) -> tuple[TrainConfig, nn.Module]:
    """(the config with the model shape the run really has, the model): fresh from cfg.model, or the weights
    of cfg.init_from (its architecture wins). cfg itself is left as it was."""
    if cfg.init_from:
        from xiaolm.model.export import load_model

        model, _ = load_model(cfg.init_from, with_tokenizer=False)
        if model.cfg.vocab_size < vocab_size:
            raise XiaolmError(f"init_from model has vocab_size {model.cfg.vocab_size} but the tokenizer has "
                              f"{vocab_size}", where="init_from", hint="use the tokenizer the model was trained with")
        model_cfg = model.cfg
    else:
        model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab_size)
        model_cfg.check()
        torch.manual_seed(cfg.seed)
        model = build_model_from_config(model_cfg)
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise XiaolmError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}",
                          hint="lower data.seq_len or raise model.max_seq_len (fresh models only)")
    return dataclasses.replace(cfg, model=model_cfg), model.to(device)


def trainable_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The model with cfg.freeze's parts frozen and, when lora.r > 0, LoRA adapters (then only they train)."""
    arch = get_arch(model.cfg.arch)
    if cfg.freeze:
        frozen = freeze(model, cfg.freeze, arch.freeze_groups(model.cfg))
        log.info("frozen: %s (%d tensors)", ", ".join(cfg.freeze), len(frozen))
    if cfg.lora.r > 0:
        if not cfg.init_from:
            raise XiaolmError("lora.r > 0 but no init_from: LoRA adapts a trained model", where="lora.r",
                              hint="set init_from to a run dir or HF model dir, or lora.r=0 to train everything")
        torch.manual_seed(cfg.seed)  # the adapters' random init: the same run gets the same adapters
        model = apply_lora(model, cfg.lora, arch.lora_targets)
    return model


def run_stage(cfg: TrainConfig, stage: str, tokenizer_dir: str | Path, vocab_size: int,
              make_objective: Callable[[TrainConfig, DistContext], Objective], resume: bool = False) -> dict[str, Any]:
    """Set up device, processes and model for `cfg`, build the stage's objective, and train it."""
    device = resolve_device(cfg.device)
    ctx = distributed.setup(device)
    device = distributed.rank_device(device, ctx)
    cfg, model = build_model(cfg, vocab_size, device)
    model = trainable_model(model, cfg)
    objective = make_objective(cfg, ctx)
    return train(cfg, objective, model, tokenizer_dir, resume=resume, stage=stage, ctx=ctx)
