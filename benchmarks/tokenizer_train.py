"""Tokenizer training: xiaolm's bounded-memory BPE vs tokenizers' BpeTrainer vs sentencepiece, at growing sizes.

    python benchmarks/tokenizer_train.py [--sizes 25,50,100] [--ours-only-sizes 200] [--vocab 32000]
                                         [--max-memory 2GB] [--workers 2] [--work /tmp/xiaolm-tokbench]

Corpus of S MB (UTF-8 text): 80% real Chinese from the embedded demo corpus (poems and idioms; the first pass as
is, each later pass "expanded": clauses shuffled within each text and ~30% of neighbouring clauses joined without
punctuation, so new long CJK runs keep appearing as in web text) and 20% generated text (the demo's fictional
world facts, question-answer pairs and numeral sentences, a new world per pass). Held-out text: every 20th poem
and idiom (never in any training corpus) plus generated text of an unseen world.

Each trainer runs in its own process; wall time covers process start to exit, peak RSS is the sum over the
process tree sampled every 50 ms (and, as a check, the largest single-process RSS from wait4). Compression is
characters per token on the held-out text, measured afterwards in this process, with the encode and decode
throughput of the trained tokenizer (tokenizers' encode_batch/decode_batch, sentencepiece's encode/decode).
A run is killed above --rss-cap (default 10 GB) and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

METHODS = {
    "ours": "xiaolm bpe (bounded memory)",
    "ours-spm": "xiaolm sentencepiece backend",
    "hf": "tokenizers BpeTrainer, ByteLevel",
    "spm": "sentencepiece defaults (unigram)",
}
_CLAUSE = re.compile(r"(?<=[，。；！？、\n])")


def real_texts() -> list[str]:
    """Every poem and idiom of the embedded corpus as prose, in a fixed order."""
    from xiaolm.data.demo.documents import idiom_document, poem_document
    from xiaolm.data.demo.writing import load_vendored

    return ([poem_document(p) for p in load_vendored("poetry.jsonl.gz")]
            + [idiom_document(it) for it in load_vendored("idioms.jsonl.gz")])


def expand(text: str, rng: random.Random) -> str:
    """The same clauses in a new order, some neighbours joined into longer runs without punctuation."""
    clauses = [c for c in _CLAUSE.split(text) if c]
    rng.shuffle(clauses)
    out = []
    for c in clauses:
        if out and rng.random() < 0.3 and len(c) > 1:
            out[-1] = out[-1][:-1] + c  # drop the previous clause's punctuation
        else:
            out.append(c)
    return "".join(out)


def generated_texts(seed: int) -> list[str]:
    """World facts, QA pairs and numeral sentences of the demo generator, for a world of this seed."""
    from xiaolm.data.demo.documents import qa_documents, world_documents
    from xiaolm.data.demo.templates import NUMERAL_STATEMENTS
    from xiaolm.data.demo.world import generate_world, to_chinese_numeral

    world, rng = generate_world(seed), random.Random(seed)
    docs = world_documents(world, rng, mentions=6) + qa_documents(world, rng, 2)
    for _ in range(3000):
        d = rng.randint(0, 9999)
        docs.append(rng.choice(NUMERAL_STATEMENTS).format(d=d, c=to_chinese_numeral(d)))
    return ["".join(docs[i:i + 4]) for i in range(0, len(docs), 4)]


def build_corpora(work: Path, sizes: list[int]) -> tuple[dict[int, Path], Path]:
    """JSONL + TXT corpora of each size (MB) and the held-out JSONL, reused when already there."""
    work.mkdir(parents=True, exist_ok=True)
    held = work / "heldout.jsonl"
    real = real_texts()
    train_real = [t for i, t in enumerate(real) if i % 20]
    paths = {s: work / f"corpus-{s}mb.jsonl" for s in sizes}
    if not held.is_file():
        texts = [t for i, t in enumerate(real) if i % 20 == 0] + generated_texts(10_000)[:300]
        held.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), "utf-8")
    for size, path in paths.items():
        if path.is_file():
            continue
        target, written, k = size * 1_000_000, 0, 0
        rng = random.Random(size)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as jf, open(path.with_suffix(".txt"), "w", encoding="utf-8") as tf:
            while written < target:
                texts = train_real if k == 0 else [expand(t, rng) for t in train_real]
                real_bytes, generated, seed = sum(len(t.encode("utf-8")) for t in texts), [], 0
                while sum(len(t.encode("utf-8")) for t in generated) < real_bytes / 4:  # 80:20 by bytes
                    generated += generated_texts(1000 * k + seed)
                    seed += 1
                texts = texts + generated
                rng.shuffle(texts)
                for t in texts:
                    jf.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
                    tf.write(t + "\n")
                    written += len(t.encode("utf-8"))
                    if written >= target:
                        break
                k += 1
        tmp.rename(path)
    return paths, held


def child_command(method: str, corpus: Path, out: Path, vocab: int, max_memory: str, workers: int) -> list[str]:
    """The python -c program that trains one tokenizer and exits."""
    txt = corpus.with_suffix(".txt")
    programs = {
        "ours": f"from xiaolm.tokenizer import train_tokenizer\n"
                f"train_tokenizer([{str(corpus)!r}], {str(out)!r}, vocab_size={vocab}, "
                f"max_memory={max_memory!r}, workers={workers})",
        "ours-spm": f"from xiaolm.tokenizer import train_tokenizer\n"
                    f"train_tokenizer([{str(corpus)!r}], {str(out)!r}, vocab_size={vocab}, backend='sentencepiece', "
                    f"max_memory={max_memory!r}, workers={workers})",
        "hf": "import json\n"
              "from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers\n"
              "tok = Tokenizer(models.BPE())\n"
              "tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)\n"
              "tok.decoder = decoders.ByteLevel()\n"
              f"trainer = trainers.BpeTrainer(vocab_size={vocab}, min_frequency=2, show_progress=False, "
              "initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=['<|endoftext|>'])\n"
              f"texts = (json.loads(line)['text'] for line in open({str(corpus)!r}, encoding='utf-8'))\n"
              "tok.train_from_iterator(texts, trainer=trainer)\n"
              f"import os; os.makedirs({str(out)!r}, exist_ok=True); tok.save({str(out / 'tokenizer.json')!r})",
        "spm": "import os, sentencepiece as spm\n"
               f"os.makedirs({str(out)!r}, exist_ok=True)\n"
               f"spm.SentencePieceTrainer.train(input={str(txt)!r}, model_prefix={str(out / 'spm')!r}, "
               f"vocab_size={vocab}, minloglevel=2)",
    }
    return [sys.executable, "-c", "if __name__ == '__main__':\n" + "".join(
        f"    {line}\n" for line in programs[method].splitlines())]


def measure(cmd: list[str], rss_cap: int) -> dict:
    """Wall seconds, peak RSS of the process tree (sampled) and of its largest process (wait4)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                     os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with open(Path(os.environ.get("TMPDIR", "/tmp")) / "tokbench-stderr.txt", "w+b") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        root, peak, killed = psutil.Process(proc.pid), 0, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                tree = [root, *root.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in tree)
            except psutil.Error:
                tree, rss = [], 0
            peak = max(peak, rss)
            if rss > rss_cap and not killed:
                for p in reversed(tree):
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                killed = True
            time.sleep(0.05)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")[-2000:]
    # ru_maxrss of the reaped child: the largest RSS of it or any of its waited-for descendants, in KiB
    return {"seconds": wall, "peak_rss": peak, "max_single_rss": usage.ru_maxrss * 1024, "rc": proc.returncode,
            "killed": killed, "stderr": stderr}


