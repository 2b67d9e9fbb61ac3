"""Near-duplicate detection: xiaolm `data dedup` vs datasketch (MinHash + MinHashLSH) and HF datatrove's MinHash
pipeline, same corpus and settings.

    python benchmarks/dedup.py [--quick] [--docs 200000 --files 8 --chars 100 --pairs 5000 --exact 2000]
                               [--workers 2 --repeats 5] [--systems xiaolm,datasketch,datasketch-default,datatrove]
                               [--datatrove-python /tmp/dtvenv/bin/python] [--datatrove-buckets 10x12,13x9]
                               [--settings batch_chars=250000 partition_mb=16]
    (needs `pip install 'xiaolm[bench]'` for datasketch; datatrove can live in its own environment:
    `python -m venv /tmp/dtvenv && /tmp/dtvenv/bin/pip install datatrove numpy regex 'xxhash<4' tokenizers orjson`,
    then pass `--datatrove-python /tmp/dtvenv/bin/python`)

The corpus: random Chinese text drawn from the character frequencies of the embedded demo corpus (poems and
idiom explanations), ~`--chars` characters a document, split over `--files` JSONL files, in shuffled order. Planted
near-duplicates: `--pairs` copies edited to each character-5-gram Jaccard level (0.5, 0.7, 0.85, 0.95) and
`--exact` verbatim copies. Truth is the true 5-gram Jaccard of a pair: a pair is a duplicate when it is ≥ 0.8.

Like for like with datasketch: both sides use character 5-grams of the text without whitespace, 128 permutations,
the same LSH shape and the same check of candidates. xiaolm picks its shape with `choose_bands`: the most rows per
band for which a pair at the threshold becomes a candidate with probability ≥ 0.99 (21 bands × 6 rows at 0.8).
MinHashLSH picks the shape minimizing fp · (false-positive area) + fn · (false-negative area) of the S-curve; the
script finds the `weights=(fp, fn)` that make it pick xiaolm's shape (at 0.8, any fn in 0.9976–0.9996: false
negatives weighed ~400–2,500x false positives; the default (0.5, 0.5) picks 9 × 13, a candidate probability of 0.40
at 0.8) and prints both sides' shapes. xiaolm verifies candidates inside `dedup_files` (estimated Jaccard, the share
of the 128 MinHash values that agree, ≥ 0.8, or identical texts); datasketch's candidates get the same check in the
benchmark's loop, `MinHash.jaccard(other) ≥ 0.8` (the same estimate), so its time includes verification as xiaolm's
does. Candidates differ in one way: xiaolm pairs each document with the first and the previous document of each
bucket it shares, a datasketch query returns every earlier document sharing a bucket. Each side's verified pairs
form clusters (connected components) that keep their first document in input order; the scored pairs are removed →
kept. datasketch makes each MinHash from one template with `copy()` (as `MinHash.generator` does: the permutations
are made once) and keeps a `LeanMinHash` per document for the verification (in its peak RSS; with 21 bands its index
takes more memory than with 9 as well). Time covers, for xiaolm: reading the JSONL, signatures, bucket files,
verification, clusters, writing the kept and removed records; for datasketch: reading the JSONL, MinHash, LSH query
+ insert, verification, clusters in memory (it writes nothing). `--systems datasketch-default` adds the earlier
baseline: default weights (9 × 13), no verification.

datatrove runs its four stages (MinhashDedupSignature → MinhashDedupBuckets → MinhashDedupCluster →
MinhashDedupFilter) with LocalPipelineExecutor (one task per input file, one per bucket, `workers` at once, start
method fork so that the pool's processes are children of the measured one), writing the kept documents as plain
JSONL like xiaolm. It shingles characters: a WordTokenizer passed in place of a language makes every non-space
character a token (for "zh" datatrove would segment words with spaCy + jieba) and text normalization is off (it
would lowercase, drop punctuation, map digits to 0), so its 5-grams are the same 5-grams as xiaolm's and the truth's.
It has no verification of LSH candidates: every band collision is a pair, so `--datatrove-buckets` (buckets ×
hashes per bucket, default 10x12) is the shape whose S-curve is closest to xiaolm's 21 × 6 bands plus signature
verification at 0.8.

Each system runs in its own subprocess, once per round (`--repeats` rounds, the order rotating): docs/s over the
whole job (reading JSON to finding the pairs), docs per CPU-second (user + system time of the process and its
workers over the same span, after the interpreter's start: less sensitive to other load on the machine), peak RSS,
each as median (min–max) over the rounds; the ratios are the median (min–max) of the rounds' ratios. Precision:
share of the removed → kept pairs whose true Jaccard is ≥ 0.8. Recall: share of planted pairs with true Jaccard
≥ 0.8 that end in the same cluster; per level, the share found.

Sizes: the defaults (200,000 documents, 5,000 pairs per level, 2,000 copies, 5 rounds) take about 7–8 minutes on 2
idle cores; `--quick` (120,000 documents, 3,000 pairs per level, 1,200 copies, 3 rounds) about 3 minutes. Both are
estimates from 20,000-document runs on a loaded 2-core machine (per CPU-second: datasketch ~3,400 documents, xiaolm
~15,000 with its start-up; generating 20,000 documents took 3 s), not measured at those sizes.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from harness import argument_parser, markdown_table, one_or_spread, parse_args, print_header, proc_status_mb

NGRAM, NUM_PERM, THRESHOLD = 5, 128, 0.8
LEVELS = (0.5, 0.7, 0.85, 0.95)
DEMO = Path(__file__).resolve().parents[1] / "src" / "xiaolm" / "data" / "demo"
SYSTEMS = ("xiaolm", "datasketch", "datasketch-default", "datatrove")
QUICK = {"docs": 120_000, "pairs": 3000, "exact": 1200, "repeats": 3}


def shingles(text: str) -> set[str]:
    """Character 5-grams (the whole text if shorter)."""
    return {text[i:i + NGRAM] for i in range(max(len(text) - NGRAM + 1, 1))}


def jaccard(a: str, b: str) -> float:
    """True Jaccard similarity of two texts' character 5-gram sets."""
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def char_distribution() -> tuple[list[str], np.ndarray]:
    """Characters of the demo corpus with their frequencies (newlines and spaces left out)."""
    counts: Counter[str] = Counter()
    for name, fields in (("poetry.jsonl.gz", ("text",)), ("idioms.jsonl.gz", ("explanation", "example"))):
        with gzip.open(DEMO / name, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for field in fields:
                    counts.update(c for c in row.get(field) or "" if not c.isspace())
    chars = sorted(counts)
    freq = np.array([counts[c] for c in chars], dtype=np.float64)
    return chars, freq / freq.sum()


def edit_to(text: str, target: float, rng: random.Random, alphabet: list[str]) -> str:
    """A copy of `text` with random substitutions, insertions and deletions until its Jaccard is about target."""
    for _ in range(50):
        out = list(text)
        while True:
            j = jaccard(text, "".join(out))
            if j <= target + 0.015:
                break
            # near the target, edit at the ends (each touches fewer 5-grams) to take smaller steps
            pos = rng.randrange(len(out)) if j > target + 0.08 else rng.choice([0, 1, len(out) - 2, len(out) - 1])
            op = rng.random()
            if op < 0.5:
                out[pos] = rng.choice(alphabet)
            elif op < 0.75:
                out.insert(pos, rng.choice(alphabet))
            elif len(out) > NGRAM + 1:
                del out[pos]
        if j >= target - 0.025:
            return "".join(out)
    return "".join(out)


def make_corpus(out: Path, docs: int, files: int, chars: int, pairs: int, exact: int, seed: int) -> dict:
    """Write the corpus as JSONL files; return the planted pairs {level: [(id_a, id_b, true jaccard)]}."""
    alphabet, freq = char_distribution()
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    copies = pairs * len(LEVELS) + exact
    originals = docs - copies
    lengths = rng.integers(int(chars * 0.8), int(chars * 1.2) + 1, size=originals)
    codes = rng.choice(len(alphabet), size=int(lengths.sum()), p=freq)
    table = np.array(alphabet)
    cuts = np.cumsum(lengths)[:-1]
    texts = ["".join(part) for part in np.split(table[codes], cuts)]
    planted: dict[str, list] = {}
    source = iter(prng.sample(range(originals), copies))
    for level in (*LEVELS, 1.0):
        rows = []
        for _ in range(exact if level == 1.0 else pairs):
            i = next(source)
            copy = texts[i] if level == 1.0 else edit_to(texts[i], level, prng, alphabet)
            texts.append(copy)
            rows.append((i, len(texts) - 1, 1.0 if level == 1.0 else jaccard(texts[i], copy)))
        planted[str(level)] = rows
    order = list(range(len(texts)))
    prng.shuffle(order)
    out.mkdir(parents=True, exist_ok=True)
    handles = [open(out / f"part-{k:03d}.jsonl", "w", encoding="utf-8") for k in range(files)]
    for n, i in enumerate(order):
        handles[n * files // len(order)].write(json.dumps({"id": str(i), "text": texts[i]}, ensure_ascii=False)
                                               + "\n")
    for h in handles:
        h.close()
    return planted


# ---------------------------------------------------------------- the systems (each run in a subprocess)


def run_xiaolm(corpus: Path, work: Path, workers: int, settings: list[str]) -> tuple[list[tuple[str, str]], dict]:
    """xiaolm dedup_files (it verifies its candidates itself); the pairs are (removed id, kept id)."""
    from xiaolm.data.dedup import REMOVED, dedup_files

    report = dedup_files([corpus], work, xiaolm_config(settings), workers=workers)
    with open(work / REMOVED, encoding="utf-8") as f:
        pairs = [(row["id"], row["kept_id"]) for row in map(json.loads, f)]
    return pairs, {"shape": [report["lsh"]["bands"], report["lsh"]["rows"]],
                   "candidates": report["work"]["candidate_pairs"], "verified": report["work"]["verified_pairs"]}


def run_datasketch(corpus: Path, work: Path, workers: int, settings: list[str]) -> tuple[list[tuple[str, str]], dict]:
    """datasketch MinHash + MinHashLSH, query then insert each document; candidates kept if MinHash.jaccard ≥
    threshold (settings verify=1); clusters of the kept pairs keep their first document, like xiaolm's."""
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    opts = dict(s.split("=", 1) for s in settings)
    fp, fn = map(float, opts["weights"].split(","))
    verify = opts["verify"] == "1"
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, weights=(fp, fn))
    template = MinHash(num_perm=NUM_PERM)  # copied per document, as MinHash.generator does: permutations made once
    sketches: dict[str, LeanMinHash] = {}
    order: dict[str, int] = {}
    found = []
    candidates = 0
    for path in sorted(corpus.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                m = template.copy()
                m.update_batch([s.encode("utf-8") for s in shingles("".join(row["text"].split()))])
                m = LeanMinHash(m)
                near = lsh.query(m)
                candidates += len(near)
                if verify:
                    near = [other for other in near if m.jaccard(sketches[other]) >= THRESHOLD]
                    sketches[row["id"]] = m
                found.extend((row["id"], other) for other in near)
                lsh.insert(row["id"], m)
                order[row["id"]] = len(order)
    ids = list(order)
    first = clusters([(order[a], order[b]) for a, b in found])  # representative: the smallest input position
    pairs = [(ids[i], ids[root]) for i, root in first.items() if i != root]
    return pairs, {"shape": [lsh.b, lsh.r], "candidates": candidates, "verified": len(found) if verify else None}


def run_datatrove(corpus: Path, work: Path, workers: int, settings: list[str]) -> tuple[list[tuple[str, str]], dict]:
    """datatrove's MinHash pipeline, four LocalPipelineExecutor stages (no verification of candidates); the pairs
    are (removed id, kept id)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.text import TextNormConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Characters(WordTokenizer):
        """Every non-space character is a word, so datatrove's word 5-grams are character 5-grams."""

        def word_tokenize(self, text: str) -> list[str]:
            return [c for c in text if not c.isspace()]

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    buckets, per_bucket = map(int, settings[0].split("x"))
    off = TextNormConfig(lowercase=False, norm_whitespace=False, remove_punctuation=False,
                         norm_unicode_diacritics=False, norm_numbers=False)
    config = MinhashConfig(n_grams=NGRAM, num_buckets=buckets, hashes_per_bucket=per_bucket, norm_config=off)
    files = len(list(corpus.glob("*.jsonl")))

    def stage(name: str, pipeline: list, tasks: int) -> None:
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(work / "logs" / name),
                              start_method="fork").run()

    def keep_clustered(data, rank: int = 0, world_size: int = 1):
        """Pass documents through; note the kept one of each cluster (its id and cluster id) to map removed → kept."""
        with open(work / "kept" / f"{rank:05d}.tsv", "w", encoding="utf-8") as f:
            for doc in data:
                if doc.metadata.get("minhash_cluster_id", -1) >= 0:
                    f.write(f"{doc.id}\t{doc.metadata['minhash_cluster_id']}\n")
                yield doc

    (work / "kept").mkdir(parents=True)
    stage("signatures", [JsonlReader(str(corpus), glob_pattern="*.jsonl"),
                         MinhashDedupSignature(str(work / "signatures"), config=config, language=Characters())], files)
    stage("buckets", [MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=config)], buckets)
    stage("clusters", [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config,
                                           save_cluster_id=True)], 1)
    stage("filter", [JsonlReader(str(corpus), glob_pattern="*.jsonl"),
                     MinhashDedupFilter(str(work / "remove"), load_cluster_ids=True,
                                        exclusion_writer=JsonlWriter(str(work / "removed"), compression=None)),
                     keep_clustered, JsonlWriter(str(work / "output"), compression=None)], files)
    kept = {}
    for path in (work / "kept").glob("*.tsv"):
        with open(path, encoding="utf-8") as f:
            kept.update((cluster, doc) for doc, cluster in (line.rstrip("\n").split("\t") for line in f))
    pairs = []
    for path in (work / "removed").glob("*.jsonl"):
        with open(path, encoding="utf-8") as f:
            pairs.extend((row["id"], kept[str(row["metadata"]["minhash_cluster_id"])]) for row in map(json.loads, f))
    return pairs, {"shape": [buckets, per_bucket], "candidates": None, "verified": None}


