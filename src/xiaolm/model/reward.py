"""Reward models: a causal-LM backbone with a scalar head on the last token, saved as HF sequence classification.

The exported directory is what `transformers.AutoModelForSequenceClassification` (num_labels=1) loads without
remote code: the backbone's weights under `model.`, the head as `score.weight`, no `lm_head`. transformers scores
the rightmost token that is not padding, so sequences end at the answer's last token (`<|im_end|>`) and are
right-padded: ours reads the same position. Loading one back: model/export.py's load_reward_model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from xiaolm.io import atomic_open, atomic_write_json
from xiaolm.model.loss import IGNORE
from xiaolm.model.registry import base_model

HEADS = "heads.safetensors"  # a training checkpoint's own modules beside the model (value or reward head)
SCORE = "score.weight"


class RewardModel(nn.Module):
    """`lm` (the registry model, perhaps with adapters) and `score`, a bias-free [1, dim] linear head."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.score = nn.Linear(base_model(lm).cfg.dim, 1, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)  # transformers' initializer_range

    def forward(self, input_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Rewards [B] of right-padded rows [B,T], each read at its index `last` [B]."""
        hidden = self.lm(input_ids, output="hidden")
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.score(hidden[rows, last]).squeeze(-1).float()


def answer_end(example: tuple[np.ndarray, np.ndarray]) -> int:
    """Index of the (input_ids, labels) example's last answer token (the position the reward head reads)."""
    labelled = (example[1] != IGNORE).nonzero()[0]
    return int(labelled[-1]) if len(labelled) else len(example[0]) - 1


def reward_batch(examples: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids [B,T] of each example up to its answer's end, and that end's index `last` [B]."""
    ends = [answer_end(e) for e in examples]
    x = torch.full((len(examples), max(ends) + 1), pad_id, dtype=torch.long)
    for i, ((ids, _), end) in enumerate(zip(examples, ends, strict=True)):
        x[i, :end + 1] = torch.as_tensor(ids[:end + 1])
    last = torch.tensor(ends)
    mask = torch.arange(x.shape[1])[None, :] <= last[:, None]
    return {"x": x, "last": last, "mask": mask}


def seq_cls_config(lm_config: dict[str, Any]) -> dict[str, Any]:
    """The causal LM's config.json turned into its sequence-classification twin with one label."""
    arch = lm_config["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")
    return {**lm_config, "architectures": [arch], "num_labels": 1, "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0}, "problem_type": "regression"}


def save_reward_model(lm_state: dict[str, torch.Tensor], score: torch.Tensor, cfg: Any, out_dir: str | Path,
                      dtype: torch.dtype = torch.float32) -> None:
    """Write model.safetensors (backbone + score.weight, no lm_head) and config.json, atomically."""
    out_dir = Path(out_dir)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in lm_state.items() if not k.startswith("lm_head.")}
    state[SCORE] = score.detach().to("cpu", dtype).contiguous()
    with atomic_open(out_dir / "model.safetensors", "wb") as f:
        f.write(safetensors_bytes(state, metadata={"format": "pt"}))
    atomic_write_json(out_dir / "config.json", seq_cls_config(cfg.hf_config(str(dtype).removeprefix("torch."))))


def is_reward_dir(weights_dir: Path) -> bool:
    """Whether a weights dir holds a reward model: a checkpoint with a score head, or a seq-cls export."""
    if (weights_dir / HEADS).is_file():
        with safe_open(str(weights_dir / HEADS), "pt") as heads:  # the header's names only, no tensor read
            return SCORE in heads.keys()
    config = weights_dir / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)
