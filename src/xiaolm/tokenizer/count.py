"""Counting pre-tokenized chunks of a corpus in bounded memory, over several processes.

Each process keeps a `BoundedCounter`: a Misra–Gries summary (batched decrements) holding at most `capacity`
distinct chunks. With N chunk occurrences seen, every estimate ĉ of a chunk whose true count is c satisfies

    c − D ≤ ĉ ≤ c,   D ≤ 2N / (capacity + 2),

where D (`dropped_max`) is the sum of the decrements, tracked exactly and reported. Every chunk with c > D
is in the table. Summaries of K processes are added: the bound becomes the sum of their D, at most
2N / (capacity_per_process + 2).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from xiaolm.tokenizer.pretokenize import ChunkSplitter

log = logging.getLogger(__name__)

_BATCH_CHARS = 1 << 18  # texts are shipped to workers in batches of about this many characters


class BoundedCounter:
    """Chunk → count with at most `capacity` entries; estimates are low by at most `dropped_max`."""

    def __init__(self, capacity: int):
        if capacity < 2:
            raise ValueError("capacity must be at least 2")
        self.capacity = capacity
        # stored value = Misra–Gries counter + offset, so a decrement of all counters is one addition to offset
        self._table: dict[str, int] = {}
        self.offset = 0
        self.total = 0  # N: occurrences seen
        self.prunes = 0

    def __len__(self) -> int:
        return len(self._table)

    @property
    def dropped_max(self) -> int:
        """D: no estimate is lower than the true count by more than this."""
        return self.offset

    def add_counts(self, counts: Iterable[tuple[str, int]]) -> None:
        """Add (chunk, occurrences) pairs, pruning whenever a new chunk would overflow the table."""
        table, cap = self._table, self.capacity
        for chunk, n in counts:
            self.total += n
            value = table.get(chunk)
            if value is not None:
                table[chunk] = value + n
                continue
            if len(table) >= cap:
                self._prune()
                table = self._table
            table[chunk] = self.offset + n

    def add_text_chunks(self, chunks: Iterable[str]) -> None:
        """Count a sequence of chunks."""
        self.add_counts(Counter(chunks).items())

    def _prune(self) -> None:
        """Decrement every counter by the (capacity/2 + 1)-th largest: at least that many counters lose it,
        so the decrements sum to at most 2N/(capacity+2); at most capacity/2 entries stay."""
        values = np.fromiter(self._table.values(), dtype=np.int64, count=len(self._table))
        rank = len(values) - (self.capacity // 2 + 1)
        threshold = int(np.partition(values, rank)[rank])
        self.offset = threshold
        self._table = {k: v for k, v in self._table.items() if v > threshold}
        self.prunes += 1

    def items(self) -> Iterator[tuple[str, int]]:
        """(chunk, estimated count) pairs, estimates ≥ 1."""
        offset = self.offset
        return ((k, v - offset) for k, v in self._table.items())


@dataclass
class CountResult:
    """Merged chunk counts of all workers and the error bound that holds for them."""

    counts: dict[str, int]
    total: int  # chunk occurrences seen
    dropped_max: int  # every count is low by at most this
    capacity: int  # entries allowed per worker
    workers: int
    prunes: int
    texts: int = 0
    chars: int = 0
    extra: dict = field(default_factory=dict)


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _count_into(counter: BoundedCounter, splitter: ChunkSplitter, batch: list[str]) -> None:
    counts: Counter[str] = Counter()
    for text in batch:
        counts.update(splitter.chunks(text))
    counter.add_counts(counts.items())


def _worker(inbox, outbox, capacity: int, cjk_chars: bool) -> None:
    counter, splitter = BoundedCounter(capacity), ChunkSplitter(cjk_chars)
    while (batch := inbox.get()) is not None:
        _count_into(counter, splitter, batch)
    outbox.put((dict(counter.items()), counter.total, counter.dropped_max, counter.prunes))


def _check_alive(procs: list) -> None:
    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
    if dead:
        raise RuntimeError(f"a chunk-counting process died (exit code {dead[0]}); out of memory? "
                           "lower --max-memory or --workers")


def _put(q, item, procs: list) -> None:
    while True:
        try:
            return q.put(item, timeout=1)
        except queue.Full:
            _check_alive(procs)


def _get(q, procs: list):
    while True:
        try:
            return q.get(timeout=1)
        except queue.Empty:
            _check_alive(procs)


def count_chunks(texts: Iterable[str], capacity: int, workers: int = 1, cjk_chars: bool = False) -> CountResult:
    """Count the chunks of `texts` with `workers` processes, each holding at most capacity/workers chunks."""
    per_worker = max(2, capacity // workers)
    stats = {"texts": 0, "chars": 0}

    def measured(items: Iterable[str]) -> Iterator[str]:
        for t in items:
            stats["texts"] += 1
            stats["chars"] += len(t)
            yield t

    if workers == 1:
        counter, splitter = BoundedCounter(per_worker), ChunkSplitter(cjk_chars)
        for batch in _batches(measured(texts)):
            _count_into(counter, splitter, batch)
        return CountResult(dict(counter.items()), counter.total, counter.dropped_max, per_worker, 1,
                           counter.prunes, **stats)
    # spawn, not fork: the caller may already run threads (torch, tokenizers' pool) that fork would copy mid-state
    ctx = mp.get_context("spawn")
    # batch i goes to worker i mod K, so each table sees the same stream on every run: deterministic pruning
    inboxes, outbox = [ctx.Queue(maxsize=2) for _ in range(workers)], ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(inbox, outbox, per_worker, cjk_chars), daemon=True)
             for inbox in inboxes]
    for p in procs:
        p.start()
    try:
        for i, batch in enumerate(_batches(measured(texts))):
            _put(inboxes[i % workers], batch, procs)
        for inbox in inboxes:
            _put(inbox, None, procs)
        merged: Counter[str] = Counter()
        total = dropped = prunes = 0
        for _ in procs:
            counts, n, d, k = _get(outbox, procs)
            merged.update(counts)
            del counts
            total, dropped, prunes = total + n, dropped + d, prunes + k
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    return CountResult(merged, total, dropped, per_worker, workers, prunes, **stats)


def default_workers() -> int:
    """One counting process per available CPU, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))
