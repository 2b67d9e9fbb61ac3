"""Model files: safetensors weights + HF config.json; load from a run dir or an HF dir; export to HF layout."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_write_json
from xiaolm.model.llama import Llama, LlamaConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def save_model_weights(model: Llama, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write model.safetensors (HF names; tied lm_head omitted) and config.json, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    tmp = out_dir / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / "model.safetensors")
    atomic_write_json(out_dir / "config.json", model.cfg.hf_config(DTYPE_NAMES[dtype]))


def resolve_model_dir(path: str | Path) -> tuple[Path, Path | None]:
    """(weights dir, tokenizer dir or None) for a run dir (via `latest`) or an HF model dir."""
    path = Path(path)
    if (path / "latest").is_file():
        ckpt = path / "checkpoints" / (path / "latest").read_text(encoding="utf-8").strip()
        tok = path / "tokenizer"
        return ckpt, tok if (tok / "tokenizer.json").is_file() else None
    if (path / "config.json").is_file():
        return path, path if (path / "tokenizer.json").is_file() else None
    raise XiaolmError("not a model: expected a run dir (with `latest`) or an HF model dir (with config.json)",
                      where=str(path), hint="pass a training run dir or an exported model dir")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(Llama, tokenizer or None) from a run dir or an HF model dir; safetensors only."""
    weights_dir, tok_dir = resolve_model_dir(path)
    cfg_path, st_path = weights_dir / "config.json", weights_dir / "model.safetensors"
    if not cfg_path.is_file() or not st_path.is_file():
        raise XiaolmError("model files missing (config.json, model.safetensors)", where=str(weights_dir))
    cfg = LlamaConfig.from_hf_config(json.loads(cfg_path.read_text(encoding="utf-8")))
    model = Llama(cfg)
    state = load_file(str(st_path))
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise XiaolmError(f"weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})",
                          where=str(st_path), hint="the checkpoint belongs to a different model shape")
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    tokenizer = None
    if tok_dir is not None:
        from xiaolm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok_dir)
    return model, tokenizer


def export_hf(source: str | Path, out_dir: str | Path, dtype: str = "fp32") -> Path:
    """Write an HF model dir (weights, config, tokenizer, generation_config) that transformers loads as is."""
    if dtype not in DTYPES:
        raise XiaolmError(f"unknown dtype {dtype!r}", hint="choose fp32, fp16 or bf16")
    model, tokenizer = load_model(source)
    _, tok_dir = resolve_model_dir(source)
    if tok_dir is None:
        raise XiaolmError("no tokenizer found next to the model", where=str(source))
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_weights(model, tmp, DTYPES[dtype])
    for f in tok_dir.iterdir():
        if f.is_file() and f.name not in ("_SUCCESS", "config.yaml"):
            shutil.copy2(f, tmp / f.name)
    stops = [i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id)
             if i is not None and i != tokenizer.unk_token_id]
    atomic_write_json(tmp / "generation_config.json", {
        "eos_token_id": stops, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1, "max_new_tokens": 256,
    })
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.info("export: wrote %s (%s, %.2fM parameters)", out_dir, dtype, model.num_params() / 1e6)
    return out_dir
