"""Tokenizer training: xiaolm's bounded-memory BPE vs tokenizers' BpeTrainer vs sentencepiece, at growing sizes.

    python benchmarks/tokenizer_train.py [--quick] [--sizes 25,50,100] [--ours-only-sizes 200] [--vocab 32000]
                                         [--methods ours,hf,hf-gpt2,spm,ours-spm] [--repeats 1]
                                         [--max-memory 2GB] [--workers 2] [--work /tmp/xiaolm-tokbench]

Corpus of S MB (UTF-8 text): 80% real Chinese from the embedded demo corpus (poems and idioms; the first pass as
is, each later pass "expanded": clauses shuffled within each text and ~30% of neighbouring clauses joined without
punctuation, so new long CJK runs keep appearing as in web text) and 20% generated text (the demo's fictional
world facts, question-answer pairs and numeral sentences, a new world per pass). Held-out text: every 20th poem
and idiom (never in any training corpus) plus generated text of an unseen world.

Trainers (--methods):
  ours      xiaolm `train_tokenizer`: chunk counts in bounded memory (--max-memory, --workers counting
            processes), then tokenizers' BpeTrainer on the most frequent chunks, xiaolm's pre-tokenizer attached
  hf        tokenizers' BpeTrainer on the whole corpus (train_from_iterator, every chunk counted) with xiaolm's
            pre-tokenizer: the same chunks as ours (CJK runs cut every 8 characters, digits alone, punctuation
            runs, words of other scripts), byte-level, the same special tokens and min_frequency 2. The script
            saves xiaolm's empty tokenizer (`build_empty_tokenizer`) as JSON and the trainer's process loads it, so
            that process imports only tokenizers; before training, it checks on a sample (the held-out text and
            the first 2,000 texts of the smallest corpus) that this pre-tokenizer and xiaolm's ChunkSplitter (what
            its counting uses) give identical chunk lists, and stops if not. Against ours, the difference is
            bounded counting, not splitting.
  hf-gpt2   the same trainer and settings with GPT-2's ByteLevel pre-tokenizer (its regex: letters runs unbounded,
            digits grouped): the common default, a second row
  spm       sentencepiece defaults (unigram, all lines) on the same text as a .txt file
  ours-spm  xiaolm's sentencepiece backend

Each trainer runs in its own process, once per round (--repeats rounds per size, the order rotating); wall time
covers process start to exit, peak RSS is the sum over the process tree sampled every 50 ms (and, as a check, the
largest VmHWM of one of its processes, read at the same times: wait4's ru_maxrss would include this process's size
when it forked). Compression is characters per token on the held-out text, measured afterwards in this process, with
the encode and decode throughput of the trained tokenizer (tokenizers' encode_batch/decode_batch, sentencepiece's
encode/decode) over --eval-rounds rounds. Every repeated measurement is printed as median (min–max) over its rounds,
never the best one; the ratios are the median (min–max) of the rounds' ratios. A run is killed above --rss-cap
(default 10 GB) and reported as such.

Sizes: the defaults (25, 50 and 100 MB, all five trainers, 1 round) take about 25 minutes on 2 cores (the runs in
benchmarks/RESULTS.md took 17.5 minutes for four of the trainers on a loaded 2-core machine, before building the
corpora and evaluating); `--quick` (--sizes 10) about 3 minutes, scaled from 2 and 3 MB runs (50 and 63 s end to end
for the five trainers on a loaded 2-core machine, tokenizers with one thread). Both are estimates, not measured.
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
from harness import (
    argument_parser,
    markdown_table,
    one_or_spread,
    parse_args,
    print_header,
    proc_status_mb,
    spread,
)

METHODS = {
    "ours": "xiaolm bpe (bounded counting)",
    "hf": "tokenizers BpeTrainer, xiaolm's pre-tokenizer",
    "hf-gpt2": "tokenizers BpeTrainer, GPT-2 ByteLevel pre-tokenizer",
    "spm": "sentencepiece defaults (unigram)",
    "ours-spm": "xiaolm sentencepiece backend",
}
LIBRARIES = ("hf", "hf-gpt2", "spm")
QUICK = {"sizes": "10"}
CHECK_TEXTS = 2000  # texts of the smallest corpus in the pre-tokenizer check, besides the held-out ones
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


def save_empty_tokenizer(work: Path) -> Path:
    """xiaolm's untrained tokenizer (its pre-tokenizer and decoder) as JSON, for the `hf` trainer to load."""
    from xiaolm.tokenizer.pretokenize import build_empty_tokenizer

    path = work / "xiaolm-empty-tokenizer.json"
    build_empty_tokenizer().save(str(path))
    return path


