"""Streaming record readers with file:line provenance and rejects.

Formats: .jsonl, .json (an array or a sequence of values, streamed), .txt (one document a line, or with
`txt_docs="blank"` documents separated by blank lines), .csv/.tsv
(a header row names the fields), .parquet (read in row batches); each of the text formats also gzip (.gz) or
zstandard (.zst) compressed. Memory stays flat whatever the file size.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from xiaolm.errors import Unusable, XiaolmError
from xiaolm.records.compression import CHUNK, READ_ERRORS, open_bytes, open_file
from xiaolm.records.inputs import base_suffix, expand_inputs
from xiaolm.records.rejects import RejectLog

T = TypeVar("T")

log = logging.getLogger(__name__)

TXT_DOCS = ("line", "blank")  # how a .txt file is cut into documents: one a line, or at blank lines
# a blank-line document that grows past this many characters is handed on and the next one begins, so that a
# file without blank lines cannot fill memory (cleaning splits long documents further)
MAX_PARAGRAPH_CHARS = 1_000_000
# JSON and CSV are decoded with errors="surrogateescape": a byte the encoding cannot decode becomes one of these
# lone surrogates, so the record holding it is rejected and reading goes on with the next one
_UNDECODED = re.compile("[\udc80-\udcff]")
# a \udXXX escape in JSON may stand for half of a surrogate pair alone: valid JSON, but no Unicode text
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_txt_docs(txt_docs: str) -> None:
    """XiaolmError unless `txt_docs` names a way to cut .txt files into documents."""
    if txt_docs not in TXT_DOCS:
        raise XiaolmError(f"unknown txt_docs={txt_docs!r}", where="txt_docs",
                          hint="use line (one document a line) or blank (documents separated by blank lines)")


def read_items(path: str | Path, limit: int = 0) -> list[dict]:
    """All records of one small file (an eval set), the first `limit` if given; unreadable lines are skipped."""
    with RejectLog(None) as rejects:
        items = [record for record, _ in read_records([path], rejects)]
    if rejects.total:
        log.warning("skipped %d unreadable lines in %s (%s)", rejects.total, path, rejects.summary())
    return items[:limit] if limit else items


def text_lines(path: Path, rejects: RejectLog | None) -> Iterator[tuple[int, str]]:
    """(line number, decoded line without its newline); undecodable lines go to rejects."""
    n = 0
    try:
        with open_bytes(path) as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    if rejects is not None:
                        rejects.add("invalid_utf8", f"{path}:{n}", raw.decode("utf-8", "backslashreplace"),
                                    detail=str(e))
                    continue
                if n == 1:
                    line = line.removeprefix("\ufeff")
                yield n, line.rstrip("\r\n")
    except READ_ERRORS as e:
        _unreadable(path, n + 1, e, rejects)


def _unreadable(path: Path, line: int, error: Exception, rejects: RejectLog | None) -> None:
    log.warning("%s:%d: stopped reading this file (%s: %s)", path, line, error.__class__.__name__, error)
    if rejects is not None:
        rejects.add("unreadable_file", f"{path}:{line}", None, detail=f"{error.__class__.__name__}: {error}")


def _reject(rejects: RejectLog | None, reason: str, where: str, record: Any, detail: str | None = None
            ) -> None:
    if rejects is not None:
        rejects.add(reason, where, record, detail)


def _read_lines(path: Path, rejects: RejectLog | None, as_text: bool) -> Iterator[tuple[dict, str]]:
    for n, line in text_lines(path, rejects):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if as_text:
            yield {"text": line}, where
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            _reject(rejects, "bad_json", where, line, detail=f"{e.msg} at column {e.colno}")
            continue
        if not isinstance(record, dict):
            _reject(rejects, "not_object", where, record, detail=f"a JSON {type(record).__name__}")
        elif _SURROGATE_ESCAPE.search(line) and _has_surrogate(record):
            _reject(rejects, "lone_surrogate", where, record, detail=_LONE_SURROGATE)
        else:
            yield record, where


def _read_paragraphs(path: Path, rejects: RejectLog | None) -> Iterator[tuple[dict, str]]:
    """Documents separated by one or more blank lines; each one's provenance is its first line."""
    lines: list[str] = []
    size = first = 0
    for n, line in text_lines(path, rejects):
        if line.strip():
            if not lines:
                first = n
            lines.append(line)
            size += len(line) + 1
            if size <= MAX_PARAGRAPH_CHARS:
                continue
        if lines:
            yield {"text": "\n".join(lines)}, f"{path}:{first}"
            lines, size = [], 0
    if lines:
        yield {"text": "\n".join(lines)}, f"{path}:{first}"


