"""Model files: safetensors weights + HF config.json; load from a run dir or an HF dir; export to HF layout.

Only safetensors is ever read for weights: unlike pickle it cannot run code, so a downloaded model is safe.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from xiaolm.chat_format import EOS, IM_END, load_tokenizer
from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_open, atomic_write_json
from xiaolm.model.adapters import ADAPTER_CONFIG, load_adapter, merge_lora
from xiaolm.model.registry import build_model_from_config, config_from_hf
from xiaolm.model.reward import HEADS, SCORE, RewardModel, is_reward_dir, save_reward_model

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# what AutoTokenizer reads; copied verbatim so the exported tokenizer is byte-identical to the trained one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def save_model_weights(model: nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write model.safetensors (HF names; a tied lm_head omitted, as HF does) and config.json, atomically."""
    save_weights(model.state_dict(), model.cfg, out_dir, dtype or next(model.parameters()).dtype)


def save_weights(state: dict[str, torch.Tensor], cfg: Any, out_dir: str | Path,
                 dtype: torch.dtype = torch.float32) -> None:
    """save_model_weights for a state dict already gathered (e.g. from a sharded model)."""
    out_dir = Path(out_dir)
    if dtype not in DTYPE_NAMES:
        raise XiaolmError(f"cannot save weights as {dtype}", hint="use float32, float16 or bfloat16")
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    if cfg.tie_embeddings:
        # safetensors refuses two names for one storage; HF re-ties lm_head from embed_tokens on load
        state.pop("lm_head.weight", None)
    with atomic_open(out_dir / WEIGHTS, "wb") as f:
        f.write(safetensors_bytes(state, metadata={"format": "pt"}))
    atomic_write_json(out_dir / CONFIG, cfg.hf_config(DTYPE_NAMES[dtype]))


def resolve_model_dir(path: str | Path) -> tuple[Path, Path | None]:
    """(weights dir, tokenizer dir or None) for a run dir (via its `latest` file) or an HF model dir."""
    path = Path(path)
    if not path.is_dir():
        raise XiaolmError("no such model directory", where=str(path),
                          hint="pass a training run dir or an exported model dir")
    if (path / "latest").is_file():
        name = (path / "latest").read_text(encoding="utf-8").strip()
        ckpt = path / "checkpoints" / name
        if not name or not ckpt.is_dir():
            raise XiaolmError(f"`latest` names checkpoint {name!r}, which is not in checkpoints/",
                              where=str(path), hint="the run was moved or pruned; point at a checkpoint dir")
        tok = path / "tokenizer"
        return ckpt, tok if (tok / "tokenizer.json").is_file() else None
    if (path / CONFIG).is_file() or (path / ADAPTER_CONFIG).is_file():
        if (path / "tokenizer.json").is_file():
            return path, path
        # a checkpoint inside a run dir (run/best, run/checkpoints/step-N) uses the run's tokenizer
        for run in (path.parent, path.parent.parent):
            if (run / "tokenizer" / "tokenizer.json").is_file():
                return path, run / "tokenizer"
        return path, None
    raise XiaolmError("not a model: expected a run dir (with `latest`) or an HF model dir (with config.json)",
                      where=str(path), hint="pass a training run dir or an exported model dir")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               with_tokenizer: bool = True) -> tuple[nn.Module, PreTrainedTokenizerFast | None]:
    """(model in eval mode, tokenizer or None) from a run dir or an HF model dir; safetensors only.

    A LoRA checkpoint (adapter only) is loaded onto its base model and merged into it.
    """
    weights_dir, tok_dir = resolve_model_dir(path)
    if (weights_dir / ADAPTER_CONFIG).is_file() and not (weights_dir / WEIGHTS).is_file():
        model = merge_lora(load_adapter(_adapter_base(weights_dir), weights_dir))
    else:
        model = _load_weights(weights_dir)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    tokenizer = load_tokenizer(tok_dir) if tok_dir is not None and with_tokenizer else None
    return model, tokenizer


def _adapter_base(adapter_dir: Path) -> nn.Module:
    """The base model an adapter was trained on (adapter_config.json's base_model_name_or_path)."""
    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise XiaolmError(f"the adapter's base model {base!r} is not a directory here", where=str(adapter_dir),
                          hint="edit base_model_name_or_path in adapter_config.json to the base model's dir")
    return load_model(base, with_tokenizer=False)[0]


