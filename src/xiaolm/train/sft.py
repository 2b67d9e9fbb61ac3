"""Supervised fine-tuning objective: chat records, loss on assistant tokens only, packed rows or dynamic padding."""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from xiaolm.data.stream import ChatStream
from xiaolm.errors import XiaolmError
from xiaolm.records.read import convert_records
from xiaolm.records.rejects import RejectLog
from xiaolm.tokenizer import load_tokenizer
from xiaolm.tokenizer.chat import Example, collate, collate_packed, encode_example
from xiaolm.train.config import TrainConfig
from xiaolm.train.objective import Objective
from xiaolm.train.pretrain import split_paths
from xiaolm.train.stage import run_stage

log = logging.getLogger(__name__)
T = TypeVar("T")


def load_chat_examples(inputs: list[str], tokenizer, seq_len: int, rejects: RejectLog | None) -> list[Example]:
    """Encode chat records into (input_ids, labels), truncated to seq_len + 1; bad records go to rejects."""
    return convert_records(inputs, lambda record: encode_example(tokenizer, record, seq_len), rejects)



def resolve_tokenizer_dir(cfg: TrainConfig) -> str:
    """data.tokenizer, else the init_from run's tokenizer/, else the init_from HF model dir itself."""
    if not cfg.data.tokenizer and not cfg.init_from:
        raise XiaolmError("no tokenizer: set data.tokenizer (a fresh model) or init_from", where="config")
    tokenizer_dir = cfg.data.tokenizer or (str(Path(cfg.init_from) / "tokenizer") if cfg.init_from else "")
    if cfg.init_from and not cfg.data.tokenizer and not Path(tokenizer_dir).is_dir():
        tokenizer_dir = cfg.init_from  # an HF model dir carries its tokenizer files itself
    return tokenizer_dir


def split_held_out(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training, validation): a seeded random `fraction` (at least one item when there are two) held out."""
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = max(1, int(len(items) * fraction)) if len(items) > 1 else 0
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


class SFTObjective(Objective):
    """Shuffled epochs over encoded chats; batch `index` is a pure function of (seed, index).

    With `pack_len`, a row holds whole chats of one epoch's order up to pack_len tokens (PackedRows), else one
    chat padded to the batch's longest. Validation batches are padded either way, so val_loss compares.
    """

    def __init__(self, train: list[Example], val: list[Example], batch_size: int, seed: int, pad_id: int,
                 eval_batches: int, pack_len: int = 0):
        self.train, self.val = train, val
        self.batch_size, self.seed, self.pad_id, self.n_eval = batch_size, seed, pad_id, eval_batches
        self.packed = PackedRows([len(ids) - 1 for ids, _ in train], pack_len, seed) if pack_len else None

    def train_batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Stream rows first … first+count-1: consecutive slices of per-epoch permutations of the chats."""
        if self.packed is not None:
            return collate_packed([[self.train[i] for i in self.packed.row(k)]
                                   for k in range(first, first + count)], self.pad_id)
        n = len(self.train)
        picks = [self.train[shuffled_index(pos, n, self.seed, epoch)]
                 for epoch, pos in (divmod(k, n) for k in range(first, first + count))]
        return collate(picks, self.pad_id)

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The first eval_batches × batch_size validation chats."""
        val = self.val[: self.n_eval * self.batch_size]
        for i in range(0, len(val), self.batch_size):
            yield collate(val[i:i + self.batch_size], self.pad_id)


class PackedRows:
    """Each epoch's shuffled chat order cut into rows of whole chats of at most `width` tokens (next fit).

    Row k of the stream is a pure function of (seed, lengths, k). An epoch's rows are worked out when a row of
    it is first asked for (one pass over the chats: ~15 µs each) and the last two epochs are kept; resuming deep
    into a run walks the earlier epochs once to count their rows.
    """

    def __init__(self, lengths: list[int], width: int, seed: int):
        if max(lengths, default=0) > width:
            raise ValueError(f"a chat of {max(lengths)} tokens does not fit a row of {width}")
        self.lengths, self.width, self.seed = np.asarray(lengths), width, seed
        self.first_rows = [0]  # first stream row of each epoch worked out so far
        self.epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch → (chat order, first position of rows)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self.epochs:
            n = len(self.lengths)
            order = np.fromiter((shuffled_index(pos, n, self.seed, epoch) for pos in range(n)), np.int64, n)
            starts, used = [0], 0
            for pos, length in enumerate(self.lengths[order]):
                if used + length > self.width:
                    starts.append(pos)
                    used = 0
                used += length
            self.epochs = {e: v for e, v in self.epochs.items() if e == epoch - 1}
            self.epochs[epoch] = (order, np.asarray(starts + [n]))
        return self.epochs[epoch]

    def row(self, k: int) -> list[int]:
        """The chat indices of stream row k, in their order within the row."""
        while self.first_rows[-1] <= k:
            self.first_rows.append(self.first_rows[-1] + len(self._epoch(len(self.first_rows) - 1)[1]) - 1)
        epoch = bisect.bisect_right(self.first_rows, k) - 1
        order, starts = self._epoch(epoch)
        r = k - self.first_rows[epoch]
        return order[starts[r]:starts[r + 1]].tolist()


class StreamingSFTObjective(SFTObjective):
    """SFT from a ChatStream: batches must be asked for in order, which the training loop does."""

    def __init__(self, stream: ChatStream, val: list[Example], batch_size: int, pad_id: int, eval_batches: int):
        super().__init__([], val, batch_size, 0, pad_id, eval_batches)
        self.stream = stream

    def train_batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """The next `count` chats of this process's stream."""
        return collate([next(self.stream) for _ in range(count)], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])