def evaluate(method: str, out: Path, held: list[str]) -> tuple[float, float, float]:
    """Held-out characters per token, and encode / decode throughput (MB of text per second, 3 rounds best)."""
    chars, nbytes = sum(len(t) for t in held), sum(len(t.encode("utf-8")) for t in held)
    if method == "spm":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
        encode, decode = sp.encode, sp.decode
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "tokenizer.json"))

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

        def decode(ids: list[list[int]]) -> list[str]:
            return tok.decode_batch(ids)

    enc_s = dec_s = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        ids = encode(held)
        t1 = time.perf_counter()
        decode(ids)
        enc_s, dec_s = min(enc_s, t1 - t0), min(dec_s, time.perf_counter() - t1)
    return chars / sum(len(i) for i in ids), nbytes / 1e6 / enc_s, nbytes / 1e6 / dec_s


def main() -> None:
    """Run every method at every size; print the table and the target ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="25,50,100", help="corpus sizes in MB for all methods")
    ap.add_argument("--ours-only-sizes", default="", help="larger sizes run only for our trainer")
    ap.add_argument("--methods", default="ours,hf,spm,ours-spm")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--max-memory", default="2GB")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rss-cap", type=float, default=10.0, help="GB; runs above are killed")
    ap.add_argument("--work", default="/tmp/xiaolm-tokbench")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    big = [int(s) for s in args.ours_only_sizes.split(",") if s]
    methods = args.methods.split(",")
    work = Path(args.work)
    corpora, held_path = build_corpora(work, sizes + big)
    held = [json.loads(line)["text"] for line in held_path.read_text("utf-8").splitlines()]
    rows = []
    for size in sizes + big:
        for method in methods if size in sizes else ["ours"]:
            out = work / f"out-{method}-{size}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            cmd = child_command(method, corpora[size], out, args.vocab, args.max_memory, args.workers)
            r = measure(cmd, int(args.rss_cap * 2**30))
            ok = r["rc"] == 0 and not r["killed"]
            row = {"size_mb": size, "method": method, "seconds": round(r["seconds"], 1),
                   "peak_rss_mb": round(r["peak_rss"] / 2**20), "ok": ok,
                   "max_single_rss_mb": round(r["max_single_rss"] / 2**20) if r["max_single_rss"] else None,
                   "chars_per_token": None}
            if ok:
                cpt, enc, dec = evaluate(method, out, held)
                row.update(chars_per_token=round(cpt, 4), encode_mb_s=round(enc, 1), decode_mb_s=round(dec, 1))
            if not ok:
                row["error"] = "killed above the RSS cap" if r["killed"] else r["stderr"][-300:]
            rows.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """Markdown table of every run, then ours against each target."""
    print(f"\nvocab {args.vocab}; ours with --max-memory {args.max_memory} --workers {args.workers}\n")
    print("| size | trainer | wall s | peak RSS MB (tree) | max single-process RSS MB | held-out chars/token "
          "| encode MB/s | decode MB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cpt = f"{r['chars_per_token']:.4f}" if r["chars_per_token"] else r.get("error", "failed")
        print(f"| {r['size_mb']} MB | {METHODS[r['method']]} | {r['seconds']} | {r['peak_rss_mb']} | "
              f"{r['max_single_rss_mb']} | {cpt} | {r.get('encode_mb_s', '-')} | {r.get('decode_mb_s', '-')} |")
    print("\n| size | time ours / faster library | RSS ours / HF | chars/token ours / HF |")
    print("|---|---|---|---|")
    by = {(r["size_mb"], r["method"]): r for r in rows}
    for size in sorted({r["size_mb"] for r in rows}):
        ours, hf, spm = by.get((size, "ours")), by.get((size, "hf")), by.get((size, "spm"))
        if not ours or not hf:
            continue
        libs = [r["seconds"] for r in (hf, spm) if r and r["ok"]]
        t = f"{ours['seconds'] / min(libs):.2f}x" if libs else "-"
        m = f"{ours['peak_rss_mb'] / hf['peak_rss_mb']:.2f}x" if hf["ok"] else "HF failed"
        c = f"{ours['chars_per_token'] / hf['chars_per_token']:.3f}" if hf["ok"] and ours["ok"] else "-"
        print(f"| {size} MB | {t} | {m} | {c} |")


if __name__ == "__main__":
    main()