def check_pretokenizer(empty: Path, texts: list[str]) -> str:
    """Compare the chunks of the `hf` trainer's pre-tokenizer with xiaolm's ChunkSplitter; exit on a difference."""
    from tokenizers import Tokenizer, pre_tokenizers

    from xiaolm.tokenizer.pretokenize import ChunkSplitter, to_byte_level

    theirs, splitter = Tokenizer.from_file(str(empty)).pre_tokenizer, ChunkSplitter()
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ours_chunks, gpt2_chunks = [], []
    for i, text in enumerate(texts):
        ours = [to_byte_level(c) for c in splitter.chunks(text)]
        hf = [c for c, _ in theirs.pre_tokenize_str(text)]
        if ours != hf:
            at = next((k for k, (a, b) in enumerate(zip(ours, hf, strict=False)) if a != b), min(len(ours), len(hf)))
            sys.exit(f"pre-tokenizer check: text {i} splits differently at chunk {at}: ChunkSplitter "
                     f"{ours[at:at + 3]} vs tokenizers {hf[at:at + 3]} — the `hf` baseline would not see xiaolm's "
                     f"chunks; fix src/xiaolm/tokenizer/pretokenize.py")
        ours_chunks += ours
        gpt2_chunks += [c for c, _ in gpt2.pre_tokenize_str(text)]
    return (f"pre-tokenizer check: on {len(texts):,} sample texts ({sum(map(len, texts)):,} characters) xiaolm's "
            f"ChunkSplitter and the `hf` trainer's pre-tokenizer give identical chunk lists: {len(ours_chunks):,} "
            f"chunks, {len(set(ours_chunks)):,} distinct, longest {max(map(len, ours_chunks))} byte-level symbols "
            f"(GPT-2 ByteLevel: {len(gpt2_chunks):,} chunks, {len(set(gpt2_chunks)):,} distinct, longest "
            f"{max(map(len, gpt2_chunks))})")


def child_command(method: str, corpus: Path, out: Path, vocab: int, max_memory: str, workers: int,
                  empty: Path) -> list[str]:
    """The python -c program that trains one tokenizer and exits."""
    from xiaolm.chat_format import SPECIAL_TOKENS

    txt = corpus.with_suffix(".txt")
    ours = (f"from xiaolm.tokenizer import train_tokenizer\n"
            f"train_tokenizer([{str(corpus)!r}], {str(out)!r}, vocab_size={vocab}, max_memory={max_memory!r}, "
            f"workers={workers}{{backend}})")
    hf = ("import json, os\n"
          "from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers\n"
          "{tokenizer}\n"
          f"trainer = trainers.BpeTrainer(vocab_size={vocab}, min_frequency=2, show_progress=False, "
          f"initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens={SPECIAL_TOKENS!r})\n"
          f"texts = (json.loads(line)['text'] for line in open({str(corpus)!r}, encoding='utf-8'))\n"
          "tok.train_from_iterator(texts, trainer=trainer)\n"
          f"os.makedirs({str(out)!r}, exist_ok=True)\n"
          f"tok.save({str(out / 'tokenizer.json')!r})")
    programs = {
        "ours": ours.format(backend=""),
        "ours-spm": ours.format(backend=", backend='sentencepiece'"),
        "hf": hf.format(tokenizer=f"tok = Tokenizer.from_file({str(empty)!r})"),
        "hf-gpt2": hf.format(tokenizer="tok = Tokenizer(models.BPE())\n"
                                       "tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)\n"
                                       "tok.decoder = decoders.ByteLevel()"),
        "spm": "import os, sentencepiece as spm\n"
               f"os.makedirs({str(out)!r}, exist_ok=True)\n"
               f"spm.SentencePieceTrainer.train(input={str(txt)!r}, model_prefix={str(out / 'spm')!r}, "
               f"vocab_size={vocab}, minloglevel=2)",
    }
    return [sys.executable, "-c", "if __name__ == '__main__':\n" + "".join(
        f"    {line}\n" for line in programs[method].splitlines())]


