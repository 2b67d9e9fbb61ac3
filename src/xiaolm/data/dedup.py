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
Memory: a sign task holds `batch_chars` characters of text at once (and up to BUCKET_BUFFER bytes of bucket rows),
a pairs task one partition of bucket rows (about 3 × `partition_mb`), the cluster task the duplicate pairs only;
nothing holds the corpus. Open files: a task keeps a handful open, however many partitions there are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xiaolm.data.buckets import ROW, SHARD_BITS, Partitions, Signatures
from xiaolm.data.executor import WORK, StageRunner, work_dir
from xiaolm.data.minhash import (
    band_buckets,
    bucket_pairs,
    candidate_probability,
    choose_bands,
    connected_first,
    exact_hash,
    minhash,
    normalize,
    permutations,
)
from xiaolm.data.stage import finish_stage, gather_rejects, plan_stage
from xiaolm.errors import Unusable, XiaolmError
from xiaolm.io import atomic_open, concat_files, json_line, json_text
from xiaolm.records.read import read_records, where_at, where_number
from xiaolm.records.rejects import MAX_EXAMPLES, RejectLog, reject_summary
from xiaolm.records.text import record_text

log = logging.getLogger(__name__)

REMOVED = "_removed.jsonl"  # leading underscore: later stages reading this directory skip it
_PREVIEW = 120


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


# ---------------------------------------------------------------- reading documents


def read_documents(path: Path, text_field: str, rejects: RejectLog | None) -> Iterator[tuple[dict, str, str]]:
    """(record, "file:line", normalized text) of every usable record of one file; others go to rejects."""
    for record, where in read_records([path], rejects):
        try:
            text, _ = record_text(record, text_field)
        except Unusable as e:
            if rejects is not None:
                rejects.add(e.reason, where, record, e.detail)
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
    buckets_out = Partitions(out, partitions)
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
        buckets_out.add(table)
        n += len(texts)
        batches += 1
        max_batch = max(max_batch, sum(map(len, texts)))
        texts.clear()
        exact.clear()
        lines.clear()

    chars = 0
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
    buckets_out.flush()
    return {"path": path, "docs": n, "rejected": dict(rejects.counts), "examples": dict(rejects.examples),
            "batches": batches, "max_batch_chars": max_batch}


def pair_partition(out: Path, part: int, sign_dir: str, docs: list[int], cfg: DedupConfig) -> dict:
    """Candidate pairs of one bucket partition, kept if exact or with estimated Jaccard ≥ threshold.

    What is written is a spanning forest of the verified pairs (each document joined to the first of its
    component): the same clusters from at most one edge per document, however many pairs verified.
    """
    rows = np.concatenate([np.fromfile(Path(sign_dir) / f"{i:05d}" / f"buckets-{part:05d}.bin", dtype=ROW)
                           for i in range(len(docs))] or [np.zeros(0, ROW)])
    a, b = bucket_pairs(rows)
    jaccard, exact = Signatures(Path(sign_dir), cfg.num_perm).similarity(a, b)
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
    jaccard, exact = Signatures(Path(sign_dir), cfg.num_perm).similarity(removed, kept)
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
                text = normalize(record_text(rec, text_field)[0])
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
    rejected, reject_examples = gather_rejects(out_dir, [work / "sign" / f"{i:05d}" for i in range(len(files))], signed)
    concat_files([work / "filter" / f"{i:05d}" / "removed.jsonl" for i in range(len(files))], out_dir / REMOVED)
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
    finish_stage(out_dir, work, config_text, report)
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

