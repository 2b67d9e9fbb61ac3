"""Token ids → text deltas, as they come: never half a UTF-8 character, never past a stop string."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TextStream:
    """Text pieces of a growing token sequence, cut before the first stop string (then `stopped` is True)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """The new text that `token` makes safe to show ('' while a character or a stop string is unfinished)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.text.endswith("\ufffd"):
            return ""  # byte-level BPE ended a token mid-character: wait for the rest of its bytes
        self.text = self.text.replace("\ufffd", "")  # bytes that never formed a character: gone for good
        cut = _first_stop(self.text, self.stop_strings)
        if cut is not None:
            self.stopped = True
            return self._take(cut)
        return self._take(len(self.text) - _partial_stop(self.text, self.stop_strings))

    def finish(self) -> str:
        """What was held back once the tokens end, minus bytes that never formed a character."""
        if self.stopped:
            return ""
        self.stopped = True
        self.text = self.text.replace("\ufffd", "")
        cut = _first_stop(self.text, self.stop_strings)
        return self._take(len(self.text) if cut is None else cut)

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece


def stream_text(tokenizer: PreTrainedTokenizerBase, tokens: Iterable[int],
                stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Text pieces of a token stream, never splitting a UTF-8 character, cut before any stop string."""
    stream = TextStream(tokenizer, stop_strings)
    for token in tokens:
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            return
    piece = stream.finish()
    if piece:
        yield piece


def _partial_stop(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest tail of `text` that begins some stop string (held back until resolved)."""
    return max((k for s in stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _first_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    return min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=None)
