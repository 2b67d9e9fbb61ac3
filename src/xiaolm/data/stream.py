"""Training windows streamed straight from record files, for corpora larger than RAM or disk for token files.

Records (text, or chat rendered as ChatML) are read in order, tokenized in batches, joined with EOS after each
document and cut into windows of seq_len + 1 tokens; a shuffle buffer of `buffer_size` windows mixes them. Under
torchrun, record i goes to process i % world, so processes never share data. The stream repeats its files
(epochs) forever. Its position — epoch, records consumed, unfinished tokens, the buffer and its RNG — is a small
state dict saved with each checkpoint, so a resumed run continues with exactly the next window.

Records that cannot be used (invalid JSON or UTF-8, no text, a malformed chat) are skipped, counted and, during the
first pass, appended to a rejects file with file:line and reason (rank 0 logs the unreadable lines every process
reads past; each process the unusable records among its own). A resumed run cuts that file back to the size it had
at the checkpoint, so no line is written twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xiaolm.data.pack import Unusable, document_text
from xiaolm.data.read import RejectLog, expand_inputs, read_records
from xiaolm.errors import XiaolmError

log = logging.getLogger(__name__)

ENCODE_BATCH = 256


class _FirstPassRejects(RejectLog):
    """A RejectLog appending to `path` line by line while `active`; its size is part of the stream's state."""

    def __init__(self, path: Path):
        super().__init__(None)
        self.log_path, self.active, self.size = path, False, 0

    def open(self) -> None:
        """Start appending where the last checkpoint left the file (nothing of a later, lost run stays)."""
        if self._file is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as f:
                f.truncate(self.size)
            self._file = open(self.log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed by close())

    def add(self, reason: str, where: str, record: Any, detail: str | None = None) -> None:
        if self.active:
            super().add(reason, where, record, detail)
            self.size = self._file.tell() if self._file is not None else self.size

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TokenStream:
    """An endless, resumable iterator of [seq_len + 1] int64 windows from record files."""

    def __init__(self, inputs: Sequence[str | Path], tokenizer, seq_len: int, buffer_size: int = 1024,
                 seed: int = 0, rank: int = 0, world: int = 1, text_field: str = "text",
                 rejects: str | Path | None = None):
        self.files = expand_inputs(inputs)
        if not self.files:
            raise XiaolmError("no record files to stream, and no meta.json of packed data either",
                              where=", ".join(map(str, inputs)),
                              hint="point data.path at `xiaolm data pack` output or at .jsonl/.parquet/... records")
        if buffer_size < 1:
            raise XiaolmError(f"data.shuffle_buffer={buffer_size} must be at least 1", where="data.shuffle_buffer")
        self.tokenizer, self.seq_len, self.buffer_size = tokenizer, seq_len, buffer_size
        self.rank, self.world, self.text_field = rank, world, text_field
        self.eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else 0
        self.rng = np.random.default_rng([seed, rank])
        self.epoch = 0
        self.records_done = 0  # records of this epoch, all processes' counted, already turned into tokens
        self.pending: list[int] = []  # tokens not yet filling a whole window
        self.buffer: list[np.ndarray] = []
        self._source: Iterator[np.ndarray] | None = None
        self.rejects = _FirstPassRejects(Path(rejects)) if rejects is not None else RejectLog(None)

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> np.ndarray:
        if self._source is None:
            self._source = self._windows()
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(next(self._source))
        j = int(self.rng.integers(len(self.buffer)))
        out = self.buffer[j]
        self.buffer[j] = next(self._source)
        return out

    def _windows(self) -> Iterator[np.ndarray]:
        """Windows in file order, continuing from records_done / pending, epoch after epoch."""
        width = self.seq_len + 1
        while True:
            for texts, upto in self._text_batches(skip=self.records_done):
                for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                    self.pending.extend(ids)
                    self.pending.append(self.eos)
                self.records_done = upto
                while len(self.pending) >= width:
                    window, self.pending = self.pending[:width], self.pending[width:]
                    yield np.asarray(window, dtype=np.int64)
            if self.records_done == 0 and not self.pending:
                raise XiaolmError("no usable text records for this process", where=", ".join(map(str, self.files)),
                                  hint='records need a "text" field or "messages"')
            if self.epoch == 0 and self.rejects.total:
                where = getattr(self.rejects, "log_path", None)
                log.warning("data stream (process %d): %d records skipped in the first pass (%s)%s", self.rank,
                            self.rejects.total, self.rejects.summary(), f" — see {where}" if where else "")
            self.epoch, self.records_done = self.epoch + 1, 0

    def _text_batches(self, skip: int) -> Iterator[tuple[list[str], int]]:
        """(texts of this process's records, records consumed so far) in batches, after the first `skip`."""
        texts: list[str] = []
        index = -1
        first_pass = self.epoch == 0 and isinstance(self.rejects, _FirstPassRejects)
        if first_pass:
            self.rejects.open()
        # log from the first line after the records already consumed (a resumed run logged those before)
        self.rejects.active = first_pass and skip == 0
        reader_rejects = self.rejects if self.rank == 0 else None  # every process reads every line; one logs
        for index, (record, where) in enumerate(read_records(self.files, reader_rejects)):
            if index == skip - 1:
                self.rejects.active = first_pass
            if index < skip or index % self.world != self.rank:
                continue
            try:
                texts.append(document_text(record, self.text_field)[0])
            except Unusable as e:
                self.rejects.add(e.reason, where, record, e.detail)
                continue
            if len(texts) == ENCODE_BATCH:
                yield texts, index + 1
                texts = []
        self.rejects.active = False
        if texts:
            yield texts, index + 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the next window (tensors and plain types only)."""
        width = self.seq_len + 1
        buffer = np.stack(self.buffer) if self.buffer else np.zeros((0, width), dtype=np.int64)
        return {"epoch": self.epoch, "records_done": self.records_done,
                "pending": torch.tensor(self.pending, dtype=torch.int64), "buffer": torch.from_numpy(buffer),
                "rng": repr(self.rng.bit_generator.state), "rank": self.rank, "world": self.world,
                "rejected": dict(self.rejects.counts), "rejects_bytes": getattr(self.rejects, "size", 0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict() of the same files, process and process count."""
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise XiaolmError(f"the data stream position was saved by process {state['rank']} of {state['world']}, "
                              f"this is process {self.rank} of {self.world}", where="data",
                              hint="resume a streaming run with the same number of processes")
        import ast

        self.epoch, self.records_done = state["epoch"], state["records_done"]
        self.pending = state["pending"].tolist()
        self.buffer = list(state["buffer"].numpy())
        self.rng.bit_generator.state = ast.literal_eval(state["rng"])
        self.rejects.counts.clear()
        self.rejects.counts.update(state.get("rejected", {}))
        if isinstance(self.rejects, _FirstPassRejects):
            self.rejects.close()
            self.rejects.size = state.get("rejects_bytes", 0)
        self._source = None


