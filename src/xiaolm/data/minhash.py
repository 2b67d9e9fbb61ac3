"""MinHash and LSH on character n-grams: pure functions on numpy arrays, the math of `xiaolm data dedup`.

A document is its set of character n-grams (whitespace removed); MinHash signatures estimate the Jaccard
similarity of two sets, and LSH bands put documents whose signatures agree on a whole band into one bucket, so that
only documents sharing a bucket are compared.
"""

from __future__ import annotations

import hashlib

import numpy as np

_M64 = np.uint64(0xFF51AFD7ED558CCD)
_BASE = np.uint64(0x100000001B3)
_EXACT_DOMAIN = 0x9E3779B97F4A7C15
_CHUNK = 1 << 17


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
