"""One path from a training config to a finished run, shared by every training stage.

Device and process group, the model (fresh or from init_from), LoRA adapters and frozen parts, then the
stage's objective through the one loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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
T = TypeVar("T")


def record_splits(cfg: TrainConfig, stage: str, kind: str, layout: str, start: str,
                  convert: Callable[[Any, dict], T]) -> tuple[str, Any, list[T], list[T]]:
    """(tokenizer dir, tokenizer, training items, validation items) of a stage that starts from init_from and reads
    records of `kind` (their `layout` is said in errors): convert(tokenizer, record) makes each item or raises
    Unusable; such records go to the run's rejects.jsonl. Validation: data.val_path, else a val_fraction split."""
    from xiaolm.records.read import convert_records
    from xiaolm.records.rejects import RejectLog
    from xiaolm.tokenizer import load_tokenizer
    from xiaolm.train.pretrain import split_paths
    from xiaolm.train.sft import pad_token_id, resolve_tokenizer_dir, split_held_out

    if not cfg.init_from:
        raise XiaolmError(f"{stage} starts from a trained model, but init_from is empty", where="init_from",
                          hint=f"set init_from to {start} run dir or an HF causal-LM dir")
    if not cfg.data.path:
        raise XiaolmError("data.path is empty", where="config", hint=f"set data.path to {kind} JSONL: {layout}")
    tokenizer_dir = resolve_tokenizer_dir(cfg)
    tokenizer = load_tokenizer(tokenizer_dir)
    pad_token_id(tokenizer, tokenizer_dir)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    main = int(os.environ.get("RANK", "0")) == 0
    with RejectLog(out / "rejects.jsonl" if main else None) as rejects:
        def load(paths: str) -> list[T]:
            return convert_records(split_paths(paths), lambda record: convert(tokenizer, record), rejects)

        items = load(cfg.data.path)
        if cfg.data.val_path:
            train_set, val = items, load(cfg.data.val_path)
        else:
            train_set, val = split_held_out(items, cfg.data.val_fraction, cfg.seed)
    if rejects.total:
        log.warning("%s: %d records rejected (%s) — see %s", stage, rejects.total, rejects.summary(),
                    out / "rejects.jsonl")
    if not train_set or not val:
        raise XiaolmError(f"need training and validation {kind}s, got {len(train_set)} and {len(val)}",
                          where=cfg.data.path, hint=f"records must be {layout}; see {out / 'rejects.jsonl'}")
    log.info("%s: %d training %ss, %d validation %ss", stage, len(train_set), kind, len(val), kind)
    return tokenizer_dir, tokenizer, train_set, val


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