class StreamingPretrainObjective:
    """Pretraining from a TokenStream; batches must be asked for in order, which the training loop does."""

    def __init__(self, stream: TokenStream, val_windows: np.ndarray, batch_size: int, eval_batches: int,
                 doc_mask: bool):
        self.stream, self.val, self.batch_size, self.n_eval = stream, val_windows, batch_size, eval_batches
        self.doc_mask = doc_mask
        self.rows_out = 0

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from xiaolm.train.loop import lm_loss

        return lm_loss(model, batch)

    def _batch(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        chunk = torch.from_numpy(np.ascontiguousarray(windows))
        batch = {"x": chunk[:, :-1].contiguous(), "y": chunk[:, 1:].contiguous()}
        if self.doc_mask:
            is_eos = (batch["x"] == self.stream.eos).long()
            batch["doc"] = is_eos.cumsum(dim=1) - is_eos
        return batch

    def train_batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """The next `count` windows of this process's stream."""
        self.rows_out += count
        return self._batch(np.stack([next(self.stream) for _ in range(count)]))

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Fixed validation windows."""
        for i in range(0, min(len(self.val), self.n_eval * self.batch_size), self.batch_size):
            yield self._batch(self.val[i:i + self.batch_size])

    def state_dict(self) -> dict[str, Any]:
        return {"rows_out": self.rows_out, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows_out = state["rows_out"]
        self.stream.load_state_dict(state["stream"])


def validation_windows(inputs: Sequence[str | Path], tokenizer, seq_len: int, limit: int) -> np.ndarray:
    """Up to `limit` consecutive windows of the validation files (one pass, no shuffling)."""
    stream = TokenStream(inputs, tokenizer, seq_len, buffer_size=1)
    windows: list[np.ndarray] = []
    for window in stream._windows():
        if stream.epoch > 0 or len(windows) == limit:
            break
        windows.append(window)
    if not windows:
        raise XiaolmError(f"validation files hold less than one window of {seq_len + 1} tokens",
                          where=", ".join(map(str, inputs)), hint="add validation text or lower data.seq_len")
    return np.stack(windows)
