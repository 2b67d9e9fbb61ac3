"""Pretraining objective: random windows of the packed token file, next-token loss."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from xiaolm.data.pack import load_tokens, read_meta
from xiaolm.device import resolve_device
from xiaolm.errors import XiaolmError
from xiaolm.train import distributed
from xiaolm.train.loop import TrainConfig, build_model, lm_loss, train


class PretrainObjective:
    """Windows of the packed token file; row k of the stream starts at a hash of (seed, k), so batches are a
    pure function of their position and resume needs no data-position bookkeeping."""

    loss = staticmethod(lm_loss)

    def __init__(self, data_dir: str | Path, seq_len: int, seed: int, eval_batches: int, eval_batch_size: int,
                 eos_id: int | None = None):
        self.train_tokens = load_tokens(data_dir, "train")
        self.val_tokens = load_tokens(data_dir, "val")
        self.seq_len, self.seed, self.n_eval, self.eval_batch_size = seq_len, seed, eval_batches, eval_batch_size
        self.eos_id = eos_id  # set: number the documents in each window so attention stays inside them
        for split, arr in (("train", self.train_tokens), ("val", self.val_tokens)):
            if len(arr) <= seq_len + 1:
                raise XiaolmError(f"{split}.bin holds {len(arr)} tokens, fewer than data.seq_len+2={seq_len + 2}",
                                  where=str(data_dir), hint="pack more text or lower data.seq_len")

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> dict[str, torch.Tensor]:
        chunk = np.stack([tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        chunk = torch.from_numpy(chunk)
        batch = {"x": chunk[:, :-1].contiguous(), "y": chunk[:, 1:].contiguous()}
        if self.eos_id is not None:  # an EOS ends its document: the next token starts a new one
            is_eos = (batch["x"] == self.eos_id).long()
            batch["doc"] = is_eos.cumsum(dim=1) - is_eos
        return batch

    def train_batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Windows for stream rows first … first+count-1 (the same rows whatever the process count)."""
        rows = np.arange(first, first + count, dtype=np.uint64)
        return self._windows(self.train_tokens, mix64(rows, self.seed) % np.uint64(len(self.train_tokens)
                                                                                     - self.seq_len - 1))

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Fixed, evenly spread windows of val.bin."""
        n = self.n_eval * self.eval_batch_size
        starts = np.linspace(0, len(self.val_tokens) - self.seq_len - 1, num=n).astype(np.int64)
        for i in range(0, n, self.eval_batch_size):
            yield self._windows(self.val_tokens, starts[i:i + self.eval_batch_size])


def mix64(rows: np.ndarray, seed: int) -> np.ndarray:
    """A well-mixed uint64 per row (splitmix64 of seed and row): random-looking, reproducible, vectorized."""
    with np.errstate(over="ignore"):
        z = rows * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed * 0xD1B54A32D192ED03 % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def run_pretrain(cfg: TrainConfig, resume: bool = False) -> dict:
    """The `xiaolm pretrain` stage: from packed token files, or streamed from record files."""
    if not cfg.data.path:
        raise XiaolmError("data.path is empty", where="config",
                          hint="set data.path to a `xiaolm data pack` output, or to record files to stream")
    if not Path(cfg.data.path, "meta.json").is_file():
        return _run_streaming(cfg, resume)
    meta = read_meta(cfg.data.path)
    tokenizer_dir = cfg.data.tokenizer or meta.get("tokenizer_dir", "")
    if not tokenizer_dir or not Path(tokenizer_dir, "tokenizer.json").is_file():
        raise XiaolmError(f"tokenizer not found at '{tokenizer_dir}'", where="data.tokenizer",
                          hint="set data.tokenizer to the `xiaolm tokenizer train` output")
    if meta.get("tokenizer_hash"):
        from xiaolm.tokenizer.train import tokenizer_hash

        if tokenizer_hash(tokenizer_dir) != meta["tokenizer_hash"]:
            raise XiaolmError(f"the token files in {cfg.data.path} were packed with another tokenizer than "
                              f"{tokenizer_dir}", where="data.tokenizer",
                              hint=f"use the one in meta.json ({meta.get('tokenizer_dir')}) or pack again")
    device = resolve_device(cfg.device)
    ctx = distributed.setup(device)
    device = distributed.rank_device(device, ctx)
    model = build_model(cfg, meta["vocab_size"], device)
    objective = PretrainObjective(cfg.data.path, cfg.data.seq_len, cfg.seed, cfg.eval_batches, cfg.batch_size,
                                  eos_id=meta.get("eos_id") if cfg.data.doc_mask else None)
    return train(cfg, objective, model, tokenizer_dir, resume=resume, stage="pretrain", ctx=ctx)


def _run_streaming(cfg: TrainConfig, resume: bool) -> dict:
    """Pretraining straight from record files through a shuffle buffer (data/stream.py)."""
    from xiaolm.data.stream import StreamingPretrainObjective, TokenStream, validation_windows
    from xiaolm.tokenizer import load_tokenizer

    if not cfg.data.tokenizer:
        raise XiaolmError("streaming from record files needs data.tokenizer", where="data.tokenizer",
                          hint="set it to a `xiaolm tokenizer train` output (or point data.path at packed data)")
    if not cfg.data.val_path:
        raise XiaolmError("streaming from record files needs data.val_path (held-out records)",
                          where="data.val_path", hint="point it at a few MB of records kept out of data.path")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    device = resolve_device(cfg.device)
    ctx = distributed.setup(device)
    device = distributed.rank_device(device, ctx)
    model = build_model(cfg, len(tokenizer), device)
    split = [p.strip() for p in cfg.data.path.split(",") if p.strip()]
    rejects = Path(cfg.out) / ("rejects.jsonl" if ctx.rank == 0 else f"rejects.rank{ctx.rank}.jsonl")
    stream = TokenStream(split, tokenizer, cfg.data.seq_len, cfg.data.shuffle_buffer, seed=cfg.seed,
                         rank=ctx.rank, world=ctx.world, rejects=rejects)
    val = validation_windows([p.strip() for p in cfg.data.val_path.split(",") if p.strip()], tokenizer,
                             cfg.data.seq_len, cfg.eval_batches * cfg.batch_size)
    objective = StreamingPretrainObjective(stream, val, cfg.batch_size, cfg.eval_batches, cfg.data.doc_mask)
    summary = train(cfg, objective, model, cfg.data.tokenizer, resume=resume, stage="pretrain", ctx=ctx)
    stream.log_rejects()
    return summary
