"""Pretraining objective: random windows of the packed token file, next-token loss."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from xiaolm.data.pack import load_tokens, read_meta
from xiaolm.errors import XiaolmError
from xiaolm.train import distributed
from xiaolm.train.loop import TrainConfig, build_model, lm_loss, resolve_device, train


class PretrainObjective:
    """Batches are a pure function of (seed, index), so resume needs no data-position bookkeeping."""

    loss = staticmethod(lm_loss)

    def __init__(self, data_dir: str | Path, seq_len: int, batch_size: int, seed: int, eval_batches: int,
                 rank: int = 0, world: int = 1):
        self.train_tokens = load_tokens(data_dir, "train")
        self.val_tokens = load_tokens(data_dir, "val")
        self.seq_len, self.batch_size, self.seed, self.n_eval = seq_len, batch_size, seed, eval_batches
        self.rank, self.world = rank, world
        for split, arr in (("train", self.train_tokens), ("val", self.val_tokens)):
            if len(arr) <= seq_len + 1:
                raise XiaolmError(f"{split}.bin holds {len(arr)} tokens, fewer than data.seq_len+2={seq_len + 2}",
                                  where=str(data_dir), hint="pack more text or lower data.seq_len")

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> dict[str, torch.Tensor]:
        chunk = np.stack([tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        chunk = torch.from_numpy(chunk)
        return {"x": chunk[:, :-1].contiguous(), "y": chunk[:, 1:].contiguous()}

    def train_batch(self, index: int) -> dict[str, torch.Tensor]:
        """This process's share of global micro-batch `index` (the same windows whatever the process count)."""
        rng = np.random.default_rng([self.seed, index])
        starts = rng.integers(0, len(self.train_tokens) - self.seq_len - 1, size=self.batch_size * self.world)
        return self._windows(self.train_tokens, starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Fixed, evenly spread windows of val.bin."""
        n = self.n_eval * self.batch_size
        starts = np.linspace(0, len(self.val_tokens) - self.seq_len - 1, num=n).astype(np.int64)
        for i in range(0, n, self.batch_size):
            yield self._windows(self.val_tokens, starts[i:i + self.batch_size])


def run_pretrain(cfg: TrainConfig, resume: bool = False) -> dict:
    """The `xiaolm pretrain` stage."""
    if not cfg.data.path:
        raise XiaolmError("data.path is empty", where="config", hint="set data.path to a `xiaolm data pack` output")
    meta = read_meta(cfg.data.path)
    tokenizer_dir = cfg.data.tokenizer or meta.get("tokenizer_dir", "")
    if not tokenizer_dir or not Path(tokenizer_dir, "tokenizer.json").is_file():
        raise XiaolmError(f"tokenizer not found at '{tokenizer_dir}'", where="data.tokenizer",
                          hint="set data.tokenizer to the `xiaolm tokenizer train` output")
    device = resolve_device(cfg.device)
    ctx = distributed.setup(device)
    device = distributed.rank_device(device, ctx)
    model = build_model(cfg, meta["vocab_size"], device)
    objective = PretrainObjective(cfg.data.path, cfg.data.seq_len, cfg.batch_size, cfg.seed, cfg.eval_batches,
                                  rank=ctx.rank, world=ctx.world)
    return train(cfg, objective, model, tokenizer_dir, resume=resume, stage="pretrain", ctx=ctx)
