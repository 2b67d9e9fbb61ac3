"""Counting pre-tokenized chunks of a corpus in bounded memory, over several processes.

Each process keeps a `BoundedCounter`: a Misra–Gries summary (batched decrements) holding at most `capacity`
distinct chunks. With N chunk occurrences seen, every estimate ĉ of a chunk whose true count is c satisfies

    c − D ≤ ĉ ≤ c,   D ≤ 2N / (capacity + 2),

where D (`dropped_max`) is the sum of the decrements, tracked exactly and reported. Every chunk with c > D
is in the table. Summaries of K processes are added: the bound becomes the sum of their D, at most
2N / (capacity_per_process + 2). A counting table entry is small (~200 bytes), while the BPE trainer needs ~2 KB
per chunk, so the tables hold several times more chunks than the trainer gets: the `keep` most frequent.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from xiaolm.tokenizer.pretokenize import ChunkRules, ChunkSplitter

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

    def release(self) -> dict[str, int]:
        """The table as chunk → estimate, handed over without a copy; the counter is empty afterwards."""
        table, offset = self._table, self.offset
        if offset:
            for k in table:
                table[k] -= offset
        self._table, self.offset = {}, 0
        return table

    def items(self) -> Iterator[tuple[str, int]]:
        """(chunk, estimated count) pairs, estimates ≥ 1."""
        offset = self.offset
        return ((k, v - offset) for k, v in self._table.items())


@dataclass
class CountResult:
    """Merged chunk counts of all workers (the `keep` most frequent) and the error bound that holds for them."""

    counts: dict[str, int]
    total: int  # chunk occurrences seen
    dropped_max: int  # every count is low by at most this (the sum of the workers' D)
    capacity: int  # entries allowed per worker
    workers: int
    prunes: int
    distinct: int = 0  # distinct chunks in the merged tables, before keeping the most frequent
    min_kept: int = 0  # the smallest count kept (0 when all were kept)
    texts: int = 0
    chars: int = 0


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


def most_frequent(counts: dict[str, int], keep: int) -> tuple[dict[str, int], int]:
    """The `keep` highest counts (ties at the cut broken by chunk order) and the smallest count kept (0: all)."""
    if len(counts) <= keep:
        return counts, 0
    values = np.fromiter(counts.values(), dtype=np.int64, count=len(counts))
    cut = int(np.partition(values, len(values) - keep)[len(values) - keep])
    kept = {k: v for k, v in counts.items() if v > cut}
    ties = sorted(k for k, v in counts.items() if v == cut)[:keep - len(kept)]
    kept.update(dict.fromkeys(ties, cut))
    return kept, cut


def _worker(rank: int, inbox, peers, n_peers: int, outbox, capacity: int, keep: int, rules: ChunkRules) -> None:
    """Count one share of the batches; worker 0 then merges every table and sends the most frequent chunks."""
    counter, splitter = BoundedCounter(capacity), ChunkSplitter(rules)
    while (batch := inbox.get()) is not None:
        _count_into(counter, splitter, batch)
    total, dropped, prunes = counter.total, counter.dropped_max, counter.prunes
    merged = counter.release()
    if rank:
        peers.put((merged, total, dropped, prunes))
        return
    for _ in range(n_peers):
        counts, n, d, k = peers.get()
        for chunk, c in counts.items():
            merged[chunk] = merged.get(chunk, 0) + c
        del counts
        total, dropped, prunes = total + n, dropped + d, prunes + k
    distinct = len(merged)
    kept, cut = most_frequent(merged, keep)
    del merged
    outbox.put((kept, total, dropped, prunes, distinct, cut))


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


def count_chunks(texts: Iterable[str], capacity: int, workers: int = 1, rules: ChunkRules | None = None,
                 keep: int | None = None) -> CountResult:
    """Count the chunks of `texts` with `workers` processes, each holding at most capacity/workers chunks;
    return the `keep` most frequent (all by default).

    With workers > 1 the tables are merged and cut to `keep` in a worker process, so this process never holds
    more than `keep` chunks (memory a big table leaves behind in Python is not always given back).
    """
    per_worker = max(2, capacity // workers)
    keep = capacity if keep is None else keep
    rules = ChunkRules() if rules is None else rules
    stats = {"texts": 0, "chars": 0}

    def measured(items: Iterable[str]) -> Iterator[str]:
        for t in items:
            stats["texts"] += 1
            stats["chars"] += len(t)
            yield t

    if workers == 1:
        counter, splitter = BoundedCounter(per_worker), ChunkSplitter(rules)
        for batch in _batches(measured(texts)):
            _count_into(counter, splitter, batch)
        total, dropped, prunes = counter.total, counter.dropped_max, counter.prunes
        counts = counter.release()
        kept, cut = most_frequent(counts, keep)
        return CountResult(kept, total, dropped, per_worker, 1, prunes, len(counts), cut, **stats)
    # spawn, not fork: the caller may already run threads (torch, tokenizers' pool) that fork would copy mid-state
    ctx = mp.get_context("spawn")
    # batch i goes to worker i mod K, so each table sees the same stream on every run: deterministic pruning
    inboxes, peers, outbox = [ctx.Queue(maxsize=2) for _ in range(workers)], ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(rank, inbox, peers, workers - 1, outbox, per_worker, keep, rules))
             for rank, inbox in enumerate(inboxes)]
    for p in procs:
        p.start()
    try:
        for i, batch in enumerate(_batches(measured(texts))):
            _put(inboxes[i % workers], batch, procs)
        for inbox in inboxes:
            _put(inbox, None, procs)
        kept, total, dropped, prunes, distinct, cut = _get(outbox, procs)
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    return CountResult(kept, total, dropped, per_worker, workers, prunes, distinct, cut, **stats)


def default_workers() -> int:
    """One counting process per available CPU, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))
