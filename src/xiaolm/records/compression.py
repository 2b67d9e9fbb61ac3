"""Record files as bytes: gzip (.gz) and zstandard (.zst) decompressed by name.

A file that cannot be opened is an error that stops the stage (XiaolmError); damage found while reading one that
did open (a truncated .gz or .zst) raises one of READ_ERRORS, which the readers count as an unreadable_file reject.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from typing import IO, Any

from xiaolm.errors import XiaolmError

CHUNK = 1 << 20


def open_file(path: Path) -> IO[bytes]:
    """The file opened for reading; XiaolmError naming it when it cannot be (permissions, an I/O error): such a
    file stops the stage, where damage inside a file that opens is a counted unreadable_file reject."""
    try:
        return open(path, "rb")
    except OSError as e:
        raise XiaolmError(f"cannot open this input ({e.__class__.__name__}: {e.strerror or e})", where=str(path),
                          hint="make it readable, or leave it out of the inputs") from e


def open_bytes(path: Path) -> IO[bytes]:
    """A binary stream of the file's content, gunzipped or zstd-decompressed by its name's ending."""
    raw = open_file(path)
    if path.name.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
        stream.myfileobj = raw  # closed with the stream, as when gzip opens the file itself
        return stream
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(_ZstdReader(raw, zstandard.ZstdDecompressor()), buffer_size=CHUNK)
    return raw


class _ZstdReader(io.RawIOBase):
    """Decompresses a .zst file frame by frame; a file that ends inside a frame raises EOFError, as gzip does."""

    def __init__(self, file: IO[bytes], decompressor: Any):
        self._file, self._zstd = file, decompressor
        self._frame = decompressor.decompressobj()
        self._pending = b""
        self._started = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = self._file.read(CHUNK)
            if not chunk:
                if self._started and not self._frame.eof:
                    raise EOFError("compressed file ended before the end of its zstd frame")
                return 0
            self._started = True
            self._pending = self._frame.decompress(chunk)
            while self._frame.eof and self._frame.unused_data:  # the next frame begins in this chunk
                rest = self._frame.unused_data
                self._frame = self._zstd.decompressobj()
                self._pending += self._frame.decompress(rest)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _zstd_error() -> tuple[type[Exception], ...]:
    try:
        import zstandard
    except ImportError:
        return ()
    return (zstandard.ZstdError,)


# what reading a file that opened may raise when its content is damaged: a counted unreadable_file reject
READ_ERRORS = (EOFError, OSError, zlib.error, *_zstd_error())
