"""Deduplication: exact hashes + MinHash/LSH on character n-grams, in disk-backed shard-parallel stages.

Stages, each a set of tasks run by `executor.StageRunner` (a rerun skips finished tasks):
  sign      one task per input file: the parsed records (with id and source), text → MinHash signature (numpy, a
            batch of documents at once), exact hash, and one bucket row per LSH band (plus one for the exact
            hash), appended to `partitions` bucket files
  pairs     one task per bucket partition: sort the rows, pair documents sharing a bucket, keep a pair if it is
            an exact duplicate or its signatures agree on ≥ threshold of the permutations (estimated Jaccard)
  clusters  one task: union-find over the kept pairs; each cluster keeps its first document in input order
  filter    one task per input file: kept records → part-NNNNN.jsonl (copied as text), removed ones (with the
            kept id) aside
Memory: a sign task holds `batch_chars` characters of text at once, a pairs task one partition of bucket rows
(about 3 × `partition_mb`), the cluster task the duplicate pairs only; nothing holds the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xiaolm.data.executor import WORK, StageRunner, work_dir
from xiaolm.data.read import (
    MAX_EXAMPLES,
    RejectLog,
    merge_examples,
    plan_stage,
    read_records,
    reject_summary,
    where_at,
    where_number,
)
from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_open, atomic_write_json, atomic_write_text, concat_files, json_line, json_text

log = logging.getLogger(__name__)

REMOVED = "_removed.jsonl"  # leading underscore: later stages reading this directory skip it
ROW = np.dtype([("bucket", "<u8"), ("doc", "<u8")])  # one band bucket of one document
SHARD_BITS = 40  # a document key is (input file index << 40) | position in that file: sorting keys = input order
_M64 = np.uint64(0xFF51AFD7ED558CCD)
_BASE = np.uint64(0x100000001B3)
_EXACT_DOMAIN = 0x9E3779B97F4A7C15
_PREVIEW = 120
_CHUNK = 1 << 17
SIMILARITY_CHUNK = 1 << 16  # pairs whose signatures are read at once (2 × 512 bytes each with 128 permutations)


@dataclass
class DedupConfig:
    """Near-duplicates are documents whose character n-gram sets have Jaccard similarity ≥ threshold."""

    threshold: float = 0.8
    ngram: int = 5  # characters per shingle, taken after removing whitespace
    num_perm: int = 128  # MinHash permutations
    bands: int = 0  # LSH bands × rows ≤ num_perm; 0: chosen so a pair at the threshold is a candidate w.p. ≥ 0.99
    rows: int = 0
    seed: int = 1
    text_field: str = "text"  # chat records ({"messages"} or {"prompt","response"}) use their joined contents
    batch_chars: int = 250_000  # text signed at once by one task (≈ 40 bytes of memory per character)
    partitions: int = 0  # bucket files; 0: enough that each holds about partition_mb of rows
    partition_mb: int = 256


def choose_bands(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows): the most rows per band for which a pair at `threshold` shares a bucket w.p. ≥ recall."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if candidate_probability(threshold, bands, rows) >= recall:
            return bands, rows
    return num_perm, 1


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """Chance that two documents with this Jaccard similarity share at least one LSH band bucket."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def _lsh_shape(cfg: DedupConfig) -> tuple[int, int]:
    if cfg.bands and cfg.rows:
        return cfg.bands, cfg.rows
    return choose_bands(cfg.threshold, cfg.num_perm)


def _check(cfg: DedupConfig) -> None:
    bands, rows = _lsh_shape(cfg)
    problems = []
    if not 0 < cfg.threshold <= 1:
        problems.append(f"threshold={cfg.threshold} (need 0 < threshold <= 1)")
    if cfg.ngram < 1 or cfg.num_perm < 1:
        problems.append(f"ngram={cfg.ngram} num_perm={cfg.num_perm} (need ≥ 1)")
    if bool(cfg.bands) != bool(cfg.rows) or bands * rows > cfg.num_perm or bands < 1 or rows < 1:
        problems.append(f"bands={cfg.bands} rows={cfg.rows} (set both, bands × rows ≤ num_perm, or both 0)")
    if cfg.batch_chars < 1 or cfg.partitions < 0 or cfg.partition_mb < 1:
        problems.append("batch_chars and partition_mb must be ≥ 1, partitions ≥ 0")
    if problems:
        raise XiaolmError("bad dedup settings: " + "; ".join(problems), where="config")


