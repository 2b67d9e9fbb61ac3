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
from xiaolm.model.export import save_model_weights

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
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


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep_last: int = 2,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write checkpoints/step-N atomically, point `latest` at it, and prune older checkpoints."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    for stale in ckpt_root.glob(".tmp-step-*"):  # left behind by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_root / f".tmp-step-{step}-{os.getpid()}"
    tmp.mkdir()
    save_model_weights(model, tmp)
    torch.save(state, tmp / STATE_FILE)
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    atomic_write_json(tmp / MANIFEST, {"step": step, "files": files, **(extra or {})})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(run_dir / "latest", final.name + "\n")
    steps = sorted((int(p.name.split("-")[1]), p) for p in ckpt_root.glob("step-*") if p.name.split("-")[1].isdigit())
    for _, old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    """Load training state (optimizer, step, RNG) without unpickling arbitrary objects."""
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
