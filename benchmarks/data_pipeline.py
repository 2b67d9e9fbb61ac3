"""Data stages at scale: cleaning MB/s and packing tokens/s with 1 and 2 processes, and clean + dedup + pack end to end.

    python benchmarks/data_pipeline.py throughput [--mb 1000] [--files 16] [--workers 1,2] [--work DIR]
    python benchmarks/data_pipeline.py end-to-end [--mb 2000] [--files 32] [--workers 2] [--work DIR]

Corpus of S MB of JSON lines in F shard files (as `xiaolm data import` writes them): the text of the tokenizer
benchmark (80% real Chinese from the embedded corpus, clauses reshuffled on every later pass, 20% generated facts
and numerals) with the dirt cleaning exists for: HTML markup and entities (4% of documents), URLs and e-mail
addresses (3%), full-width ASCII (2%), documents cut too short (2%), long character runs (1%); plus exact copies
(3%) and near copies with a few characters changed (2%) of earlier documents, in any shard, for dedup.

Every stage runs as the `xiaolm` command a user types, in its own process tree; wall time covers process start to
exit, peak RSS is the sum over the process tree sampled every 50 ms (workers included). The packing tokenizer is
trained once on the first shard (byte-level BPE, vocabulary 32,000). Throughput: MB/s of input JSON lines (clean)
and tokens/s written (pack), and the same per CPU second (user + system time of the whole process tree: one
pack process already encodes on every core through the tokenizer's threads). Nothing here is a test: the figures go
to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_train import expand, generated_texts, measure, real_texts  # noqa: E402

_URLS = ["https://www.example.com/news/{n}.html", "http://bbs.example.cn/thread-{n}-1-1.html",
         "www.example.org/p/{n}", "联系邮箱 user{n}@example.com"]


def dirty(text: str, rng: random.Random, n: int) -> str:
    """The text, with the kind of dirt a web or forum dump has, at the rates of the module docstring."""
    r = rng.random()
    if r < 0.04:
        return f"<div class=\"content\"><p>{text[:len(text) // 2]}</p>&nbsp;<br/><p>{text[len(text) // 2:]}</p></div>"
    if r < 0.07:
        return text + " " + rng.choice(_URLS).format(n=n)
    if r < 0.09:
        return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text) + "ＡＢＣ１２３"
    if r < 0.11:
        return text[:5]
    if r < 0.12:
        return text + "哈" * 30
    return text


def build_corpus(out: Path, mb: int, files: int, seed: int = 0) -> Path:
    """`files` JSONL shards of `mb` MB in all under out/ (reused when complete)."""
    done = out / "_COMPLETE"
    if done.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    real = real_texts()
    target, per_file, written, n, k = mb * 1_000_000, mb * 1_000_000 / files, 0, 0, 0
    recent: list[str] = []  # earlier documents, for exact and near copies
    shard = 0
    f = open(out / f"part-{shard:05d}.jsonl", "w", encoding="utf-8")
    while written < target:
        texts = real if k == 0 else [expand(t, rng) for t in real]
        generated, gen_seed = [], 0
        while sum(map(len, generated)) < sum(map(len, texts)) / 4:
            generated += generated_texts(1000 * k + gen_seed + seed * 1_000_000)
            gen_seed += 1
        texts = texts + generated
        rng.shuffle(texts)
        for t in texts:
            r = rng.random()
            if recent and r < 0.03:
                t = rng.choice(recent)
            elif recent and r < 0.05:
                chars = list(rng.choice(recent))
                for _ in range(max(1, len(chars) // 50)):
                    chars[rng.randrange(len(chars))] = rng.choice("的一是了我不人在他有这个上们来到时大地为子中你说")
                t = "".join(chars)
            else:
                t = dirty(t, rng, n)
                if len(recent) < 50_000:
                    recent.append(t)
                else:
                    recent[rng.randrange(len(recent))] = t
            line = json.dumps({"text": t}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            n += 1
            if written >= per_file * (shard + 1) and shard + 1 < files:
                f.close()
                shard += 1
                f = open(out / f"part-{shard:05d}.jsonl", "w", encoding="utf-8")
            if written >= target:
                break
        k += 1
    f.close()
    done.write_text(json.dumps({"mb": mb, "files": files, "documents": n}), encoding="utf-8")
    return out


def xiaolm(*args: str) -> list[str]:
    return [sys.executable, "-m", "xiaolm", *args]


def run(name: str, cmd: list[str], out: Path, rss_cap: float) -> dict:
    """Measure one stage command from scratch (its old output removed); its report.json or meta.json is read after."""
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = measure(cmd, int(rss_cap * 2**30))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the stage's process tree, workers included, once reaped
    row["cpu_seconds"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if row["rc"] != 0:
        raise SystemExit(f"{name} failed (rc {row['rc']}):\n{row['stderr']}")
    report = out / ("meta.json" if (out / "meta.json").is_file() else "report.json")
    row["report"] = json.loads(report.read_text(encoding="utf-8"))
    row["peak_rss_mb"] = row.pop("peak_rss") / 2**20
    print(f"{name}: {row['seconds']:.1f} s ({row['cpu_seconds']:.1f} CPU s), peak RSS {row['peak_rss_mb']:.0f} MB "
          "(tree)", flush=True)
    return row


def tokenizer(work: Path, corpus: Path, rss_cap: float) -> Path:
    tok = work / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        run("tokenizer", xiaolm("tokenizer", "train", str(corpus / "part-00000.jsonl"), "--out", str(tok),
                                "--vocab-size", "32000", "--max-memory", "1GB"), tok, rss_cap)
    return tok


def throughput(args: argparse.Namespace) -> list[dict]:
    work = Path(args.work)
    corpus = build_corpus(work / f"corpus-{args.mb}mb-{args.files}f", args.mb, args.files)
    tok = tokenizer(work, corpus, args.rss_cap)
    rows = []
    for n in args.workers:
        out = work / f"clean-w{n}"
        row = run(f"clean, {n} process(es)", xiaolm("data", "clean", str(corpus), "--out", str(out),
                                                     "--workers", str(n)), out, args.rss_cap)
        mb = row["report"]["input_mb"]
        rows.append({"stage": "clean", "workers": n, "seconds": row["seconds"], "cpu_seconds": row["cpu_seconds"],
                     "peak_rss_mb": row["peak_rss_mb"], "input_mb": mb, "mb_per_s": mb / row["seconds"],
                     "mb_per_cpu_s": mb / row["cpu_seconds"],
                     "records_in": row["report"]["records_in"], "records_out": row["report"]["records_out"]})
    cleaned = work / f"clean-w{args.workers[0]}"
    for n in args.workers:
        out = work / f"pack-w{n}"
        row = run(f"pack, {n} process(es)", xiaolm("data", "pack", str(cleaned), "--tokenizer", str(tok), "--out",
                                                    str(out), "--workers", str(n)), out, args.rss_cap)
        tokens = row["report"]["train_tokens"] + row["report"]["val_tokens"]
        rows.append({"stage": "pack", "workers": n, "seconds": row["seconds"], "cpu_seconds": row["cpu_seconds"],
                     "peak_rss_mb": row["peak_rss_mb"], "input_mb": row["report"]["input_mb"], "tokens": tokens,
                     "tokens_per_s": tokens / row["seconds"], "tokens_per_cpu_s": tokens / row["cpu_seconds"]})
    print("\n| stage | processes | wall s | CPU s | peak RSS MB (tree) | input MB | throughput | per CPU second |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["stage"] == "clean":
            rate = f"{r['mb_per_s']:.2f} MB/s | {r['mb_per_cpu_s']:.2f} MB"
        else:
            rate = f"{r['tokens_per_s'] / 1e6:.2f} M tokens/s | {r['tokens_per_cpu_s'] / 1e6:.2f} M tokens"
        print(f"| {r['stage']} | {r['workers']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mb']:.0f} "
              f"| {r['input_mb']:.0f} | {rate} |")
    for stage in ("clean", "pack"):
        by = {r["workers"]: r["seconds"] for r in rows if r["stage"] == stage}
        if len(by) > 1:
            lo, hi = min(by), max(by)
            print(f"{stage}: {hi} processes vs {lo}: {by[lo] / by[hi]:.2f}x faster")
    return rows


def end_to_end(args: argparse.Namespace) -> list[dict]:
    work = Path(args.work)
    corpus = build_corpus(work / f"corpus-{args.mb}mb-{args.files}f", args.mb, args.files)
    tok = tokenizer(work, corpus, args.rss_cap)
    n = str(args.workers[0])
    stages = [("clean", xiaolm("data", "clean", str(corpus), "--out", str(work / "e2e-clean"), "--workers", n),
               work / "e2e-clean"),
              ("dedup", xiaolm("data", "dedup", str(work / "e2e-clean"), "--out", str(work / "e2e-dedup"),
                               "--workers", n), work / "e2e-dedup"),
              ("pack", xiaolm("data", "pack", str(work / "e2e-dedup"), "--tokenizer", str(tok), "--out",
                              str(work / "e2e-pack"), "--workers", n), work / "e2e-pack")]
    rows = []
    for name, cmd, out in stages:
        if name not in args.stages:  # kept from an earlier run: its report, no measurement
            rows.append({"stage": name, "seconds": float("nan"), "peak_rss_mb": float("nan"), "records_in": None,
                         "records_out": None, "removed": None, "tokens": 0})
            continue
        row = run(name, cmd, out, args.rss_cap)
        r = row["report"]
        rows.append({"stage": name, "seconds": row["seconds"], "peak_rss_mb": row["peak_rss_mb"],
                     "records_in": r.get("records_in"),
                     "records_out": r.get("records_out", r.get("train_docs", 0) + r.get("val_docs", 0)),
                     "removed": r.get("removed"), "tokens": r.get("train_tokens", 0) + r.get("val_tokens", 0)})
    print(f"\n| stage ({args.mb} MB, {args.files} files, {n} processes) | wall s | peak RSS MB (tree) | records in | "
          "records out |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['records_in']} | "
              f"{r['records_out']} |")
    ran = [r for r in rows if r["stage"] in args.stages]
    print(f"total {sum(r['seconds'] for r in ran):.1f} s, peak RSS of any stage run "
          f"{max(r['peak_rss_mb'] for r in ran):.0f} MB; removed by dedup: {rows[1]['removed']}; "
          f"tokens: {rows[2]['tokens']}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["throughput", "end-to-end"])
    ap.add_argument("--mb", type=int, default=1000, help="corpus size in MB")
    ap.add_argument("--files", type=int, default=16, help="shard files of the corpus")
    ap.add_argument("--workers", default="1,2", help="process counts (end-to-end uses the first)")
    ap.add_argument("--work", default="/tmp/xiaolm-databench")
    ap.add_argument("--stages", default="clean,dedup,pack",
                    help="end-to-end: the stages to run (the others' outputs must be there from an earlier run)")
    ap.add_argument("--rss-cap", type=float, default=16.0, help="GB; a stage above it is killed")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    args.stages = args.stages.split(",")
    rows = throughput(args) if args.mode == "throughput" else end_to_end(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