def child(system: str, corpus: str, work: str, workers: int, settings: list[str]) -> None:
    """Subprocess entry: run one system, print its timing, peak RSS and pairs as one JSON line."""

    def cpu_seconds() -> float:
        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))

    # the same span for wall and CPU time: from here (the interpreter started, numpy imported) to the pairs
    start, cpu_start = time.perf_counter(), cpu_seconds()
    fn = {"xiaolm": run_xiaolm, "datasketch": run_datasketch, "datatrove": run_datatrove}[system]
    pairs, info = fn(Path(corpus), Path(work), workers, settings)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    own = proc_status_mb("VmHWM")  # ru_maxrss would include the forking parent's size
    # the largest worker's high-water mark; fork-then-exec counts the parent's size at fork time as well
    workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rss_mb": own, "worker_rss_mb": workers_rss, **info,
                      "pairs": pairs}))


def measure(system: str, corpus: Path, work: Path, workers: int, settings: list[str],
            python: str = sys.executable) -> dict:
    """Run one system in a fresh Python process (`python`: the interpreter, e.g. of another environment)."""
    cmd = [python, __file__, "--child", system, str(corpus), str(work), str(workers), *settings]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode:
        sys.exit(f"{system} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- scoring


def clusters(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """Union-find: document (id or position) → its cluster's representative, the smallest member."""
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


def score(pairs: list[tuple[str, str]], planted: dict, texts: dict[str, str]) -> dict:
    """Precision of the reported pairs against true Jaccard; recall of the planted pairs per level."""
    unique = {tuple(sorted(p)) for p in pairs}
    true = sum(jaccard(texts[a], texts[b]) >= THRESHOLD for a, b in unique)
    group = clusters(list(unique))
    found = {}
    positives = hits = 0
    for level, rows in planted.items():
        same = [group.get(str(a), str(a)) == group.get(str(b), str(b)) for a, b, _ in rows]
        found[level] = sum(same) / len(rows)
        for (_, _, j), s in zip(rows, same, strict=True):
            if j >= THRESHOLD:
                positives += 1
                hits += s
    return {"pairs": len(unique), "precision": true / len(unique) if unique else 1.0,
            "recall": hits / positives, "by_level": found}


# ---------------------------------------------------------------- the settings of each side


def xiaolm_config(settings: list[str]):
    """xiaolm's DedupConfig at the benchmark's n-gram, permutations and threshold, plus `settings`."""
    from xiaolm.config import load_config
    from xiaolm.data.dedup import DedupConfig

    return load_config(DedupConfig, None, [f"threshold={THRESHOLD}", f"ngram={NGRAM}", f"num_perm={NUM_PERM}",
                                           *settings])


def xiaolm_shape(cfg) -> tuple[int, int]:
    """(bands, rows) xiaolm uses: the configured ones, else choose_bands (P(candidate) ≥ 0.99 at the threshold)."""
    from xiaolm.data.minhash import choose_bands

    return (cfg.bands, cfg.rows) if cfg.bands and cfg.rows else choose_bands(cfg.threshold, cfg.num_perm)


def datasketch_weights(shape: tuple[int, int]) -> tuple[tuple[float, float], tuple[float, float]]:
    """datasketch `weights` (fp, fn) for which MinHashLSH picks `shape` (else the shape whose candidate probability
    at the threshold is closest), and the range of false-negative weights (steps of 1e-4) that pick the same shape.

    MinHashLSH minimizes fp · (area under the S-curve below the threshold) + fn · (area above it, missed) over
    bands × rows ≤ num_perm; the areas come from datasketch's own functions, in its own search order.
    """
    from datasketch.lsh import _false_negative_probability, _false_positive_probability

    from xiaolm.data.minhash import candidate_probability

    shapes = [(b, r) for b in range(1, NUM_PERM + 1) for r in range(1, NUM_PERM // b + 1)]
    fp_area = np.array([_false_positive_probability(THRESHOLD, b, r) for b, r in shapes])
    fn_area = np.array([_false_negative_probability(THRESHOLD, b, r) for b, r in shapes])
    fn_weights = np.arange(1, 10_000) / 10_000
    # argmin takes the first of equal errors, as datasketch's strict < does
    picked = np.array([np.argmin((1 - w) * fp_area + w * fn_area) for w in fn_weights])
    target = candidate_probability(THRESHOLD, *shape)
    best = min(np.unique(picked), key=lambda i: abs(candidate_probability(THRESHOLD, *shapes[i]) - target))
    inside = fn_weights[picked == best]  # one interval: each shape's error is linear in the weight
    low, high = float(inside[0]), float(inside[-1])
    for digits in range(1, 5):  # the roundest weight in the range, nearest its middle
        options = [w for w in np.unique(np.round(inside, digits)) if low <= w <= high
                   and round(1 - w, digits) + round(float(w), digits) == 1.0]
        if options:
            fn = round(float(min(options, key=lambda w: abs(w - (low + high) / 2))), digits)
            return (round(1 - fn, digits), fn), (low, high)
    raise AssertionError(f"no datasketch weights for {shape}")


def describe_settings(cfg, shape: tuple[int, int], weights: tuple[float, float], weight_range: tuple[float, float],
                      systems: list[str], datatrove_shapes: list[str]) -> list[str]:
    """What each side runs with: LSH shape, how it was chosen, how candidates are verified, what its time covers."""
    from xiaolm.data.minhash import candidate_probability

    def shape_text(b: int, r: int) -> str:
        p = candidate_probability(THRESHOLD, b, r)
        return f"{b} bands × {r} rows (P(candidate | Jaccard {THRESHOLD}) = {p:.4f})"

    chosen = "as configured" if cfg.bands and cfg.rows else "by choose_bands: the most rows per band for which " \
        f"a pair at Jaccard {THRESHOLD} is a candidate with probability ≥ 0.99"
    lines = [f"both: character {NGRAM}-grams of the text without whitespace, {NUM_PERM} permutations, "
             f"threshold {THRESHOLD}",
             f"xiaolm: LSH {shape_text(*shape)}, {chosen}; candidates (each document with the first and the previous "
             f"document of a shared bucket) verified inside dedup_files: kept if the estimated Jaccard (share of the "
             f"{NUM_PERM} MinHash values that agree) is ≥ {THRESHOLD} or the texts are identical; {cfg}"]
    if any(s.startswith("datasketch") for s in systems):
        from datasketch import MinHashLSH

        matched = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, weights=weights)
        default = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    if "datasketch" in systems:
        same = "the same shape" if (matched.b, matched.r) == tuple(shape) else "NOT xiaolm's shape (none matches)"
        lines.append(
            f"datasketch: MinHashLSH(threshold={THRESHOLD}, num_perm={NUM_PERM}, weights={weights}) → "
            f"{shape_text(matched.b, matched.r)}, {same}; any false-negative weight {weight_range[0]:.4f}–"
            f"{weight_range[1]:.4f} picks it (false negatives weighed {weight_range[0] / (1 - weight_range[0]):,.0f}–"
            f"{weight_range[1] / (1 - weight_range[1]):,.0f}x false positives), the default weights (0.5, 0.5) pick "
            f"{default.b} × {default.r}; every candidate of a query (all documents sharing a bucket) verified in the "
            f"benchmark's loop: kept if MinHash.jaccard (share of the {NUM_PERM} values that agree) ≥ {THRESHOLD}")
    if "datasketch-default" in systems:
        lines.append(f"datasketch defaults: MinHashLSH(threshold={THRESHOLD}, num_perm={NUM_PERM}) → "
                     f"{shape_text(default.b, default.r)}; candidates not verified (the benchmark before verification)")
    if "datatrove" in systems:
        shapes = ", ".join(f"{shape_text(*map(int, s.split('x')))}" for s in datatrove_shapes)
        lines.append(f"datatrove: {shapes}; no verification: every band collision is a pair")
    lines.append("time covers: xiaolm, reading the JSONL, signatures, bucket files, verification, clusters and "
                 "writing the kept and removed records; datasketch, reading the JSONL, MinHash (update_batch), LSH "
                 "query + insert, verification and clusters in memory, writing nothing"
                 + ("; datatrove, its four stages, writing the kept and removed records" if "datatrove" in systems
                    else ""))
    return lines


# ---------------------------------------------------------------- the driver


def main() -> None:
    """Generate the corpus, run every system once per round, print the settings, the table and the ratios."""
    p = argument_parser(__doc__)
    p.add_argument("--docs", type=int, default=200_000, help="documents in the corpus, planted copies included")
    p.add_argument("--files", type=int, default=8, help="JSONL files the corpus is split over")
    p.add_argument("--chars", type=int, default=100, help="mean document length in characters")
    p.add_argument("--pairs", type=int, default=5000, help="planted pairs per Jaccard level")
    p.add_argument("--exact", type=int, default=2000, help="planted verbatim copies")
    p.add_argument("--workers", type=int, default=2, help="xiaolm and datatrove also run with this many processes")
    p.add_argument("--repeats", type=int, default=5, help="rounds: every run once per round, in rotating order")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus")
    p.add_argument("--systems", default="xiaolm,datasketch",
                   help="comma-separated, of xiaolm, datasketch (xiaolm's LSH shape, verified), datasketch-default "
                        "(its default weights, unverified: the benchmark's earlier baseline), datatrove")
    p.add_argument("--skip-datasketch", action="store_true", help="leave datasketch out of --systems")
    p.add_argument("--datatrove-python", default=sys.executable,
                   help="interpreter of an environment with datatrove")
    p.add_argument("--datatrove-buckets", default="10x12",
                   help="datatrove LSH shapes, buckets x hashes per bucket, comma-separated: one run each")
    p.add_argument("--settings", nargs="*", default=[], metavar="key=value",
                   help="xiaolm DedupConfig settings, e.g. batch_chars=250000 partition_mb=16")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = parse_args(p, QUICK, "about 3 minutes")
    if a.child:
        child(a.child[0], a.child[1], a.child[2], int(a.child[3]), a.child[4:])
        return
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    if a.skip_datasketch:
        systems = [s for s in systems if not s.startswith("datasketch")]
    if unknown := set(systems) - set(SYSTEMS):
        p.error(f"unknown systems: {', '.join(sorted(unknown))} (known: {', '.join(SYSTEMS)})")
    shapes = [s.strip() for s in a.datatrove_buckets.split(",") if s.strip()]
    for shape in shapes:
        b, _, r = shape.partition("x")
        if not (b.isdigit() and r.isdigit() and int(b) > 0 and int(r) > 0):
            p.error(f"--datatrove-buckets: {shape!r} is not BUCKETSxHASHES, e.g. 10x12")
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    if any(s.startswith("datasketch") for s in systems) and importlib.util.find_spec("datasketch") is None:
        p.error("datasketch is not installed: `pip install 'xiaolm[bench]'`, or leave it out with --systems xiaolm")
    print_header(("numpy", "datasketch", "scipy"),
                 threads=f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, xiaolm and datatrove with 1 "
                         f"and {a.workers} processes, datasketch with 1")
    if "datatrove" in systems:
        version = subprocess.run([a.datatrove_python, "-c", "from importlib.metadata import version as v; "
                                  "print('datatrove', v('datatrove'), 'numpy', v('numpy'))"],
                                 capture_output=True, text=True)
        print(f"datatrove environment: {a.datatrove_python}: {version.stdout.strip() or version.stderr.strip()[-200:]}")
    cfg = xiaolm_config(a.settings)
    shape = xiaolm_shape(cfg)
    weights, weight_range = datasketch_weights(shape) if "datasketch" in systems else ((0.5, 0.5), (0.5, 0.5))
    for line in describe_settings(cfg, shape, weights, weight_range, systems, shapes):
        print("settings, " + line)
    with tempfile.TemporaryDirectory(prefix="xiaolm-bench-dedup-") as tmp:
        corpus = Path(tmp) / "corpus"
        start = time.perf_counter()
        planted = make_corpus(corpus, a.docs, a.files, a.chars, a.pairs, a.exact, a.seed)
        texts = {}
        for path in corpus.glob("*.jsonl"):
            with open(path, encoding="utf-8") as f:
                texts.update((r["id"], r["text"]) for r in map(json.loads, f))
        mean_len = sum(map(len, texts.values())) / len(texts)
        print(f"corpus: {len(texts):,} documents, {mean_len:.0f} characters on average, {a.files} files "
              f"({time.perf_counter() - start:.0f} s to generate)")
        print("planted pairs: " + ", ".join(
            f"{lv}: {len(r)} (true Jaccard {min(j for *_, j in r):.2f}–{max(j for *_, j in r):.2f}, "
            f"{sum(j >= THRESHOLD for *_, j in r)} ≥ {THRESHOLD})" for lv, r in planted.items()))
        counts = [1, a.workers] if a.workers > 1 else [1]
        verified = [f"weights={weights[0]},{weights[1]}", "verify=1"]
        # (label, system, processes, child settings, interpreter)
        runs = []
        if "xiaolm" in systems:
            runs += [("xiaolm", "xiaolm", w, a.settings, sys.executable) for w in counts]
        if "datasketch" in systems:
            runs.append(("datasketch, verified", "datasketch", 1, verified, sys.executable))
        if "datasketch-default" in systems:
            runs.append(("datasketch defaults, unverified", "datasketch", 1, ["weights=0.5,0.5", "verify=0"],
                         sys.executable))
        if "datatrove" in systems:
            runs += [(f"datatrove {shape.replace('x', '×')}", "datatrove", w, [shape], a.datatrove_python)
                     for shape in shapes for w in counts]
        results: dict[tuple[str, int], list[dict]] = {(label, w): [] for label, _, w, _, _ in runs}
        for k in range(a.repeats):
            for n, (label, system, workers, settings, python) in enumerate(runs[k % len(runs):] + runs[:k % len(runs)]):
                load = os.getloadavg()[0]
                work = Path(tmp) / f"run-{k}-{n}"
                r = measure(system, corpus, work, workers, settings, python)
                shutil.rmtree(work, ignore_errors=True)
                r["load"] = (load, os.getloadavg()[0])
                r.update(score(r.pop("pairs"), planted, texts))
                results[(label, workers)].append(r)
                print(f"round {k + 1}/{a.repeats}: {label}, {workers} process(es): {r['seconds']:.1f} s, "
                      f"{r['cpu_seconds']:.1f} CPU-s, load {load:.1f}–{os.getloadavg()[0]:.1f}", flush=True)
        print_table(results, planted, len(texts), a.repeats)


def print_table(results: dict[tuple[str, int], list[dict]], planted: dict, docs: int, repeats: int) -> None:
    """The Markdown table (median and min–max over the rounds) and xiaolm's ratios against each other system."""
    header = ["system", "LSH bands × rows", "processes", "docs/s", "docs per CPU-second",
              "peak RSS MB (main / largest worker)", "candidates", "verified", "pairs (removed → kept)",
              "precision", f"recall ≥ {THRESHOLD}", *(f"found @{lv}" for lv in planted), "load avg (1 min)"]
    rows = []
    for (label, workers), runs in results.items():
        rss = one_or_spread([r["rss_mb"] for r in runs]) + (
            f" / {one_or_spread([r['worker_rss_mb'] for r in runs])}" if workers > 1 else "")
        first = runs[0]
        rows.append([label, "{} × {}".format(*first["shape"]), str(workers),
                     one_or_spread([docs / r["seconds"] for r in runs]),
                     one_or_spread([docs / r["cpu_seconds"] for r in runs]),
                     rss, "—" if first["candidates"] is None else f"{first['candidates']:,}",
                     "—" if first["verified"] is None else f"{first['verified']:,}",
                     one_or_spread([r["pairs"] for r in runs], "{:,.0f}", same=True),
                     one_or_spread([r["precision"] for r in runs], "{:.4f}", same=True),
                     one_or_spread([r["recall"] for r in runs], "{:.4f}", same=True),
                     *(one_or_spread([r["by_level"][lv] for r in runs], "{:.3f}", same=True) for lv in planted),
                     f"{min(r['load'][0] for r in runs):.1f}–{max(r['load'][1] for r in runs):.1f}"])
    print(f"\ndocs/s, docs per CPU-second and peak RSS: median (min–max) over {repeats} round(s); candidates and "
          f"verified: the first round's\n")
    print(markdown_table(header, rows))
    for (label, base_workers), base in results.items():
        if label == "xiaolm":
            continue
        for (system, workers), ours in results.items():
            if system == "xiaolm" and (label.startswith("datasketch") or workers == base_workers):
                wall = [b["seconds"] / o["seconds"] for b, o in zip(base, ours, strict=True)]
                cpu = [b["cpu_seconds"] / o["cpu_seconds"] for b, o in zip(base, ours, strict=True)]
                print(f"xiaolm with {workers} process(es) / {label} with {base_workers}: "
                      f"{one_or_spread(wall, '{:.1f}x')} docs/s, {one_or_spread(cpu, '{:.1f}x')} docs per CPU-second"
                      + (" (median (min–max) of the rounds' ratios)" if len(wall) > 1 else ""))


if __name__ == "__main__":
    main()
