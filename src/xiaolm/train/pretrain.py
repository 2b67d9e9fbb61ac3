"""Pretraining objectives: next-token loss on windows of the packed token file, or of records streamed."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xiaolm.data.pack import load_tokens, read_meta
from xiaolm.data.stream import TokenStream, validation_windows
from xiaolm.errors import XiaolmError
from xiaolm.model.llama import document_ids
from xiaolm.model.loss import IGNORE
from xiaolm.model.registry import get_arch
from xiaolm.train.config import TrainConfig
from xiaolm.train.objective import Objective
from xiaolm.train.stage import run_stage

log = logging.getLogger(__name__)


def window_batch(windows: torch.Tensor, eos_id: int | None, source: SourceCut | None = None,
                 rows: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Windows of seq_len + 1 tokens → inputs x, targets y, and with eos_id the document number of each input
    token (an EOS ends its document: the next token starts a new one), so attention stays inside documents.
    With `source` (text-to-text models), each window's prefix is the source: its targets are -100."""
    batch = {"x": windows[:, :-1].contiguous(), "y": windows[:, 1:].contiguous()}
    if source is not None:
        source.mask(batch["y"], rows)
    elif eos_id is not None:
        batch["doc"] = document_ids(batch["x"], eos_id)
    return batch


class SourceCut:
    """Text-to-text pretraining's split of a window of plain text: the window is cut at a point drawn uniformly
    between `low` and `high` of its length, a pure function of (seed, row); the encoder reads the tokens before
    the cut and the decoder predicts the rest (data.source_min / data.source_max). Windows of the packed file
    may hold the end of one document and the start of the next, as in decoder-only pretraining."""

    def __init__(self, low: float, high: float, seed: int):
        if not 0 < low <= high < 1:
            raise XiaolmError(f"data.source_min={low}, data.source_max={high}: need 0 < min ≤ max < 1",
                              where="data.source_min", hint="the defaults 0.25 and 0.75 keep both sides")
        self.low, self.high, self.seed = low, high, seed

    def mask(self, y: torch.Tensor, rows: np.ndarray) -> None:
        """Set each row's source targets to -100 (at least one source token, at least one target)."""
        draw = mix64(rows.astype(np.uint64), self.seed ^ 0x7E57) >> np.uint64(11)  # 53 random bits
        fraction = self.low + (self.high - self.low) * (draw.astype(np.float64) / 2.0 ** 53)
        width = y.shape[1] + 1
        cuts = np.clip((fraction * width).astype(np.int64), 1, width - 1)  # source = window[:cut]
        for r, cut in enumerate(cuts):
            y[r, :cut - 1] = IGNORE


