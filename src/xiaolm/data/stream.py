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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xiaolm.errors import Unusable, XiaolmError
from xiaolm.records.inputs import expand_inputs
from xiaolm.records.read import read_records
from xiaolm.records.rejects import RejectLog
from xiaolm.records.text import record_text
from xiaolm.tokenizer.chat import Example, encode_example

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


class RecordStream:
    """An endless, resumable iterator of items made from this process's records, mixed by a shuffle buffer.

    Subclasses turn records into items (`_items`, in file order from `records_done` on) and save what they hold
    between records (`_extra_state`); the reading, sharding by process, epochs, rejects and buffer are shared.
    """

    def __init__(self, inputs: Sequence[str | Path], buffer_size: int, seed: int, rank: int, world: int,
                 rejects: str | Path | None, what: str):
        self.files = expand_inputs(inputs)
        if not self.files:
            raise XiaolmError(f"no record files to stream {what}", where=", ".join(map(str, inputs)),
                              hint="point data.path at .jsonl/.json/.parquet/... records (files, globs or folders)")
        if buffer_size < 1:
            raise XiaolmError(f"data.shuffle_buffer={buffer_size} must be at least 1", where="data.shuffle_buffer")
        self.buffer_size, self.rank, self.world = buffer_size, rank, world
        self.rng = np.random.default_rng([seed, rank])
        self.epoch = 0
        self.records_done = 0  # records of this epoch, all processes' counted, already turned into items
        self.buffer: list[Any] = []
        self._source: Iterator[Any] | None = None
        self.rejects = _FirstPassRejects(Path(rejects)) if rejects is not None else RejectLog(None)

    def __iter__(self) -> RecordStream:
        return self

    def __next__(self) -> Any:
        if self._source is None:
            self._source = self._items()
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(next(self._source))
        j = int(self.rng.integers(len(self.buffer)))
        out = self.buffer[j]
        self.buffer[j] = next(self._source)
        return out

    def _items(self) -> Iterator[Any]:
        """Items in file order, continuing from records_done (and what `_extra_state` kept), epoch after epoch."""
        raise NotImplementedError

    def _batches(self, convert: Callable[[dict], Any], skip: int) -> Iterator[tuple[list[Any], int]]:
        """(convert(record) of this process's records, records consumed so far) in batches, after the first `skip`.

        A record `convert` refuses (Unusable) or the reader cannot parse is skipped, and logged in the first pass.
        """
        out: list[Any] = []
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
                out.append(convert(record))
            except Unusable as e:
                self.rejects.add(e.reason, where, record, e.detail)
                continue
            if len(out) == ENCODE_BATCH:
                yield out, index + 1
                out = []
        self.rejects.active = False
        if out:
            yield out, index + 1

    def _end_of_pass(self, produced: bool) -> None:
        """Start the next epoch; a pass that gave this process nothing is an error."""
        if not produced:
            raise XiaolmError("no usable records for this process", where=", ".join(map(str, self.files)),
                              hint='records need a "text" field or "messages"; see the rejects file')
        self.log_rejects(pass_ended=True)
        self.epoch, self.records_done = self.epoch + 1, 0

    def log_rejects(self, pass_ended: bool = False) -> None:
        """Say once how many records the first pass skipped: at its end, or when training stops before it."""
        if self.epoch == 0 and self.rejects.total:
            where = getattr(self.rejects, "log_path", None)
            log.warning("data stream (process %d): %d records skipped %s (%s)%s", self.rank, self.rejects.total,
                        "in the first pass" if pass_ended else "so far (the first pass did not end)",
                        self.rejects.summary(), f" — see {where}" if where else "")

    def _extra_state(self) -> dict[str, Any]:
        """The subclass's part of state_dict: the buffer and anything between records."""
        raise NotImplementedError

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the next item (tensors and plain types only)."""
        return {"epoch": self.epoch, "records_done": self.records_done,
                "rng": repr(self.rng.bit_generator.state), "rank": self.rank, "world": self.world,
                "rejected": dict(self.rejects.counts), "rejects_bytes": getattr(self.rejects, "size", 0),
                **self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict() of the same files, process and process count."""
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise XiaolmError(f"the data stream position was saved by process {state['rank']} of {state['world']}, "
                              f"this is process {self.rank} of {self.world}", where="data",
                              hint="resume a streaming run with the same number of processes")
        import ast

        self.epoch, self.records_done = state["epoch"], state["records_done"]
        self.rng.bit_generator.state = ast.literal_eval(state["rng"])
        self.rejects.counts.clear()
        self.rejects.counts.update(state.get("rejected", {}))
        if isinstance(self.rejects, _FirstPassRejects):
            self.rejects.close()
            self.rejects.size = state.get("rejects_bytes", 0)
        self._load_extra_state(state)
        self._source = None


