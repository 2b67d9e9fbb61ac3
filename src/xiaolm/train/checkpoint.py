"""Checkpoints: atomic save (temp dir + rename, sha256 manifest), keep-last-K, exact resume, corruption fallback."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_open, atomic_write_json, atomic_write_text
from xiaolm.model.adapters import ADAPTER_CONFIG, is_lora, load_lora_state_dict, save_adapter
from xiaolm.model.export import load_model, save_weights
from xiaolm.model.reward import HEADS
from xiaolm.train.distributed import DistContext, barrier, full_state_dict, save_optimizer

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
OPTIMIZER_DIR = "optimizer"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Capture the Python, NumPy and torch RNG states as tensors/plain types (weights_only-loadable)."""
    np_state = np.random.get_state()
    return {
        "python": repr(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states captured by rng_state()."""
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], ctx: DistContext, keep_last: int = 2,
                    extra: dict[str, Any] | None = None, base_model: str | None = None) -> None:
    """Write checkpoints/step-N atomically, point `latest` at it, and prune older ones (every process calls it).

    Layout: the model parts (see save_model_parts), optimizer/ (a torch distributed checkpoint, one shard per
    process), state.pt (step, RNG, counters), manifest.json (sha256 of every file). On several machines
    checkpoints/ must be on storage they share.
    """
    ckpt_root = run_dir / "checkpoints"
    tmp = ckpt_root / f".tmp-step-{step}"
    if ctx.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".tmp-step-*"):  # left behind by a process killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier(ctx)
    weights = full_state_dict(model)
    save_optimizer(tmp / OPTIMIZER_DIR, model, optimizer)
    barrier(ctx)
    if ctx.is_main:
        save_model_parts(weights, model, tmp, base_model)
        torch.save(state, tmp / STATE_FILE)
        files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_json(tmp / MANIFEST, {"step": step, "files": files, **(extra or {})})
        final = ckpt_root / f"step-{step}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(run_dir / "latest", final.name + "\n")
        steps = sorted((int(p.name.split("-")[1]), p) for p in ckpt_root.glob("step-*")
                       if p.name.split("-")[1].isdigit())
        for _, old in steps[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)


def verify_checkpoint(ckpt: Path) -> bool:
    """True when the manifest exists and every listed file matches its sha256."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
        return all(_sha256(ckpt / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def find_resumable(run_dir: Path) -> Path | None:
    """Newest checkpoint whose checksums verify; corrupted ones are skipped with a warning."""
    ckpts = sorted(
        (p for p in (run_dir / "checkpoints").glob("step-*") if p.name.split("-")[1].isdigit()),
        key=lambda p: int(p.name.split("-")[1]), reverse=True,
    )
    for ckpt in ckpts:
        if verify_checkpoint(ckpt):
            return ckpt
        log.warning("checkpoint %s failed its checksum; falling back to an older one", ckpt)
    return None


def load_state(ckpt: Path) -> dict[str, Any]:
    """Load training state (step, RNG, counters) without unpickling arbitrary objects."""
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)


def split_parts(module: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(state-dict prefix of the language model, the language model, perhaps peft-wrapped) of a trained module."""
    lm = getattr(module, "lm", None)
    return ("lm.", lm) if isinstance(lm, torch.nn.Module) else ("", module)


def save_model_parts(state: dict[str, torch.Tensor], module: torch.nn.Module, out_dir: Path,
                     base_model: str | None) -> None:
    """Write a trained module's parts: HF weights (model.safetensors + config.json), or only the LoRA adapter
    (peft's adapter_config.json + adapter_model.safetensors over `base_model`), plus heads.safetensors."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save as safetensors_bytes

    from xiaolm.model.registry import base_model as registry_model

    prefix, lm = split_parts(module)
    lm_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if is_lora(lm):
        adapter = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(lm, state_dict=lm_state).items()}
        save_adapter(adapter, lm, out_dir, base_model)
    else:
        save_weights(lm_state, registry_model(lm).cfg, out_dir)
    heads = {k: v.detach().cpu().contiguous() for k, v in state.items() if not k.startswith(prefix)}
    if heads:
        with atomic_open(out_dir / HEADS, "wb") as f:
            f.write(safetensors_bytes(heads, metadata={"format": "pt"}))


def load_model_parts(module: torch.nn.Module, ckpt: Path) -> None:
    """Put the parts saved by save_model_parts back into a module built the same way (refusing another shape)."""
    from safetensors.torch import load_file

    from xiaolm.model.registry import base_model as registry_model

    prefix, lm = split_parts(module)
    if is_lora(lm) != (ckpt / ADAPTER_CONFIG).is_file():
        raise XiaolmError("the checkpoint and this run disagree on LoRA (adapters in one, not the other)",
                          where=str(ckpt), hint="resume with the lora.* settings the run was started with")
    if is_lora(lm):
        load_lora_state_dict(lm, load_file(str(ckpt / "adapter_model.safetensors")), str(ckpt))
    else:
        model = registry_model(lm)
        restored, _ = load_model(ckpt, with_tokenizer=False)
        ours, theirs = _shape(model.cfg.hf_config()), _shape(restored.cfg.hf_config())
        clash = [f"{k}={ours.get(k)} (checkpoint {theirs.get(k)})" for k in sorted(ours.keys() | theirs.keys())
                 if ours.get(k) != theirs.get(k)]
        if clash:
            raise XiaolmError(f"checkpoint has a different model shape: {', '.join(clash)}", where=str(ckpt),
                              hint="resume with the model.* settings of that run, or start a new out=")
        model.load_state_dict(restored.state_dict())
    heads = load_file(str(ckpt / HEADS)) if (ckpt / HEADS).is_file() else {}
    own = {k for k in module.state_dict() if not k.startswith(prefix)} if prefix else set()
    if set(heads) != own:
        raise XiaolmError(f"the checkpoint's heads {sorted(heads)[:3]} do not match this objective's "
                          f"{sorted(own)[:3]}", where=str(ckpt), hint="resume with the same stage and settings")
    if heads:
        module.load_state_dict(heads, strict=False)


def _shape(hf: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hf.items() if k not in ("torch_dtype", "dtype")}