def run_sft(cfg: TrainConfig, resume: bool = False) -> dict:
    """The `xiaolm sft` stage."""
    if not cfg.data.path:
        raise XiaolmError("data.path is empty", where="config", hint="set data.path to chat JSONL file(s)")
    tokenizer_dir = resolve_tokenizer_dir(cfg)
    tokenizer = load_tokenizer(tokenizer_dir)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.data.stream:
        return _run_streaming(cfg, tokenizer, tokenizer_dir, resume)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes the rejects file
    with RejectLog(out / "rejects.jsonl" if main else None) as rejects:
        examples = load_chat_examples(split_paths(cfg.data.path), tokenizer, cfg.data.seq_len, rejects)
        if cfg.data.val_path:
            val = load_chat_examples(split_paths(cfg.data.val_path), tokenizer, cfg.data.seq_len, rejects)
            train_set = examples
        else:
            train_set, val = split_held_out(examples, cfg.data.val_fraction, cfg.seed)
    if rejects.total:
        log.warning("sft: %d records rejected — see %s", rejects.total, out / "rejects.jsonl")
    if not train_set or not val:
        rejected = f"; {rejects.total} records rejected ({rejects.summary()})" if rejects.total else ""
        raise XiaolmError(f"need training and validation chats, got {len(train_set)} and {len(val)}{rejected}",
                          where=cfg.data.path,
                          hint=f"records must be {{\"messages\": [...]}}; see {out / 'rejects.jsonl'}")
    pad_id = pad_token_id(tokenizer, tokenizer_dir)
    pack_len = cfg.data.seq_len if cfg.data.pack else 0
    log.info("sft: %d training chats, %d validation chats%s", len(train_set), len(val),
             f"; rows of up to {pack_len} tokens hold several chats (data.pack)" if pack_len else "")
    return run_stage(cfg, "sft", tokenizer_dir, len(tokenizer),
                     lambda c, ctx: SFTObjective(train_set, val, c.batch_size, c.seed, pad_id, c.eval_batches,
                                                 pack_len), resume)


def _run_streaming(cfg: TrainConfig, tokenizer, tokenizer_dir: str, resume: bool) -> dict:
    """SFT on chats read through a shuffle buffer (data.stream=true): memory does not grow with the data."""
    if not cfg.data.val_path:
        raise XiaolmError("streaming chats (data.stream=true) needs data.val_path (held-out chats)",
                          where="data.val_path", hint="point it at a few thousand chats kept out of data.path")
    val = load_chat_examples(split_paths(cfg.data.val_path), tokenizer, cfg.data.seq_len, None)
    if not val:
        raise XiaolmError("no usable validation chats", where=cfg.data.val_path,
                          hint='records must be {"messages": [...]} with an assistant turn')
    pad_id = pad_token_id(tokenizer, tokenizer_dir)
    streams: list[ChatStream] = []

    def objective(c: TrainConfig, ctx: Any) -> Objective:
        rejects = Path(c.out) / ("rejects.jsonl" if ctx.rank == 0 else f"rejects.rank{ctx.rank}.jsonl")
        streams.append(ChatStream(split_paths(c.data.path), tokenizer, c.data.seq_len, c.data.shuffle_buffer,
                                  seed=c.seed, rank=ctx.rank, world=ctx.world, rejects=rejects))
        return StreamingSFTObjective(streams[-1], val, c.batch_size, pad_id, c.eval_batches)

    log.info("sft: streaming chats from %s through a buffer of %d, %d validation chats", cfg.data.path,
             cfg.data.shuffle_buffer, len(val))
    summary = run_stage(cfg, "sft", tokenizer_dir, len(tokenizer), objective, resume)
    for stream in streams:
        stream.log_rejects()
    return summary


