"""Near-duplicate detection: xiaolm `data dedup` vs datasketch (MinHash + MinHashLSH) and HF datatrove's MinHash
pipeline, same corpus and settings.

    python benchmarks/dedup.py [--docs 200000 --files 8 --chars 100 --pairs 5000 --exact 2000 --workers 2]
                               [--systems xiaolm,datasketch,datatrove] [--skip-datasketch]
                               [--datatrove-python /tmp/dtvenv/bin/python] [--datatrove-buckets 10x12,13x9]
                               [--settings batch_chars=250000 partition_mb=16]
    (needs `pip install 'xiaolm[bench]'` for datasketch; datatrove can live in its own environment:
    `python -m venv /tmp/dtvenv && /tmp/dtvenv/bin/pip install datatrove numpy regex 'xxhash<4' tokenizers orjson`,
    then pass `--datatrove-python /tmp/dtvenv/bin/python`)

The corpus: random Chinese text drawn from the character frequencies of the embedded demo corpus (poems and
idiom explanations), ~`--chars` characters a document, split over `--files` JSONL files, in shuffled order. Planted
near-duplicates: `--pairs` copies edited to each character-5-gram Jaccard level (0.5, 0.7, 0.85, 0.95) and
`--exact` verbatim copies. Truth is the true 5-gram Jaccard of a pair: a pair is a duplicate when it is ≥ 0.8.
Each system runs in its own subprocess: docs/s over the whole job (reading JSON to finding the pairs), docs per
CPU-second (user + system time of the process and its workers: less sensitive to other load on the machine), peak
RSS.
datatrove runs its four stages (MinhashDedupSignature → MinhashDedupBuckets → MinhashDedupCluster →
MinhashDedupFilter) with LocalPipelineExecutor (one task per input file, one per bucket, `workers` at once, start
method fork so that the pool's processes are children of the measured one), writing the kept documents as plain
JSONL like xiaolm. It shingles characters: a WordTokenizer passed in place of a language makes every non-space
character a token (for "zh" datatrove would segment words with spaCy + jieba) and text normalization is off (it
would lowercase, drop punctuation, map digits to 0), so its 5-grams are the same 5-grams as xiaolm's and the truth's.
It has no verification of LSH candidates: every band collision is a pair, so `--datatrove-buckets` (buckets ×
hashes per bucket, default 10x12) is the shape whose S-curve is closest to xiaolm's 21 × 6 bands plus signature
verification at 0.8.
Precision: share of the pairs a system reports (xiaolm and datatrove: removed → kept of its cluster; datasketch: each
query's candidates) whose true Jaccard is ≥ 0.8. Recall: share of planted pairs that end in the same cluster
(connected components of the reported pairs), per level.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

NGRAM, NUM_PERM, THRESHOLD = 5, 128, 0.8
LEVELS = (0.5, 0.7, 0.85, 0.95)
DEMO = Path(__file__).resolve().parents[1] / "src" / "xiaolm" / "data" / "demo"


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


def run_xiaolm(corpus: Path, work: Path, workers: int, settings: list[str]) -> list[tuple[str, str]]:
    """xiaolm dedup_files; the pairs are (removed id, kept id)."""
    from xiaolm.config import load_config
    from xiaolm.data.dedup import REMOVED, DedupConfig, dedup_files

    cfg = load_config(DedupConfig, None, [f"threshold={THRESHOLD}", f"ngram={NGRAM}", f"num_perm={NUM_PERM}",
                                          *settings])
    dedup_files([corpus], work, cfg, workers=workers)
    with open(work / REMOVED, encoding="utf-8") as f:
        return [(row["id"], row["kept_id"]) for row in map(json.loads, f)]


def run_datasketch(corpus: Path, work: Path, workers: int, settings: list[str]) -> list[tuple[str, str]]:
    """datasketch MinHash (update_batch) + MinHashLSH: query each document, then insert it."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    found = []
    for path in sorted(corpus.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                m = MinHash(num_perm=NUM_PERM)
                m.update_batch([s.encode("utf-8") for s in shingles("".join(row["text"].split()))])
                found.extend((row["id"], other) for other in lsh.query(m))
                lsh.insert(row["id"], m)
    return found


def run_datatrove(corpus: Path, work: Path, workers: int, settings: list[str]) -> list[tuple[str, str]]:
    """datatrove's MinHash pipeline, four LocalPipelineExecutor stages; the pairs are (removed id, kept id)."""
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
    return pairs


def peak_rss_mb() -> float:
    """This process's peak resident memory since exec (VmHWM; ru_maxrss would include the forking parent's)."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child(system: str, corpus: str, work: str, workers: int, settings: list[str]) -> None:
    """Subprocess entry: run one system, print its timing, peak RSS and pairs as one JSON line."""
    start = time.perf_counter()
    fn = {"xiaolm": run_xiaolm, "datasketch": run_datasketch, "datatrove": run_datatrove}[system]
    pairs = fn(Path(corpus), Path(work), workers, settings)
    seconds = time.perf_counter() - start
    own = peak_rss_mb()
    # the largest worker's high-water mark; fork-then-exec counts the parent's size at fork time as well
    workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rss_mb": own, "worker_rss_mb": workers_rss,
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


def clusters(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Union-find: document id → its cluster's representative."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
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


def main() -> None:
    """Generate the corpus, run the systems, print the table and the ratios."""
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--chars", type=int, default=100)
    p.add_argument("--pairs", type=int, default=5000, help="planted pairs per Jaccard level")
    p.add_argument("--exact", type=int, default=2000, help="planted verbatim copies")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default="xiaolm,datasketch",
                   help="comma-separated, of xiaolm, datasketch, datatrove (default: xiaolm,datasketch)")
    p.add_argument("--skip-datasketch", action="store_true", help="leave datasketch out of --systems")
    p.add_argument("--datatrove-python", default=sys.executable,
                   help="interpreter of an environment with datatrove (default: this one)")
    p.add_argument("--datatrove-buckets", default="10x12",
                   help="datatrove LSH shapes, buckets x hashes per bucket, comma-separated: one run each")
    p.add_argument("--settings", nargs="*", default=[], metavar="key=value",
                   help="xiaolm DedupConfig settings, e.g. batch_chars=250000 partition_mb=16")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.child[2], int(a.child[3]), a.child[4:])
        return
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    if a.skip_datasketch and "datasketch" in systems:
        systems.remove("datasketch")
    if unknown := set(systems) - {"xiaolm", "datasketch", "datatrove"}:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    shapes = [s.strip() for s in a.datatrove_buckets.split(",") if s.strip()]
    for shape in shapes:
        b, _, r = shape.partition("x")
        if not (b.isdigit() and r.isdigit() and int(b) > 0 and int(r) > 0):
            p.error(f"--datatrove-buckets: {shape!r} is not BUCKETSxHASHES, e.g. 10x12")
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
        # (label, system, processes, child settings, interpreter)
        runs = []
        if "xiaolm" in systems:
            runs += [("xiaolm", "xiaolm", w, a.settings, sys.executable) for w in counts]
        if "datasketch" in systems:
            runs.append(("datasketch", "datasketch", 1, [], sys.executable))
        if "datatrove" in systems:
            runs += [(f"datatrove {shape.replace('x', '×')}", "datatrove", w, [shape], a.datatrove_python)
                     for shape in shapes for w in counts]
        results = {}
        for label, system, workers, settings, python in runs:
            load = os.getloadavg()[0]
            work = Path(tmp) / f"{system}-{workers}-{'-'.join(settings) or 'default'}"
            r = measure(system, corpus, work, workers, settings, python)
            r["load"] = f"{load:.1f}–{os.getloadavg()[0]:.1f}"
            r.update(score(r.pop("pairs"), planted, texts))
            results[(label, workers)] = r
            print(f"done: {label}, {workers} process(es), {r['seconds']:.1f} s", flush=True)
        head = ("| system | processes | docs/s | docs per CPU-second | peak RSS MB (main / largest worker) | pairs | "
                f"precision | recall ≥ {THRESHOLD} | " + " | ".join(f"found @{lv}" for lv in planted)
                + " | load avg (1 min) |")
        print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
        for (label, workers), r in results.items():
            rss = f"{r['rss_mb']:.0f}" + (f" / {r['worker_rss_mb']:.0f}" if workers > 1 else "")
            print(f"| {label} | {workers} | {len(texts) / r['seconds']:,.0f} | {len(texts) / r['cpu_seconds']:,.0f} "
                  f"| {rss} | {r['pairs']:,} | "
                  f"{r['precision']:.4f} | {r['recall']:.4f} | "
                  + " | ".join(f"{v:.3f}" for v in r["by_level"].values()) + f" | {r['load']} |")
        for (label, base_workers), base in results.items():
            if label == "xiaolm":
                continue
            for (system, workers), r in results.items():
                if system == "xiaolm" and (label == "datasketch" or workers == base_workers):
                    print(f"xiaolm with {workers} process(es) / {label} with {base_workers}: "
                          f"{base['seconds'] / r['seconds']:.1f}x docs/s, "
                          f"{base['cpu_seconds'] / r['cpu_seconds']:.1f}x docs per CPU-second")


if __name__ == "__main__":
    main()
