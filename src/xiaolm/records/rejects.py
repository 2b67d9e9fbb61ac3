"""The reject log: rejected records counted by reason, a few examples kept, each written to rejects.jsonl."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import IO, Any

from xiaolm.io import atomic_open, json_line

MAX_EXAMPLES = 3


class RejectLog:
    """Counts rejected records by reason and, given a path, writes them to a rejects.jsonl (atomically)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[dict]] = defaultdict(list)
        self._file: IO[str] | None = None
        self._ctx: Any = None

    def __enter__(self) -> RejectLog:
        if self.path is not None:
            self._ctx = atomic_open(self.path, "w")
            self._file = self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            ctx, self._ctx, self._file = self._ctx, None, None
            ctx.__exit__(*exc)

    def add(self, reason: str, where: str, record: Any, detail: str | None = None) -> None:
        """Record one rejection: a short reason code, "file:line", the record (raw text if unparseable)."""
        self.counts[reason] += 1
        row = {"where": where, "reason": reason, "record": record}
        if detail:
            row["detail"] = detail
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append({"where": where, "record": _preview(record)})
        if self._file is not None:
            self._file.write(json_line(row))

    @property
    def total(self) -> int:
        """Number of rejected records."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """`too_short 20, bad_json 1` (most frequent first), or `none`."""
        return reject_summary(self.counts)


def reject_summary(counts: Counter[str]) -> str:
    """Rejections by reason for a log line: `too_short 20, bad_json 1` (most frequent first), or `none`."""
    return ", ".join(f"{k} {v}" for k, v in counts.most_common()) or "none"


def merge_examples(into: dict[str, list], found: dict[str, list], limit: int = MAX_EXAMPLES) -> None:
    """Add a shard's examples per reason (or rule) to `into`, keeping at most `limit` of each."""
    for key, items in found.items():
        have = into.setdefault(key, [])
        have.extend(items[:max(limit - len(have), 0)])


def _preview(record: Any, limit: int = 200) -> str:
    text = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "…"