class TokenStream(RecordStream):
    """[seq_len + 1] int64 windows of the documents (text, or chats rendered as ChatML) joined by EOS."""

    def __init__(self, inputs: Sequence[str | Path], tokenizer, seq_len: int, buffer_size: int = 1024,
                 seed: int = 0, rank: int = 0, world: int = 1, text_field: str = "text",
                 rejects: str | Path | None = None):
        super().__init__(inputs, buffer_size, seed, rank, world, rejects,
                         "pretraining text from (and it holds no meta.json of packed token files either)")
        self.tokenizer, self.seq_len, self.text_field = tokenizer, seq_len, text_field
        if tokenizer.eos_token is None:
            raise XiaolmError("the tokenizer has no EOS token to put between documents",
                              hint="use a tokenizer trained by `xiaolm tokenizer train` (it has <|endoftext|>)")
        self.eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        self.pending: list[int] = []  # tokens not yet filling a whole window

    def _items(self) -> Iterator[np.ndarray]:
        width = self.seq_len + 1

        def document(record: dict) -> str:
            return record_text(record, self.text_field, chat="chatml", allow_empty=False)[0]

        while True:
            for texts, upto in self._batches(document, self.records_done):
                for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                    self.pending.extend(ids)
                    self.pending.append(self.eos)
                self.records_done = upto
                while len(self.pending) >= width:
                    window, self.pending = self.pending[:width], self.pending[width:]
                    yield np.asarray(window, dtype=np.int64)
            self._end_of_pass(self.records_done > 0 or bool(self.pending))

    def _extra_state(self) -> dict[str, Any]:
        buffer = np.stack(self.buffer) if self.buffer else np.zeros((0, self.seq_len + 1), dtype=np.int64)
        return {"pending": torch.tensor(self.pending, dtype=torch.int64), "buffer": torch.from_numpy(buffer)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.pending = state["pending"].tolist()
        self.buffer = list(state["buffer"].numpy())


class ChatStream(RecordStream):
    """(input_ids, labels) int32 arrays of chat records, truncated to seq_len + 1, loss on assistant tokens."""

    def __init__(self, inputs: Sequence[str | Path], tokenizer, seq_len: int, buffer_size: int = 1024,
                 seed: int = 0, rank: int = 0, world: int = 1, rejects: str | Path | None = None):
        super().__init__(inputs, buffer_size, seed, rank, world, rejects, "chats from")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.pending: list[Example] = []  # encoded chats of consumed records not yet handed out

    def _items(self) -> Iterator[Example]:
        while True:
            produced = bool(self.pending)
            for examples, upto in self._batches(lambda r: encode_example(self.tokenizer, r, self.seq_len),
                                                self.records_done):
                self.pending.extend(examples)
                self.records_done = upto
                produced = True
                while self.pending:
                    yield self.pending.pop(0)
            while self.pending:  # left by a resumed state at the end of a pass
                yield self.pending.pop(0)
            self._end_of_pass(produced)

    def _extra_state(self) -> dict[str, Any]:
        return {**_examples_state("buffer", self.buffer), **_examples_state("pending", self.pending)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.buffer, self.pending = _examples_from_state("buffer", state), _examples_from_state("pending", state)




def _examples_state(name: str, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Variable-length examples as two tensors: lengths, and every example's ids then labels, concatenated."""
    flat = [a for ids, labels in examples for a in (ids, labels)]
    return {f"{name}_lengths": torch.tensor([len(ids) for ids, _ in examples], dtype=torch.int64),
            name: torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, dtype=np.int32))}


def _examples_from_state(name: str, state: dict[str, Any]) -> list[Example]:
    flat, out, at = state[name].numpy(), [], 0
    for n in state[f"{name}_lengths"].tolist():
        out.append((flat[at:at + n].copy(), flat[at + n:at + 2 * n].copy()))
        at += 2 * n
    return out



def validation_windows(inputs: Sequence[str | Path], tokenizer, seq_len: int, limit: int) -> np.ndarray:
    """Up to `limit` consecutive windows of the validation files (one pass, no shuffling)."""
    stream = TokenStream(inputs, tokenizer, seq_len, buffer_size=1)
    windows: list[np.ndarray] = []
    for window in stream._items():
        if stream.epoch > 0 or len(windows) == limit:
            break
        windows.append(window)
    if not windows:
        raise XiaolmError(f"validation files hold less than one window of {seq_len + 1} tokens",
                          where=", ".join(map(str, inputs)), hint="add validation text or lower data.seq_len")
    return np.stack(windows)