def measure(cmd: list[str], rss_cap: int) -> dict:
    """Wall seconds, peak RSS of the process tree and the largest peak of one of its processes (both sampled)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                     os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with open(Path(os.environ.get("TMPDIR", "/tmp")) / "tokbench-stderr.txt", "w+b") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        root, peak, single, killed = psutil.Process(proc.pid), 0, 0.0, False
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in tree)
                # wait4's ru_maxrss would count this (large) process's size at fork time
                single = max(single, *(proc_status_mb("VmHWM", p.pid) for p in tree))
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
        err.seek(0)
        stderr = err.read().decode(errors="replace")[-2000:]
    return {"seconds": wall, "peak_rss": peak, "max_single_rss_mb": single, "rc": proc.returncode,
            "killed": killed, "stderr": stderr}


def evaluate(method: str, out: Path, held: list[str], rounds: int) -> tuple[float, list[float], list[float]]:
    """Held-out characters per token, and encode / decode throughput of each round (MB of text per second)."""
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

    enc, dec = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ids = encode(held)
        t1 = time.perf_counter()
        decode(ids)
        enc.append(nbytes / 1e6 / (t1 - t0))
        dec.append(nbytes / 1e6 / (time.perf_counter() - t1))
    return chars / sum(len(i) for i in ids), enc, dec


def main() -> None:
    """Run every method at every size, --repeats rounds each; print the tables and the ratios."""
    ap = argument_parser(__doc__)
    ap.add_argument("--sizes", default="25,50,100", help="corpus sizes in MB for all methods")
    ap.add_argument("--ours-only-sizes", default="", help="larger sizes run only for our trainer")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size, every trainer")
    ap.add_argument("--max-memory", default="2GB", help="ours: the memory budget")
    ap.add_argument("--workers", type=int, default=2, help="ours: counting processes")
    ap.add_argument("--repeats", type=int, default=1, help="rounds per size: every trainer once per round")
    ap.add_argument("--eval-rounds", type=int, default=3, help="encode/decode timing rounds per trained tokenizer")
    ap.add_argument("--rss-cap", type=float, default=10.0, help="GB; runs above are killed")
    ap.add_argument("--work", default="/tmp/xiaolm-tokbench", help="corpora (reused) and trained tokenizers")
    ap.add_argument("--json", help="also write the rows here")
    args = parse_args(ap, QUICK, "about 3 minutes")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    big = [int(s) for s in args.ours_only_sizes.split(",") if s]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(methods) - set(METHODS):
        ap.error(f"unknown methods: {', '.join(sorted(unknown))} (known: {', '.join(METHODS)})")
    if args.repeats < 1 or args.eval_rounds < 1:
        ap.error("--repeats and --eval-rounds must be at least 1")
    print_header(("tokenizers", "sentencepiece", "regex", "numpy", "psutil"),
                 threads=f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')} (tokenizers' trainers; "
                         f"unset: one thread per core), ours counting with {args.workers} processes, "
                         f"sentencepiece defaults: its own num_threads")
    work = Path(args.work)
    corpora, held_path = build_corpora(work, sizes + big)
    held = [json.loads(line)["text"] for line in held_path.read_text("utf-8").splitlines()]
    print(f"corpora: {', '.join(f'{s} MB' for s in sizes + big)} in {work}; held-out: {len(held):,} texts, "
          f"{sum(map(len, held)):,} characters")
    empty = save_empty_tokenizer(work)
    if "hf" in methods:
        with open(corpora[min(sizes + big)], encoding="utf-8") as f:
            sample = [json.loads(line)["text"] for _, line in zip(range(CHECK_TEXTS), f, strict=False)]
        print(check_pretokenizer(empty, held + sample))
    rows = []
    for size in sizes + big:
        order = methods if size in sizes else ["ours"]
        for k in range(args.repeats):
            for method in order[k % len(order):] + order[:k % len(order)]:
                out = work / f"out-{method}-{size}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                cmd = child_command(method, corpora[size], out, args.vocab, args.max_memory, args.workers, empty)
                r = measure(cmd, int(args.rss_cap * 2**30))
                ok = r["rc"] == 0 and not r["killed"]
                row = {"size_mb": size, "method": method, "round": k + 1, "seconds": round(r["seconds"], 1),
                       "peak_rss_mb": round(r["peak_rss"] / 2**20), "ok": ok,
                       "max_single_rss_mb": round(r["max_single_rss_mb"]) or None,
                       "chars_per_token": None}
                if ok:
                    cpt, enc, dec = evaluate(method, out, held, args.eval_rounds)
                    row.update(chars_per_token=round(cpt, 4), encode_mb_s=[round(x, 2) for x in enc],
                               decode_mb_s=[round(x, 2) for x in dec])
                else:
                    row["error"] = "killed above the RSS cap" if r["killed"] else r["stderr"][-300:]
                rows.append(row)
                print(json.dumps(row, ensure_ascii=False), flush=True)
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """Markdown table of every trainer at every size, then ours against each library."""
    print(f"\nvocab {args.vocab}; ours with --max-memory {args.max_memory} --workers {args.workers}; "
          f"{args.repeats} round(s) per size: wall s and RSS as median (min–max) over the rounds, encode/decode "
          f"MB/s as median (min–max) over every timing round ({args.eval_rounds} per trained tokenizer)\n")
    table = []
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["size_mb"], r["method"]), []).append(r)
    for (size, method), runs in groups.items():
        ok = [r for r in runs if r["ok"]]
        error = next(r["error"] for r in runs if not r["ok"]) if len(ok) < len(runs) else ""
        if not ok:
            table.append([f"{size} MB", METHODS[method], "-", "-", "-", f"failed: {error}", "-", "-"])
            continue
        failed = f" ({len(runs) - len(ok)} of {len(runs)} runs failed: {error})" if error else ""
        single = [r["max_single_rss_mb"] for r in ok if r["max_single_rss_mb"]]
        table.append([f"{size} MB", METHODS[method], one_or_spread([r["seconds"] for r in ok], "{:.1f}"),
                      one_or_spread([r["peak_rss_mb"] for r in ok], "{:,.0f}"),
                      one_or_spread(single, "{:,.0f}") if single else "-",
                      one_or_spread([r["chars_per_token"] for r in ok], "{:.4f}", same=True) + failed,
                      spread([x for r in ok for x in r["encode_mb_s"]], "{:.1f}"),
                      spread([x for r in ok for x in r["decode_mb_s"]], "{:.1f}")])
    print(markdown_table(["size", "trainer", "wall s", "peak RSS MB (tree)", "max single-process RSS MB",
                          "held-out chars/token", "encode MB/s", "decode MB/s"], table))
    by_round = {(r["size_mb"], r["method"], r["round"]): r for r in rows if r["ok"]}
    ratios = []
    for size in sorted({r["size_mb"] for r in rows}):
        rounds = sorted(k for s, m, k in by_round if s == size and m == "ours")
        if not rounds:
            continue
        ours = [by_round[(size, "ours", k)] for k in rounds]

        def against(method: str, key: str, fmt: str, ours: list[dict] = ours, size: int = size) -> str:
            values = [o[key] / by_round[(size, method, o["round"])][key] for o in ours
                      if (size, method, o["round"]) in by_round]
            return one_or_spread(values, fmt, same=key == "chars_per_token") if values else "-"

        fastest = [min((by_round[(size, m, o["round"])] for m in LIBRARIES if (size, m, o["round"]) in by_round),
                       key=lambda r: r["seconds"], default=None) for o in ours]
        wall = [o["seconds"] / f["seconds"] for o, f in zip(ours, fastest, strict=True) if f]
        names = ", ".join(sorted({f["method"] for f in fastest if f}))
        ratios.append([f"{size} MB", against("hf", "seconds", "{:.2f}x"),
                       f"{one_or_spread(wall, '{:.2f}x')} ({names})" if wall else "-",
                       against("hf", "peak_rss_mb", "{:.2f}x"), against("hf-gpt2", "peak_rss_mb", "{:.2f}x"),
                       against("hf", "chars_per_token", "{:.3f}"), against("hf-gpt2", "chars_per_token", "{:.3f}")])
    print("\nOurs against the libraries, same round (median (min–max) over rounds when there are several); hf: "
          "tokenizers with xiaolm's pre-tokenizer, hf-gpt2: with GPT-2 ByteLevel\n")
    if not ratios:
        print("(no ratios: ours has no successful run)")
        return
    print(markdown_table(["size", "wall ours / hf", "wall ours / fastest library (which)", "peak RSS ours / hf",
                          "peak RSS ours / hf-gpt2", "chars/token ours / hf", "chars/token ours / hf-gpt2"], ratios))


if __name__ == "__main__":
    main()