# ---------------------------------------------------------------- the math: pure functions on numpy arrays


def normalize(text: str) -> str:
    """The text that is compared: whitespace removed."""
    return "".join(text.split())


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (a, b) of the hash permutations x → a·x + b mod 2³² (a odd)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    return a, b


def _mix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place: every input bit affects every output bit."""
    h ^= h >> np.uint64(33)
    h *= _M64
    h ^= h >> np.uint64(33)
    return h


def shingle_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every character n-gram of each text (concatenated) and each text's first index.

    Texts shorter than n are padded with NUL so every text has at least one shingle.
    """
    padded = [t if len(t) >= ngram else t + "\0" * (ngram - len(t)) for t in texts]
    lengths = np.fromiter((len(t) for t in padded), dtype=np.int64, count=len(padded))
    cps = np.frombuffer("".join(padded).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    # rolling polynomial hash of n consecutive codepoints (wrapping uint64 arithmetic)
    width = len(cps) - ngram + 1
    h = cps[:width].copy()
    for j in range(1, ngram):
        h *= _BASE
        h += cps[j:j + width]
    counts = lengths - ngram + 1
    starts = np.cumsum(lengths) - lengths
    firsts = np.cumsum(counts) - counts
    # positions whose n-gram lies inside one text (not across the boundary to the next)
    valid = np.repeat(starts - firsts, counts) + np.arange(int(counts.sum()))
    h = _mix64(h[valid])
    return (h >> np.uint64(32)).astype(np.uint32), firsts


def minhash(texts: list[str], ngram: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signatures, shape (len(texts), len(a)) uint32, of the texts' character n-gram sets."""
    sig = np.empty((len(a), len(texts)), dtype=np.uint32)
    if not texts:
        return sig.T
    h, firsts = shingle_hashes(texts, ngram)
    # groups of documents with about _CHUNK shingles: one pass per permutation over a group stays in the CPU cache
    bounds = np.unique(np.searchsorted(firsts, np.arange(0, len(h), _CHUNK)))
    for lo, hi in zip(bounds, [*bounds[1:], len(texts)], strict=True):
        start, stop = firsts[lo], firsts[hi] if hi < len(texts) else len(h)
        part, offsets = h[start:stop], firsts[lo:hi] - start
        buf = np.empty_like(part)
        for p in range(len(a)):
            np.multiply(part, a[p], out=buf)
            buf += b[p]
            np.minimum.reduceat(buf, offsets, out=sig[p, lo:hi])
    return np.ascontiguousarray(sig.T)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Share of permutations on which two signatures (or rows of two signature arrays) agree."""
    return (sig_a == sig_b).mean(axis=-1)


def exact_hash(text: str) -> int:
    """64-bit hash of a normalized text."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def band_buckets(sig: np.ndarray, exact: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Bucket ids, shape (docs, bands + 1): one per band of `rows` signature values, the last from the exact hash."""
    out = np.empty((len(sig), bands + 1), dtype=np.uint64)
    for k in range(bands):
        h = np.full(len(sig), k + 1, dtype=np.uint64)
        for v in sig[:, k * rows:(k + 1) * rows].T:
            h ^= v.astype(np.uint64)
            h *= _BASE
        out[:, k] = _mix64(h)
    out[:, bands] = _mix64(exact ^ np.uint64(_EXACT_DOMAIN))
    return out


def connected_first(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over edges a–b between integer keys: (keys, smallest key of each key's component)."""
    keys = np.unique(np.concatenate([a, b]))
    ia, ib = np.searchsorted(keys, a), np.searchsorted(keys, b)
    label = np.arange(len(keys))
    while True:  # min-label propagation with pointer jumping; labels only decrease, so this terminates
        low = np.minimum(label[ia], label[ib])
        new = label.copy()
        np.minimum.at(new, ia, low)
        np.minimum.at(new, ib, low)
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return keys, keys[label]
        label = new


def bucket_pairs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (a < b) from bucket rows: each document with its bucket's first and previous document."""
    bucket = rows["bucket"]
    order = np.argsort(bucket)
    sorted_buckets = bucket[order]
    same = sorted_buckets[1:] == sorted_buckets[:-1]
    shared = np.zeros(len(rows), dtype=bool)  # rows in a bucket with another row: few, sorted fully below
    shared[1:] |= same
    shared[:-1] |= same
    rows = rows[order[shared]]
    order = np.lexsort((rows["doc"], rows["bucket"]))
    bucket, doc = rows["bucket"][order], rows["doc"][order]
    n = len(rows)
    if n < 2:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    new = np.ones(n, dtype=bool)
    new[1:] = bucket[1:] != bucket[:-1]
    first = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    member = np.flatnonzero(~new)
    a = np.concatenate([doc[first[member]], doc[member - 1]])
    b = np.concatenate([doc[member], doc[member]])
    keep = a != b
    pairs = np.unique(np.stack([np.minimum(a, b)[keep], np.maximum(a, b)[keep]], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


# ---------------------------------------------------------------- reading documents


def document_text(record: dict, text_field: str) -> str | None:
    """The text to compare: the text field, or a chat's message contents joined; None if neither; ValueError
    for a malformed chat."""
    value = record.get(text_field)
    if isinstance(value, str):
        return value
    if "messages" in record or ("prompt" in record and "response" in record):
        from xiaolm.tokenizer.chat import normalize_chat

        return "\n".join(m["content"] for m in normalize_chat(record))
    return None


def read_documents(path: Path, text_field: str, rejects: RejectLog | None) -> Iterator[tuple[dict, str, str]]:
    """(record, "file:line", normalized text) of every usable record of one file; others go to rejects."""
    for record, where in read_records([path], rejects):
        try:
            text = document_text(record, text_field)
        except ValueError as e:
            if rejects is not None:
                rejects.add("bad_chat", where, record, str(e))
            continue
        if text is None:
            if rejects is not None:
                detail = (f"'{text_field}' is a {type(record[text_field]).__name__}, not a string"
                          if text_field in record else f"no '{text_field}' field and not a chat record")
                rejects.add("missing_field", where, record, detail)
            continue
        yield record, where, normalize(text)


def record_id(record: dict, text: str) -> str:
    """The record's own id, else a stable one from its text."""
    if record.get("id") is not None:
        return str(record["id"])
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


# ---------------------------------------------------------------- the stages' tasks (module level: picklable)


def sign_shard(out: Path, shard: int, path: str, cfg: DedupConfig, partitions: int) -> dict:
    """Records (with id and source), line numbers, signatures, exact hashes and bucket rows of one input file."""
    bands, rows = _lsh_shape(cfg)
    a, b = permutations(cfg.num_perm, cfg.seed)
    files = [open(out / f"buckets-{p:05d}.bin", "wb") for p in range(partitions)]
    n = batches = max_batch = 0
    texts: list[str] = []
    exact: list[int] = []
    lines: list[int] = []
    source = Path(path).name

    def flush() -> None:
        nonlocal n, batches, max_batch
        if not texts:
            return
        sig = minhash(texts, cfg.ngram, a, b)
        ex = np.array(exact, dtype=np.uint64)
        sig.tofile(sig_file)
        ex.tofile(exact_file)
        np.array(lines, dtype=np.uint32).tofile(lines_file)
        buckets = band_buckets(sig, ex, bands, rows)
        docs = (np.uint64(shard) << np.uint64(SHARD_BITS)) + np.arange(n, n + len(texts), dtype=np.uint64)
        table = np.empty(buckets.size, dtype=ROW)
        table["bucket"] = buckets.ravel()
        table["doc"] = np.repeat(docs, bands + 1)
        part = (table["bucket"] >> np.uint64(32)) % np.uint64(partitions)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(partitions + 1))
        for p in range(partitions):
            table[order[bounds[p]:bounds[p + 1]]].tofile(files[p])
        n += len(texts)
        batches += 1
        max_batch = max(max_batch, sum(map(len, texts)))
        texts.clear()
        exact.clear()
        lines.clear()

    chars = 0
    try:
        with RejectLog(out / "rejects.jsonl") as rejects, open(out / "sig.bin", "wb") as sig_file, \
                open(out / "exact.bin", "wb") as exact_file, open(out / "lines.bin", "wb") as lines_file, \
                open(out / "records.jsonl", "w", encoding="utf-8") as records:
            for record, where, text in read_documents(Path(path), cfg.text_field, rejects):
                if texts and chars + len(text) > cfg.batch_chars:
                    flush()
                    chars = 0
                texts.append(text)
                exact.append(exact_hash(text))
                chars += len(text)
                lines.append(where_number(where))
                rec = {**record, "id": record_id(record, text), "source": record.get("source") or source}
                records.write(json_line(rec))
            flush()
    finally:
        for f in files:
            f.close()
    return {"path": path, "docs": n, "rejected": dict(rejects.counts), "examples": dict(rejects.examples),
            "batches": batches, "max_batch_chars": max_batch}


class _Signatures:
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


def pair_partition(out: Path, part: int, sign_dir: str, docs: list[int], cfg: DedupConfig) -> dict:
    """Candidate pairs of one bucket partition, kept if exact or with estimated Jaccard ≥ threshold.

    What is written is a spanning forest of the verified pairs (each document joined to the first of its
    component): the same clusters from at most one edge per document, however many pairs verified.
    """
    rows = np.concatenate([np.fromfile(Path(sign_dir) / f"{i:05d}" / f"buckets-{part:05d}.bin", dtype=ROW)
                           for i in range(len(docs))] or [np.zeros(0, ROW)])
    a, b = bucket_pairs(rows)
    jaccard, exact = _Signatures(Path(sign_dir), cfg.num_perm).similarity(a, b)
    keep = exact | (jaccard >= cfg.threshold)
    keys, roots = connected_first(a[keep], b[keep])
    joined = keys != roots
    np.stack([keys[joined], roots[joined]], axis=1).astype(np.uint64).tofile(out / "edges.bin")
    return {"rows": int(len(rows)), "candidates": int(len(a)), "verified": int(keep.sum()),
            "edges": int(joined.sum())}


def cluster_all(out: Path, pairs_dir: str, sign_dir: str, docs: list[int], partitions: int, cfg: DedupConfig,
                examples: int) -> dict:
    """Union-find over all verified pairs; per input file, which documents go and which document they keep to."""
    edges = np.concatenate([np.fromfile(Path(pairs_dir) / f"{p:05d}" / "edges.bin", dtype=np.uint64)
                            for p in range(partitions)]).reshape(-1, 2)
    keys, roots = connected_first(edges[:, 0], edges[:, 1])
    gone = keys != roots
    removed, kept = keys[gone], roots[gone]
    jaccard, exact = _Signatures(Path(sign_dir), cfg.num_perm).similarity(removed, kept)
    ids = _lookup_ids(Path(sign_dir), np.unique(kept))
    shard = removed >> np.uint64(SHARD_BITS)
    pos = removed & np.uint64((1 << SHARD_BITS) - 1)
    for i in range(len(docs)):
        mask = shard == i
        with atomic_open(out / f"removed-{i:05d}.jsonl", "w") as f:
            for p, k, j, x in zip(pos[mask].tolist(), kept[mask].tolist(), jaccard[mask].tolist(),
                                  exact[mask].tolist(), strict=True):
                f.write(json_line([p, k, ids[k], round(j, 4), x]))
    cluster_roots, sizes = np.unique(roots, return_counts=True)
    # examples: the largest clusters, then the least similar near duplicates (the ones the threshold decides)
    largest = cluster_roots[np.argsort(-sizes, kind="stable")[:examples]].tolist()
    near = np.flatnonzero(~exact)
    borderline = near[np.argsort(jaccard[near], kind="stable")[:examples]]

    def member(i: int) -> list:
        return [int(removed[i]), round(float(jaccard[i]), 4), bool(exact[i])]

    size = dict(zip(cluster_roots.tolist(), sizes.tolist(), strict=True))
    shown = [{"kind": "largest", "size": size[r], "kept": r,
              "removed": [member(i) for i in np.flatnonzero(kept == r)[:MAX_EXAMPLES]]} for r in largest]
    shown += [{"kind": "borderline", "size": size[int(kept[i])], "kept": int(kept[i]), "removed": [member(i)]}
              for i in borderline]
    histogram = Counter(sizes.tolist())
    return {"clusters": int(len(cluster_roots)), "removed_exact": int(exact.sum()),
            "removed_near": int((~exact).sum()), "sizes": {str(k): v for k, v in sorted(histogram.items())},
            "examples": shown}


def _lookup_ids(sign_dir: Path, keys: np.ndarray) -> dict[int, str]:
    """Record ids of the given documents, reading each needed shard's records once."""
    out: dict[int, str] = {}
    shard = keys >> np.uint64(SHARD_BITS)
    for i in np.unique(shard).tolist():
        wanted = {k & ((1 << SHARD_BITS) - 1): k for k in keys[shard == i].tolist()}
        with open(sign_dir / f"{i:05d}" / "records.jsonl", encoding="utf-8") as f:
            for pos, line in enumerate(f):
                if pos in wanted:
                    out[wanted[pos]] = json.loads(line)["id"]
    return out


def filter_shard(out: Path, shard: int, path: str, sign_dir: str, cluster_dir: str, target: str,
                 text_field: str, preview: list[int]) -> dict:
    """Copy one input file's kept records to `target`; its removed ones, with the kept id, go to out/."""
    removed = {}
    with open(Path(cluster_dir) / f"removed-{shard:05d}.jsonl", encoding="utf-8") as f:
        for line in f:
            pos, _, kept_id, jaccard, exact = json.loads(line)
            removed[pos] = (kept_id, jaccard, exact)
    signed = Path(sign_dir) / f"{shard:05d}"
    lines = np.fromfile(signed / "lines.bin", dtype=np.uint32)
    base = shard << SHARD_BITS
    want = {k - base for k in preview if k >> SHARD_BITS == shard}
    previews = {}
    kept = 0
    with open(signed / "records.jsonl", encoding="utf-8") as src, atomic_open(target, "w") as part, \
            open(out / "removed.jsonl", "w", encoding="utf-8") as gone:
        for pos, line in enumerate(src):  # records were parsed once, by the sign task; copied as text here
            if pos in want:
                rec = json.loads(line)
                text = normalize(document_text(rec, text_field) or "")
                previews[str(base + pos)] = {"id": rec["id"], "where": where_at(path, lines[pos]),
                                             "text": text[:_PREVIEW] + ("…" if len(text) > _PREVIEW else "")}
            if pos in removed:
                kept_id, jaccard, exact = removed[pos]
                row = {"id": json.loads(line)["id"], "kept_id": kept_id, "exact": exact, "jaccard": jaccard,
                       "where": where_at(path, lines[pos])}
                gone.write(json_text(row)[:-1] + ', "record": ' + line.rstrip("\n") + "}\n")
            else:
                part.write(line)
                kept += 1
    return {"kept": kept, "removed": len(removed), "previews": previews}


# ---------------------------------------------------------------- the driver


def _auto_partitions(files: list[Path], cfg: DedupConfig) -> int:
    if cfg.partitions:
        return cfg.partitions
    bands, _ = _lsh_shape(cfg)
    # a conservative guess of the document count: one per 64 bytes of input (gzip: ×4)
    size = sum(f.stat().st_size * (4 if f.name.endswith(".gz") else 1) for f in files)
    row_bytes = size / 64 * (bands + 1) * ROW.itemsize
    return max(1, math.ceil(row_bytes / (cfg.partition_mb << 20)))


def dedup_files(inputs: list[str | Path], out_dir: str | Path, cfg: DedupConfig | None = None,
                executor: str = "local", workers: int = 0) -> dict:
    """Remove exact and near duplicates: out_dir/part-NNNNN.jsonl per input file, _removed.jsonl, report.json."""
    cfg = cfg or DedupConfig()
    _check(cfg)
    out_dir = Path(out_dir)
    files, fingerprint, config_text, report = plan_stage("data/dedup", inputs, out_dir, cfg)
    if report is not None:
        return report
    if not files:
        raise XiaolmError("no input records files", where=" ".join(map(str, inputs)),
                          hint="pass .jsonl/.json/.txt files (optionally .gz), globs or directories")
    work = work_dir(out_dir, config_text, fingerprint, outputs=["part-*.jsonl"])
    partitions = _auto_partitions(files, cfg)
    bands, rows = _lsh_shape(cfg)
    seconds: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    with StageRunner(executor, workers) as runner:
        signed, paired, clustered, filtered = _run_stages(runner, files, out_dir, cfg, partitions, lap)
    docs = [s["docs"] for s in signed]
    concat_files([work / "sign" / f"{i:05d}" / "rejects.jsonl" for i in range(len(files))], out_dir / "rejects.jsonl")
    concat_files([work / "filter" / f"{i:05d}" / "removed.jsonl" for i in range(len(files))], out_dir / REMOVED)
    rejected: Counter[str] = Counter()
    reject_examples: dict[str, list] = {}
    for s in signed:
        rejected.update(s["rejected"])
        merge_examples(reject_examples, s["examples"])
    previews = {k: v for f in filtered for k, v in f["previews"].items()}
    examples = [{"kind": e["kind"], "size": e["size"], "kept": previews[str(e["kept"])],
                 "removed": [{**previews[str(k)], "jaccard": j, "exact": x} for k, j, x in e["removed"]]}
                for e in clustered["examples"]]
    kept = sum(f["kept"] for f in filtered)
    removed = sum(f["removed"] for f in filtered)
    lap("merge")
    report = {
        "records_in": sum(docs) + sum(rejected.values()), "records_out": kept,
        "removed": {"exact": clustered["removed_exact"], "near": clustered["removed_near"]},
        "rejected": dict(rejected.most_common()),
        "clusters": {"count": clustered["clusters"], "sizes": clustered["sizes"], "examples": examples},
        "reject_examples": reject_examples,
        "lsh": {"threshold": cfg.threshold, "ngram": cfg.ngram, "num_perm": cfg.num_perm, "bands": bands,
                "rows": rows, "candidate_probability_at_threshold": round(
                    candidate_probability(cfg.threshold, bands, rows), 4)},
        "work": {"shards": len(files), "partitions": partitions, "executor": executor,
                 "bucket_rows": sum(p["rows"] for p in paired),
                 "candidate_pairs": sum(p["candidates"] for p in paired),
                 "verified_pairs": sum(p["verified"] for p in paired),
                 "cluster_edges": sum(p["edges"] for p in paired),
                 "max_batch_chars": max(s["max_batch_chars"] for s in signed)},
        "seconds": {**seconds, "total": round(time.perf_counter() - start, 3)},
        "inputs": fingerprint,
    }
    assert kept + removed == sum(docs)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "config.yaml", config_text)
    atomic_write_text(out_dir / "_SUCCESS", "")
    shutil.rmtree(work)  # the intermediate files (a copy of the corpus and its signatures) are not needed now
    log.info("data/dedup: %d in, %d out, %d removed (%d exact, %d near) in %d clusters, %d rejected (%s) — see %s",
             report["records_in"], kept, removed, clustered["removed_exact"], clustered["removed_near"],
             clustered["clusters"], sum(rejected.values()),
             reject_summary(rejected), out_dir / "rejects.jsonl")
    return report


def _run_stages(runner: StageRunner, files: list[Path], out_dir: Path, cfg: DedupConfig, partitions: int,
                lap: Callable[[str], None]) -> tuple[list[dict], list[dict], dict, list[dict]]:
    """sign → pairs → clusters → filter; each skips the tasks an earlier run finished."""
    work = out_dir / WORK
    sign_dir, pairs_dir, cluster_dir = work / "sign", work / "pairs", work / "clusters"
    signed = runner.run(sign_shard, [(f"{i:05d}", (i, str(f), cfg, partitions)) for i, f in enumerate(files)],
                        sign_dir, desc="data/dedup sign")
    docs = [s["docs"] for s in signed]
    lap("sign")
    paired = runner.run(pair_partition, [(f"{p:05d}", (p, str(sign_dir), docs, cfg)) for p in range(partitions)],
                        pairs_dir, desc="data/dedup pairs")
    lap("pairs")
    (clustered,) = runner.run(cluster_all, [("all", (str(pairs_dir), str(sign_dir), docs, partitions, cfg,
                                                     MAX_EXAMPLES))], cluster_dir, desc="data/dedup clusters")
    lap("clusters")
    preview = sorted({k for e in clustered["examples"] for k in [e["kept"], *(m[0] for m in e["removed"])]})
    filtered = runner.run(filter_shard, [(f"{i:05d}", (i, str(f), str(sign_dir), str(cluster_dir / "all"),
                                                       str(out_dir / f"part-{i:05d}.jsonl"), cfg.text_field,
                                                       preview))
                                         for i, f in enumerate(files)], work / "filter", desc="data/dedup filter")
    lap("filter")
    return signed, paired, clustered, filtered