def _read_json(path: Path, rejects: RejectLog | None) -> Iterator[tuple[dict, str]]:
    """Stream the elements of a top-level JSON array (or of a JSON value sequence) with their lines."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    buf, pos, line, eof, first = "", 0, 1, False, True
    in_array = closed = need_comma = False
    try:
        with open_bytes(path) as f:

            def fill() -> None:
                nonlocal buf, pos, eof, first
                chunk = f.read(max(CHUNK, len(buf) - pos))
                eof = not chunk
                buf = buf[pos:] + utf8.decode(chunk, final=eof)
                pos = 0
                if first and buf:
                    buf, first = buf.removeprefix("\ufeff"), False

            def skip_space() -> None:
                nonlocal pos, line
                while True:
                    while pos < len(buf) and buf[pos] in " \t\r\n":
                        line += buf[pos] == "\n"
                        pos += 1
                    if pos < len(buf) or eof:
                        return
                    fill()

            fill()
            skip_space()
            if buf[pos:pos + 1] == "[":
                in_array, pos = True, pos + 1
            while True:
                skip_space()
                if pos >= len(buf):
                    break
                if in_array and buf[pos] == "]":
                    closed, pos = True, pos + 1
                    skip_space()
                    if pos < len(buf):
                        _reject(rejects, "bad_json", f"{path}:{line}", buf[pos:pos + 200],
                                detail="extra data after the closing ]")
                    break
                if in_array and need_comma:
                    if buf[pos] != ",":
                        _reject(rejects, "bad_json", f"{path}:{line}", buf[pos:pos + 200],
                                detail="expected ',' or ']' between array elements")
                        return
                    pos += 1
                    skip_space()
                while True:  # decode one value, reading more while it may be cut off by the buffer end
                    try:
                        value, end = decoder.raw_decode(buf, pos)
                    except json.JSONDecodeError as e:
                        if eof:
                            _reject(rejects, "bad_json", f"{path}:{line}", buf[pos:pos + 200],
                                    detail=f"{e.msg}; stopped reading this file")
                            return
                        fill()
                        continue
                    if end == len(buf) and not eof:
                        fill()
                        continue
                    break
                where, start = f"{path}:{line}", pos
                undecoded = _UNDECODED.search(buf, start, end)
                bad_line = line + buf.count("\n", start, undecoded.start()) if undecoded else 0
                line += buf.count("\n", start, end)
                pos, need_comma = end, True
                if undecoded:
                    _reject(rejects, "invalid_utf8", where, _escaped(value),
                            detail=f"bytes that are not UTF-8 at line {bad_line}")
                elif not isinstance(value, dict):
                    _reject(rejects, "not_object", where, value, detail=f"a JSON {type(value).__name__}")
                elif _SURROGATE_ESCAPE.search(buf, start, end) and _has_surrogate(value):
                    _reject(rejects, "lone_surrogate", where, value, detail=_LONE_SURROGATE)
                else:
                    yield value, where
            if in_array and not closed:
                _reject(rejects, "bad_json", f"{path}:{line}", None, detail="the array is not closed with ]")
    except READ_ERRORS as e:
        _unreadable(path, line, e, rejects)


def _read_csv(path: Path, rejects: RejectLog | None, encoding: str = "utf-8") -> Iterator[tuple[dict, str]]:
    """Rows of a CSV (or tab-separated .tsv) file with a header row, as dicts; ragged rows go to rejects."""
    delimiter = "\t" if path.name.endswith((".tsv", ".tsv.gz", ".tsv.zst")) else ","
    undecodable = "invalid_utf8" if codecs.lookup(encoding).name == "utf-8" else "invalid_encoding"
    line = 1
    try:
        with io.TextIOWrapper(open_bytes(path), encoding=encoding, errors="surrogateescape", newline="") as text:
            reader = csv.reader(text, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                return
            header = [h.removeprefix("\ufeff").strip() for h in header]
            line = reader.line_num + 1
            for row in reader:
                where = f"{path}:{line}"
                line = reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    _reject(rejects, "bad_csv_row", where, _escaped(delimiter.join(row)),
                            detail=f"{len(row)} fields, the header has {len(header)}")
                    continue
                if any(_UNDECODED.search(cell) for cell in row):
                    _reject(rejects, undecodable, where, _escaped(delimiter.join(row)),
                            detail=f"bytes that are not {encoding}")
                    continue
                yield dict(zip(header, row, strict=True)), where
    except csv.Error as e:
        _reject(rejects, "bad_csv_row", f"{path}:{line}", None, detail=f"{e}; stopped reading this file")
    except READ_ERRORS as e:
        _unreadable(path, line, e, rejects)


_LONE_SURROGATE = "a \\udXXX escape that is half of a surrogate pair alone: not Unicode text"


def _has_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a lone surrogate (a paired escape has become one non-BMP character)."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(map(_has_surrogate, value))
    return False


def _escaped(value: Any) -> Any:
    """A rejected value with its undecodable bytes shown as \\xNN, so that the rejects file stays valid UTF-8."""
    if isinstance(value, str):
        return _UNDECODED.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", value)
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    return value


def where_number(where: str) -> int:
    """The line (or Parquet row) number of a reader's "file:line" or "file:row N"."""
    return int(where.rsplit(":", 1)[1].removeprefix("row "))


