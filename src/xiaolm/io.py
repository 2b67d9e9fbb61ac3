"""Atomic file writes (temp file + rename) so an interrupted run never leaves a half-written output."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to `path` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def json_text(obj: Any, indent: int | None = None) -> str:
    """JSON with Chinese kept readable; lone surrogates (which UTF-8 cannot hold) make it all \\u-escaped."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, indent=indent)
    return text


def json_line(obj: Any) -> str:
    """One line of a .jsonl file: `json_text` and a newline."""
    return json_text(obj) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (UTF-8, indented) to `path` atomically."""
    atomic_write_text(path, json_text(obj, indent=2) + "\n")


def concat_files(parts: Iterable[str | os.PathLike], target: str | os.PathLike) -> None:
    """Write the parts' bytes one after another to `target`, atomically, in bounded memory."""
    with atomic_open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
