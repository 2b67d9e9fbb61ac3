"""The sentencepiece backend: a unigram model trained on a memory-bounded sample of lines, saved as HF tokenizer.json.

sentencepiece reads at most `input_sentence_size` lines, a uniform sample of all lines (reservoir sampling), so
its memory follows the sample, not the corpus. Identity normalization, no dummy prefix, kept whitespace and
byte fallback make the round trip lossless; the converted vocabulary spells spaces as spaces (not "▁"), so a
literal "▁" in text survives too; text spelling "<unk>" (or a special token, where specials are encoded as
text, as packing does) becomes ordinary pieces.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from xiaolm.chat_format import SPECIAL_TOKENS
from xiaolm.errors import XiaolmError
from xiaolm.tokenizer.pretokenize import DIGIT

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

SPACE = "\u2581"  # sentencepiece's whitespace mark
SPECIAL_MARK = "<|"  # how every special token begins
UNK = "<|unk|>"  # sentencepiece's <unk>, renamed like the specials so that text never matches it
MAX_LINE_CHARS = 2000  # longer lines are cut: sentencepiece skips lines over max_sentence_length bytes
# sentencepiece's unigram trainer peaks at about this many bytes of memory per byte of sampled text
# (suffix array, seed pieces, lattices): ~20 measured on the demo corpus, 60 leaves headroom
SPM_BYTES_PER_TEXT_BYTE = 60
AVG_LINE_BYTES = 120  # a typical line of Chinese text, to turn a byte budget into a line count
BASE_MEMORY = 150 << 20


def training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of the texts, long ones cut to MAX_LINE_CHARS characters."""
    for text in texts:
        for line in text.split("\n"):
            for i in range(0, len(line), MAX_LINE_CHARS):
                piece = line[i:i + MAX_LINE_CHARS]
                if piece.strip():
                    yield piece


def sample_size(max_memory: int) -> int:
    """The number of lines sentencepiece may sample within `max_memory` bytes."""
    return max(1000, (max_memory - BASE_MEMORY) // (SPM_BYTES_PER_TEXT_BYTE * AVG_LINE_BYTES))


def train_sentencepiece(texts: Iterable[str], vocab_size: int, max_memory: int, cjk_chars: bool = False,
                        threads: int = 1) -> tuple[Tokenizer, dict[str, Any]]:
    """A unigram sentencepiece model of `vocab_size` tokens (specials included), converted to tokenizers."""
    import sentencepiece as spm

    if cjk_chars:
        raise XiaolmError("cjk_chars works only with the bpe backend", where="cjk_chars",
                          hint="drop --cjk-chars or use --backend bpe")
    model = io.BytesIO()
    lines = sample_size(max_memory)
    spm.set_random_generator_seed(0)  # the line sample, hence the model, is the same on every run
    start = time.perf_counter()
    spm.SentencePieceTrainer.train(  # its RuntimeErrors (e.g. a vocabulary too large) are the caller's to word
        sentence_iterator=training_lines(texts), model_writer=model, model_type="unigram",
        # our specials replace sentencepiece's; its <unk> (saved as UNK) follows them, never produced
        vocab_size=vocab_size - len(SPECIAL_TOKENS), unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=0.9995, input_sentence_size=lines, shuffle_input_sentence=True,
        max_sentence_length=4 * MAX_LINE_CHARS + 16, num_threads=threads, minloglevel=2)
    seconds = time.perf_counter() - start
    tok = sentencepiece_to_tokenizers(model.getvalue())
    return tok, {"sampled_lines_max": lines, "spm_seconds": round(seconds, 3), "spm_model": "unigram"}


def sentencepiece_to_tokenizers(model_bytes: bytes) -> Tokenizer:
    """An HF Unigram tokenizer with our specials at ids 0.., the same pieces and scores, and byte fallback."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS]
    unk_id = None
    for piece in proto.pieces:
        if piece.type == piece.CONTROL:
            continue
        if piece.type == piece.UNKNOWN:
            unk_id = len(vocab)  # tokenizers' Unigram needs one; byte fallback means it is never produced
            vocab.append((UNK, piece.score))
            continue
        vocab.append((piece.piece.replace(SPACE, " "), piece.score))
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=True))
    # the splits sentencepiece trained with: digits alone, a piece never spans more than one space-led word.
    # The model matches any of its pieces in text, so "<|" stands alone too: no text becomes a special token
    # (when specials are encoded as text) or UNK; byte pieces such as <0xE4> hold a digit, already alone
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(DIGIT), behavior="isolated"),
        pre_tokenizers.Split(SPECIAL_MARK, behavior="isolated"),
        pre_tokenizers.Split(Regex(r" *[^ ]+| +"), behavior="isolated"),
    ])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok
