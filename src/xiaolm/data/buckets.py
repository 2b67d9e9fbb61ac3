"""The files dedup's tasks hand on: bucket rows by partition, and signatures read back by document key.

A document's key is (input file index << SHARD_BITS) | its position in that file, so sorting keys is input order.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from xiaolm.data.minhash import estimate_jaccard

ROW = np.dtype([("bucket", "<u8"), ("doc", "<u8")])  # one band bucket of one document
SHARD_BITS = 40  # a document key is (input file index << 40) | position in that file: sorting keys = input order
BUCKET_BUFFER = 16 << 20  # bytes of bucket rows a sign task gathers before appending them to the partitions
SIMILARITY_CHUNK = 1 << 16  # pairs whose signatures are read at once (2 × 512 bytes each with 128 permutations)


class Partitions:
    """Bucket rows appended to partition files by their bucket's hash, gathered first so that one file is open at
    a time: 100 GB of input makes about a thousand partitions, past a common `ulimit -n` of 1024."""

    def __init__(self, out: Path, count: int):
        self.paths = [out / f"buckets-{p:05d}.bin" for p in range(count)]
        for path in self.paths:
            path.write_bytes(b"")
        self.pending: list[np.ndarray] = []
        self.size = 0

    def add(self, rows: np.ndarray) -> None:
        """Queue rows; written once BUCKET_BUFFER bytes are waiting."""
        self.pending.append(rows)
        self.size += rows.nbytes
        if self.size >= BUCKET_BUFFER:
            self.flush()

    def flush(self) -> None:
        """Append the waiting rows to their partitions, in the order they came (as if written batch by batch)."""
        if not self.pending:
            return
        table = np.concatenate(self.pending)
        self.pending, self.size = [], 0
        part = (table["bucket"] >> np.uint64(32)) % np.uint64(len(self.paths))
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(len(self.paths) + 1))
        for p in np.flatnonzero(np.diff(bounds)).tolist():
            with open(self.paths[p], "ab") as f:
                table[order[bounds[p]:bounds[p + 1]]].tofile(f)


class Signatures:
    """The signatures and exact hashes of given documents, read row by row from the signed shards' files."""

    def __init__(self, sign_dir: Path, num_perm: int):
        self.sign_dir, self.num_perm = sign_dir, num_perm

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(signatures, exact hashes) of documents by key; memory grows with len(keys), not with the shards."""
        sig = np.empty((len(keys), self.num_perm), np.uint32)
        exact = np.empty(len(keys), np.uint64)
        shard, pos = keys >> np.uint64(SHARD_BITS), keys & np.uint64((1 << SHARD_BITS) - 1)
        width = self.num_perm * 4
        for i in np.unique(shard).tolist():
            rows = np.flatnonzero(shard == i)
            folder = self.sign_dir / f"{i:05d}"
            with open(folder / "sig.bin", "rb") as s, open(folder / "exact.bin", "rb") as e:
                sig_fd, exact_fd = s.fileno(), e.fileno()
                for row, p in zip(rows.tolist(), pos[rows].tolist(), strict=True):
                    sig[row] = np.frombuffer(os.pread(sig_fd, width, p * width), np.uint32)
                    exact[row] = int.from_bytes(os.pread(exact_fd, 8, p * 8), "little")
        return sig, exact

    def similarity(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(estimated Jaccard, exact-duplicate flag) of document pairs, SIMILARITY_CHUNK pairs at a time."""
        jaccard, exact, chunk = np.empty(len(a), np.float64), np.empty(len(a), bool), SIMILARITY_CHUNK
        for start in range(0, len(a), chunk):
            sig_a, ex_a = self.get(a[start:start + chunk])
            sig_b, ex_b = self.get(b[start:start + chunk])
            jaccard[start:start + chunk] = estimate_jaccard(sig_a, sig_b)
            exact[start:start + chunk] = ex_a == ex_b
        return jaccard, exact