def where_at(path: str | Path, number: int) -> str:
    """The reader's provenance of line (or Parquet row) `number` of `path`: where_number's inverse."""
    return f"{path}:row {number}" if base_suffix(Path(path)) == ".parquet" else f"{path}:{number}"


def _parquet_file(path: Path) -> Any:
    """pyarrow's ParquetFile (reads the file's metadata); XiaolmError when pyarrow is missing."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise XiaolmError("reading .parquet needs pyarrow", where=str(path), hint="pip install pyarrow") from None
    open_file(path).close()  # a file that cannot be opened stops the stage; pyarrow's errors below are about damage
    return pq.ParquetFile(path)


def _read_parquet(path: Path, rejects: RejectLog | None, batch_rows: int = 1024) -> Iterator[tuple[dict, str]]:
    """Rows of a Parquet file as dicts, read batch by batch; provenance is `file:row N` (1-based)."""
    row = 0
    try:
        for batch in _parquet_file(path).iter_batches(batch_size=batch_rows):
            for record in batch.to_pylist():
                row += 1
                yield record, where_at(path, row)
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) for damaged files
        _unreadable(path, row + 1, e, rejects)


def check_readable(path: Path) -> None:
    """Read the start of a file as its reader will: the first block through its decompression, or a Parquet
    file's metadata; XiaolmError naming the file if that fails. Damage further on is only found while reading."""
    try:
        if base_suffix(path) == ".parquet":
            _parquet_file(path)
        else:
            with open_bytes(path) as f:
                f.read(CHUNK)
    except (*READ_ERRORS, ValueError) as e:  # ValueError: pyarrow's ArrowInvalid
        raise XiaolmError(f"cannot read this input ({e.__class__.__name__}: {e})", where=str(path),
                          hint="check that the file is complete and readable, or leave it out") from e


def read_records(inputs: Sequence[str | Path], rejects: RejectLog | None = None,
                 encoding: str = "utf-8", txt_docs: str = "line") -> Iterator[tuple[dict, str]]:
    """Yield (record, "file:line") from every input; malformed records go to `rejects`, reading goes on.

    `encoding` applies to CSV/TSV files (some public Chinese CSVs are GB18030); JSON and text are UTF-8.
    `txt_docs` says how .txt files are cut into documents: "line" (one a line) or "blank" (at blank lines).
    """
    for path in expand_inputs(inputs):
        yield from read_file(path, rejects, encoding=encoding, txt_docs=txt_docs)


def convert_records(inputs: Sequence[str | Path], convert: Callable[[dict], T],
                    rejects: RejectLog | None = None) -> list[T]:
    """convert(record) for every record of the inputs; one that raises Unusable goes to rejects with its reason."""
    out: list[T] = []
    for record, where in read_records(inputs, rejects):
        try:
            out.append(convert(record))
        except Unusable as e:
            if rejects is not None:
                rejects.add(e.reason, where, record, e.detail)
    return out


def read_file(path: Path, rejects: RejectLog | None, fmt: str | None = None,
              encoding: str = "utf-8", txt_docs: str = "line") -> Iterator[tuple[dict, str]]:
    """(record, "file:line") of one file in format `fmt` (".jsonl", ".csv", …; default: from its name)."""
    check_txt_docs(txt_docs)
    suffix = fmt or base_suffix(path)
    if suffix == ".json":
        records = _read_json(path, rejects)
    elif suffix in (".csv", ".tsv"):
        records = _read_csv(path, rejects, encoding)
    elif suffix == ".parquet":
        records = _read_parquet(path, rejects)
    elif suffix == ".txt" and txt_docs == "blank":
        records = _read_paragraphs(path, rejects)
    else:
        records = _read_lines(path, rejects, as_text=suffix == ".txt")
    rejected = rejects.total if rejects is not None else 0
    empty = True
    for item in records:
        empty = False
        yield item
    if empty and rejects is not None and rejects.total == rejected:
        rejects.add("empty_file", f"{path}:1", None,
                    detail="the file holds no records (empty, blank lines only, an empty array or no rows)")
