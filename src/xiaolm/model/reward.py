"""Reward models: a causal-LM backbone with a scalar head on the last token, saved as HF sequence classification.

The exported directory is what `transformers.AutoModelForSequenceClassification` (num_labels=1) loads without
remote code: the backbone's weights under `model.`, the head as `score.weight`, no `lm_head`. transformers scores
the rightmost token that is not padding, so sequences end at the answer's last token (`<|im_end|>`) and are
right-padded: ours reads the same position.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_open, atomic_write_json
from xiaolm.model.registry import base_model, build_model_from_config, config_from_hf

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
        return SCORE in load_file(str(weights_dir / HEADS))
    config = weights_dir / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_reward_head(weights_dir: Path) -> tuple[nn.Module, torch.Tensor]:
    """(backbone, score weight [1, dim]) of a reward checkpoint or of an HF sequence-classification dir."""
    from xiaolm.model.export import load_model

    if (weights_dir / HEADS).is_file():
        lm, _ = load_model(weights_dir, with_tokenizer=False)
        return lm, load_file(str(weights_dir / HEADS))[SCORE]
    hf = json.loads((weights_dir / "config.json").read_text(encoding="utf-8"))
    if hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
        raise XiaolmError("a reward model has one output, this classifier has more", where=str(weights_dir),
                          hint="train it with `xiaolm reward` or export with num_labels=1")
    state = load_file(str(weights_dir / "model.safetensors"))
    if SCORE not in state:
        raise XiaolmError(f"no {SCORE} in model.safetensors", where=str(weights_dir))
    score = state.pop(SCORE)
    cfg = config_from_hf(hf, where=str(weights_dir / "config.json"))
    lm = build_model_from_config(cfg)
    missing, unexpected = lm.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # the head of a reward model is `score`
    if missing or unexpected:
        raise XiaolmError(f"weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})",
                          where=str(weights_dir))
    return lm, score


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Any]:
    """(reward model in eval mode, tokenizer or None) from a `xiaolm reward` run dir or an exported one."""
    from xiaolm.chat_format import load_tokenizer
    from xiaolm.model.export import resolve_model_dir

    weights_dir, tok_dir = resolve_model_dir(path)
    if not is_reward_dir(weights_dir):
        raise XiaolmError("not a reward model (no score head)", where=str(path),
                          hint="pass a `xiaolm reward` run dir or an AutoModelForSequenceClassification dir")
    lm, score = load_reward_head(weights_dir)
    model = RewardModel(lm)
    with torch.no_grad():
        model.score.weight.copy_(score)
    tokenizer = load_tokenizer(tok_dir) if tok_dir is not None else None
    return model.to(device).eval(), tokenizer
