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

from xiaolm.io import atomic_write_json, atomic_write_text
from xiaolm.model.export import save_weights
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
                    extra: dict[str, Any] | None = None) -> None:
    """Write checkpoints/step-N atomically, point `latest` at it, and prune older ones (every process calls it).

    Layout: model.safetensors + config.json (whole weights, loadable by `xiaolm export`), optimizer/ (a torch
    distributed checkpoint, one shard per process), state.pt (step, RNG, counters), manifest.json (sha256 of
    every file). On several machines checkpoints/ must be on storage they share.
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
        save_weights(weights, model.cfg, tmp)
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
