"""Reading the vendored real data and writing the demo's JSON-lines files."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).parent


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    """Write records one JSON object a line (UTF-8, parent folders made); the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def load_vendored(name: str) -> list[dict]:
    """Records of one vendored file (`poetry.jsonl.gz` or `idioms.jsonl.gz`)."""
    with gzip.open(HERE / name, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
