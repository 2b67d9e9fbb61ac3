"""Streaming record readers (jsonl, json array, txt; optionally .gz) with file:line provenance and rejects."""

from __future__ import annotations

import glob
import gzip
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from xiaolm.errors import XiaolmError

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".txt")


class RejectLog:
    """Collects rejected records with reason and file:line; writes rejects.jsonl when given a path."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.counts: Counter[str] = Counter()
        self._file: IO[str] | None = None

    def __enter__(self) -> RejectLog:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")
        return self

    def add(self, reason: str, where: str, record: Any) -> None:
        """Record one rejection."""
        self.counts[reason] += 1
        if self._file is not None:
            self._file.write(json.dumps({"where": where, "reason": reason, "record": record},
                                        ensure_ascii=False) + "\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


def _base_suffix(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    return Path(name).suffix


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, globs and directories (recursive) → sorted list of readable record files."""
    files: list[Path] = []
    for item in inputs:
        item = str(item)
        matches = sorted(glob.glob(item, recursive=True)) if any(c in item for c in "*?[") else [item]
        if not matches or not Path(matches[0]).exists():
            raise XiaolmError("input not found", where=item, hint="check the path (files, globs or directories)")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                files.extend(sorted(f for f in p.rglob("*") if f.is_file() and _base_suffix(f) in SUFFIXES
                                    and not f.name.startswith((".", "_")) and f.name != "rejects.jsonl"))
            else:
                files.append(p)
    return files


def _open_bytes(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _lines(path: Path, rejects: RejectLog | None) -> Iterator[tuple[int, str]]:
    """(line number, decoded line); undecodable lines and a truncated .gz go to rejects."""
    where = str(path)
    try:
        with _open_bytes(path) as f:
            for n, raw in enumerate(f, 1):
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError:
                    if rejects is not None:
                        rejects.add("invalid UTF-8", f"{where}:{n}", raw.decode("utf-8", "replace"))
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        if rejects is not None:
            rejects.add(f"unreadable file ({e.__class__.__name__}: {e})", where, None)
        log.warning("%s: unreadable after some records (%s)", where, e)


def read_records(inputs: Sequence[str | Path], rejects: RejectLog | None = None
                 ) -> Iterator[tuple[dict, str]]:
    """Yield (record, "file:line") from every input; malformed records go to `rejects`."""
    for path in expand_inputs(inputs):
        suffix = _base_suffix(path)
        if suffix == ".json":
            yield from _read_json_array(path, rejects)
            continue
        for n, line in _lines(path, rejects):
            where = f"{path}:{n}"
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if suffix == ".txt":
                yield {"text": line, "source": path.name}, where
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if rejects is not None:
                    rejects.add(f"bad JSON ({e.msg})", where, line)
                continue
            if not isinstance(record, dict):
                if rejects is not None:
                    rejects.add(f"not a JSON object ({type(record).__name__})", where, record)
                continue
            yield record, where


def _read_json_array(path: Path, rejects: RejectLog | None) -> Iterator[tuple[dict, str]]:
    try:
        with _open_bytes(path) as f:
            data = json.loads(f.read().decode("utf-8"))
    except (ValueError, OSError) as e:
        if rejects is not None:
            rejects.add(f"bad JSON file ({e})", str(path), None)
        return
    items = data if isinstance(data, list) else [data]
    for i, record in enumerate(items):
        where = f"{path}:[{i}]"
        if isinstance(record, dict):
            yield record, where
        elif rejects is not None:
            rejects.add(f"not a JSON object ({type(record).__name__})", where, record)