def _load_weights(weights_dir: Path) -> nn.Module:
    """The registry model described by weights_dir/config.json, with its model.safetensors."""
    cfg_path, st_path = weights_dir / CONFIG, weights_dir / WEIGHTS
    if not cfg_path.is_file():
        raise XiaolmError("config.json is missing", where=str(weights_dir))
    if not st_path.is_file():
        hint = "sharded checkpoints are not supported" if (weights_dir / f"{WEIGHTS}.index.json").is_file() \
            else "xiaolm reads model.safetensors only (never pickle .bin files)"
        raise XiaolmError("model.safetensors is missing", where=str(weights_dir), hint=hint)
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise XiaolmError(f"config.json is unreadable: {e}", where=str(cfg_path)) from None
    if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
        raise XiaolmError("this is a reward model (sequence classification), not a causal LM", where=str(weights_dir),
                          hint="use it where a reward model is asked for; chat and generation need a causal LM")
    cfg = config_from_hf(hf, where=str(cfg_path))
    model = build_model_from_config(cfg)
    try:
        state = load_file(str(st_path))
    except (OSError, SafetensorError) as e:
        raise XiaolmError(f"model.safetensors is unreadable: {e}", where=str(st_path)) from None
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # some writers keep the tied copy; ours is the embedding itself
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise XiaolmError(f"weights do not fit config.json: {str(e).splitlines()[-1].strip()}",
                          where=str(st_path)) from None
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise XiaolmError(f"weights do not match config.json (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})",
                          where=str(st_path), hint="the checkpoint belongs to a different model shape")
    return model


def generation_config(model: nn.Module, tokenizer: PreTrainedTokenizerFast | None) -> dict:
    """generation_config.json: stop at <|im_end|> or <|endoftext|>; sampling defaults as `xiaolm chat`."""
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    stops = [vocab[t] for t in (IM_END, EOS) if t in vocab] or [model.cfg.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None \
        else model.cfg.pad_token_id
    start = {"decoder_start_token_id": model.cfg.pad_token_id} if getattr(model.cfg, "encoder_decoder", False) else {}
    return {"bos_token_id": model.cfg.bos_token_id, "eos_token_id": stops, "pad_token_id": pad, **start,
            "do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1,
            "max_new_tokens": 256}


def export_hf(source: str | Path, out_dir: str | Path, dtype: str = "fp32", merge: bool = False) -> Path:
    """Write an HF model dir (weights, config, tokenizer, generation_config) that transformers loads as is.

    A LoRA run exports its base model plus the adapter in `adapter/` (peft loads it onto the base), or with
    merge=True one plain model with the adapter folded in.
    """
    dtype = {"f32": "fp32", "f16": "fp16"}.get(dtype, dtype)  # GGUF's spellings
    if dtype not in DTYPES:
        raise XiaolmError(f"unknown dtype {dtype!r} for --format hf", hint="choose fp32, fp16 or bf16 "
                          "(q8_0 is for --format gguf)" if dtype == "q8_0" else "choose fp32, fp16 or bf16")
    weights_dir, tok_dir = resolve_model_dir(source)
    reward = is_reward_dir(weights_dir)  # a reward run: one AutoModelForSequenceClassification (adapters merged)
    adapter = (weights_dir / ADAPTER_CONFIG).is_file() and not (weights_dir / WEIGHTS).is_file() and not merge \
        and not reward
    if reward:
        reward_model, tokenizer = load_reward_model(source)
        model = reward_model.lm
    elif adapter:
        model = _adapter_base(weights_dir)
        tokenizer = load_tokenizer(tok_dir) if tok_dir is not None else None
    else:
        model, tokenizer = load_model(source)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # build the whole directory beside the target, then swap it in: readers never see a half export
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if reward:
            save_reward_model(model.state_dict(), reward_model.score.weight, model.cfg, tmp, DTYPES[dtype])
        else:
            save_model_weights(model, tmp, DTYPES[dtype])
        if tok_dir is None:
            log.warning("export: no tokenizer next to %s; the export will have weights only", source)
        else:
            for name in TOKENIZER_FILES:
                if (tok_dir / name).is_file():
                    shutil.copy2(tok_dir / name, tmp / name)
        atomic_write_json(tmp / "generation_config.json", generation_config(model, tokenizer))
        if adapter:
            _copy_adapter(weights_dir, tmp / "adapter", out_dir.resolve())
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("export: wrote %s (%s, %.2fM parameters%s)", out_dir, dtype, model.num_params() / 1e6,
             ", LoRA adapter in adapter/" if adapter else ", a reward model (sequence classification)" if reward
             else "")
    return out_dir


def _copy_adapter(src: Path, dst: Path, base: Path) -> None:
    """Copy a peft adapter dir, pointing its base_model_name_or_path at the exported base."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "adapter_model.safetensors", dst / "adapter_model.safetensors")
    cfg = json.loads((src / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    atomic_write_json(dst / ADAPTER_CONFIG, {**cfg, "base_model_name_or_path": str(base)})


def load_reward_head(weights_dir: Path) -> tuple[nn.Module, torch.Tensor]:
    """(backbone, score weight [1, dim]) of a reward checkpoint or of an HF sequence-classification dir."""
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