class PretrainObjective(Objective):
    """Windows of the packed token file; row k of the stream starts at a hash of (seed, k), so batches are a
    pure function of their position and resume needs no data-position bookkeeping."""

    def __init__(self, data_dir: str | Path, seq_len: int, seed: int, eval_batches: int, eval_batch_size: int,
                 eos_id: int | None = None, source: SourceCut | None = None):
        self.train_tokens = load_tokens(data_dir, "train")
        self.val_tokens = load_tokens(data_dir, "val")
        self.seq_len, self.seed, self.n_eval, self.eval_batch_size = seq_len, seed, eval_batches, eval_batch_size
        self.eos_id = eos_id  # set: number the documents in each window so attention stays inside them
        self.source = source  # text-to-text: each window's prefix is the source
        for split, arr in (("train", self.train_tokens), ("val", self.val_tokens)):
            if len(arr) <= seq_len + 1:
                raise XiaolmError(f"{split}.bin holds {len(arr)} tokens, fewer than data.seq_len+2={seq_len + 2}",
                                  where=str(data_dir), hint="pack more text or lower data.seq_len")

    def _windows(self, tokens: np.ndarray, starts: np.ndarray, rows: np.ndarray) -> dict[str, torch.Tensor]:
        chunk = np.stack([tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        return window_batch(torch.from_numpy(chunk), self.eos_id, self.source, rows)

    def train_batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Windows for stream rows first … first+count-1 (the same rows whatever the process count)."""
        rows = np.arange(first, first + count, dtype=np.uint64)
        return self._windows(self.train_tokens, mix64(rows, self.seed) % np.uint64(len(self.train_tokens)
                                                                                     - self.seq_len - 1), rows)

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Fixed, evenly spread windows of val.bin."""
        n = self.n_eval * self.eval_batch_size
        starts = np.linspace(0, len(self.val_tokens) - self.seq_len - 1, num=n).astype(np.int64)
        for i in range(0, n, self.eval_batch_size):
            yield self._windows(self.val_tokens, starts[i:i + self.eval_batch_size], EVAL_ROWS + np.arange(i, i + len(
                starts[i:i + self.eval_batch_size])))


class StreamingPretrainObjective(Objective):
    """Pretraining from a TokenStream; batches must be asked for in order, which the training loop does."""

    def __init__(self, stream: TokenStream, val_windows: np.ndarray, batch_size: int, eval_batches: int,
                 doc_mask: bool, source: SourceCut | None = None):
        self.stream, self.val, self.batch_size, self.n_eval = stream, val_windows, batch_size, eval_batches
        self.eos_id = stream.eos if doc_mask else None
        self.source = source
        self.rows_out = 0

    def _batch(self, windows: np.ndarray, first: int) -> dict[str, torch.Tensor]:
        return window_batch(torch.from_numpy(np.ascontiguousarray(windows)), self.eos_id, self.source,
                            np.arange(first, first + len(windows)))

    def train_batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """The next `count` windows of this process's stream."""
        self.rows_out += count
        return self._batch(np.stack([next(self.stream) for _ in range(count)]), self.rows_out - count)

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Fixed validation windows."""
        for i in range(0, min(len(self.val), self.n_eval * self.batch_size), self.batch_size):
            yield self._batch(self.val[i:i + self.batch_size], EVAL_ROWS + i)

    def state_dict(self) -> dict[str, Any]:
        return {"rows_out": self.rows_out, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows_out = state["rows_out"]
        self.stream.load_state_dict(state["stream"])


EVAL_ROWS = 1 << 40  # row numbers of validation windows: their cuts never repeat a training row's


def mix64(rows: np.ndarray, seed: int) -> np.ndarray:
    """A well-mixed uint64 per row (splitmix64 of seed and row): random-looking, reproducible, vectorized."""
    with np.errstate(over="ignore"):
        z = rows * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed * 0xD1B54A32D192ED03 % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def split_paths(value: str) -> list[str]:
    """'a.jsonl,b.jsonl' → ['a.jsonl', 'b.jsonl']."""
    return [p.strip() for p in value.split(",") if p.strip()]


def source_cut(cfg: TrainConfig) -> SourceCut | None:
    """The window split of a text-to-text model (None for decoder-only ones, which predict every token)."""
    if not get_arch(cfg.model.arch).encoder_decoder:
        return None
    return SourceCut(cfg.data.source_min, cfg.data.source_max, cfg.seed)


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
    eos_id = meta.get("eos_id")
    if cfg.data.doc_mask and eos_id is None:
        raise XiaolmError("data.doc_mask=true but meta.json has no eos_id to find document boundaries",
                          where=str(Path(cfg.data.path, "meta.json")),
                          hint="pack the data again with `xiaolm data pack`, or set data.doc_mask=false")

    def objective(c: TrainConfig, ctx: Any) -> Objective:
        return PretrainObjective(c.data.path, c.data.seq_len, c.seed, c.eval_batches, c.batch_size,
                                 eos_id=eos_id if c.data.doc_mask else None, source=source_cut(c))

    return run_stage(cfg, "pretrain", tokenizer_dir, meta["vocab_size"], objective, resume)


def _run_streaming(cfg: TrainConfig, resume: bool) -> dict:
    """Pretraining straight from record files through a shuffle buffer (data/stream.py)."""
    from xiaolm.tokenizer import load_tokenizer

    if not cfg.data.tokenizer:
        raise XiaolmError("streaming from record files needs data.tokenizer", where="data.tokenizer",
                          hint="set it to a `xiaolm tokenizer train` output (or point data.path at packed data)")
    if not cfg.data.val_path:
        raise XiaolmError("streaming from record files needs data.val_path (held-out records)",
                          where="data.val_path", hint="point it at a few MB of records kept out of data.path")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    streams: list[TokenStream] = []

    def objective(c: TrainConfig, ctx: Any) -> Objective:
        rejects = Path(c.out) / ("rejects.jsonl" if ctx.rank == 0 else f"rejects.rank{ctx.rank}.jsonl")
        stream = TokenStream(split_paths(c.data.path), tokenizer, c.data.seq_len, c.data.shuffle_buffer,
                             seed=c.seed, rank=ctx.rank, world=ctx.world, rejects=rejects)
        streams.append(stream)
        val = validation_windows(split_paths(c.data.val_path), tokenizer, c.data.seq_len,
                                 c.eval_batches * c.batch_size)
        return StreamingPretrainObjective(stream, val, c.batch_size, c.eval_batches, c.data.doc_mask, source_cut(c))

    summary = run_stage(cfg, "pretrain", cfg.data.tokenizer, len(tokenizer), objective, resume)
    for stream in streams:
        stream.log_rejects()
    return summary