ROUNDS = 8  # Feistel rounds: 4 left visible runs in orders of 10-1000 chats; 8 cost about 14 µs a row


def shuffled_index(pos: int, n: int, seed: int, epoch: int) -> int:
    """Position `pos` of a pseudo-random permutation of range(n) keyed by (seed, epoch), in O(1).

    A Feistel network permutes the 2^(2h) ≥ n codes; a code outside range(n) is permuted again
    ("cycle walking") until it lands inside, which keeps the map a bijection on range(n). Fewer than 4 walks
    are expected, since 2^(2h) < 4n: no per-epoch permutation of the whole data set is ever built.
    """
    if not 0 <= pos < n:
        raise ValueError(f"position {pos} outside range({n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    key = _mix(_mix(seed) ^ epoch)
    x = pos
    while True:
        left, right = x >> half, x & mask
        for r in range(ROUNDS):
            left, right = right, left ^ (_mix(key ^ (right << 2 | r)) & mask)
        x = left << half | right
        if x < n:
            return x


def _mix(z: int) -> int:
    """splitmix64's finalizer: a well-mixed 64-bit value for any integer."""
    z = (z * 0x9E3779B97F4A7C15 + 0x6A09E667F3BCC909) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def pad_token_id(tokenizer: Any, where: str) -> int:
    """The tokenizer's padding id (padded positions never count: their targets are -100)."""
    if tokenizer.pad_token_id is None:
        raise XiaolmError("the tokenizer has no padding token", where=str(where),
                          hint="use a tokenizer trained by `xiaolm tokenizer train` (it pads with <|endoftext|>)")
    return tokenizer.pad_token_id


def record_splits(cfg: TrainConfig, stage: str, kind: str, layout: str, start: str,
                  convert: Callable[[Any, dict], T]) -> tuple[str, Any, list[T], list[T]]:
    """(tokenizer dir, tokenizer, training items, validation items) of a stage that starts from init_from and reads
    records of `kind` (their `layout` is said in errors): convert(tokenizer, record) makes each item or raises
    Unusable; such records go to the run's rejects.jsonl. Validation: data.val_path, else a val_fraction split."""
    if not cfg.init_from:
        raise XiaolmError(f"{stage} starts from a trained model, but init_from is empty", where="init_from",
                          hint=f"set init_from to {start} run dir or an HF causal-LM dir")
    if not cfg.data.path:
        raise XiaolmError("data.path is empty", where="config", hint=f"set data.path to {kind} JSONL: {layout}")
    tokenizer_dir = resolve_tokenizer_dir(cfg)
    tokenizer = load_tokenizer(tokenizer_dir)
    pad_token_id(tokenizer, tokenizer_dir)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    main = int(os.environ.get("RANK", "0")) == 0
    with RejectLog(out / "rejects.jsonl" if main else None) as rejects:
        def load(paths: str) -> list[T]:
            return convert_records(split_paths(paths), lambda record: convert(tokenizer, record), rejects)

        items = load(cfg.data.path)
        if cfg.data.val_path:
            train_set, val = items, load(cfg.data.val_path)
        else:
            train_set, val = split_held_out(items, cfg.data.val_fraction, cfg.seed)
    if rejects.total:
        log.warning("%s: %d records rejected (%s) — see %s", stage, rejects.total, rejects.summary(),
                    out / "rejects.jsonl")
    if not train_set or not val:
        raise XiaolmError(f"need training and validation {kind}s, got {len(train_set)} and {len(val)}",
                          where=cfg.data.path, hint=f"records must be {layout}; see {out / 'rejects.jsonl'}")
    log.info("%s: %d training %ss, %d validation %ss", stage, len(train_set), kind, len(val), kind)
    return tokenizer_dir, tokenizer, train_set, val
