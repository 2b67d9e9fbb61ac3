"""Tokenize records into flat token files (train.bin / val.bin, EOS after every document) + meta.json."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import yaml

from xiaolm.data.read import RejectLog, finished_stage, inputs_fingerprint, read_records, stage_inputs
from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_open, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

BATCH = 512
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def is_val(key: str, seed: int, fraction: float) -> bool:
    """Whether the document with this key goes to the validation split (a pure function of key and seed)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


class Unusable(Exception):
    """A record with no usable text: a short reason code and an optional detail."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def document_text(record: dict, text_field: str) -> tuple[str, bool]:
    """(text, is_chat) of a text record or a chat record rendered as ChatML; Unusable otherwise."""
    from xiaolm.tokenizer.chat import normalize_chat, render_chat

    text = record.get(text_field)
    if isinstance(text, str):
        if not text.strip():
            raise Unusable("empty_text")
        return text, False
    if "messages" in record or ("prompt" in record and "response" in record):
        try:
            return render_chat(normalize_chat(record)), True
        except ValueError as e:
            raise Unusable("bad_chat", str(e)) from None
    raise Unusable("missing_field", f"no string '{text_field}' and not a chat record")


class _Writer:
    """Appends documents to the split files, holding each split's last document back so neither ends empty."""

    def __init__(self, files: dict[str, BinaryIO]):
        self.files = files
        self.tokens = dict.fromkeys(SPLITS, 0)
        self.docs = dict.fromkeys(SPLITS, 0)
        self.held: dict[str, np.ndarray | None] = dict.fromkeys(SPLITS)

    def add(self, split: str, arr: np.ndarray) -> None:
        """Append one document (its ids, EOS included) to `split`."""
        if self.held[split] is not None:
            self._write(split, self.held[split])
        self.held[split] = arr

    def finish(self, want_val: bool) -> None:
        """Write the held documents, first moving one over if that gives an empty split a document."""
        def count(split: str) -> int:
            return self.docs[split] + (self.held[split] is not None)

        if want_val and count("val") == 0 and count("train") >= 2:
            self.held["val"], self.held["train"] = self.held["train"], None
        elif count("train") == 0 and count("val") >= 1:
            self.held["train"], self.held["val"] = self.held["val"], None
        for split in SPLITS:
            if self.held[split] is not None:
                self._write(split, self.held[split])
                self.held[split] = None

    def _write(self, split: str, arr: np.ndarray) -> None:
        arr.tofile(self.files[split])
        self.tokens[split] += len(arr)
        self.docs[split] += 1


def pack_files(inputs: Sequence[str | Path], tokenizer_dir: str | Path, out_dir: str | Path,
               val_fraction: float = 0.01, seed: int = 0, text_field: str = "text") -> dict:
    """Write train.bin, val.bin and meta.json under out_dir; each whole document goes to one split."""
    from tqdm.auto import tqdm

    from xiaolm.tokenizer.chat import EOS, IM_END, IM_START
    from xiaolm.tokenizer.train import load_tokenizer, tokenizer_hash

    if not 0 <= val_fraction < 1:
        raise XiaolmError(f"val_fraction={val_fraction} is out of range", where="val_fraction",
                          hint="use a fraction in [0, 1), e.g. 0.01")
    out_dir = Path(out_dir)
    tok_hash = tokenizer_hash(tokenizer_dir)
    files = stage_inputs(inputs, out_dir)
    settings = {"inputs": [str(i) for i in inputs], "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
                "val_fraction": val_fraction, "seed": seed, "text_field": text_field}
    config_text = yaml.safe_dump(settings, allow_unicode=True, sort_keys=False)
    fingerprint = inputs_fingerprint(files)
    done = out_dir / "_SUCCESS"
    meta = finished_stage(out_dir, config_text, fingerprint, "meta.json")
    if meta is not None and meta.get("tokenizer_hash") == tok_hash:
        log.info("data/pack: %s is up to date (same inputs, tokenizer and settings); skipping", out_dir)
        return meta
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    chat_encoder = tokenizer.backend_tokenizer
    # plain documents are encoded as text even where they spell out a special token such as <|im_end|>
    text_encoder = type(chat_encoder).from_str(chat_encoder.to_str())
    text_encoder.encode_special_tokens = True
    # encode_batch_fast skips offsets (tokenizers >= 0.20)
    encode_batch = {chat: getattr(enc, "encode_batch_fast", enc.encode_batch)
                    for chat, enc in ((False, text_encoder), (True, chat_encoder))}

    out_dir.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    start = time.perf_counter()
    with RejectLog(out_dir / "rejects.jsonl") as rejects, \
            atomic_open(out_dir / "train.bin", "wb") as ftrain, \
            atomic_open(out_dir / "val.bin", "wb") as fval, \
            tqdm(desc="data/pack", unit="doc", disable=None) as bar:
        writer = _Writer({"train": ftrain, "val": fval})
        pending: list[tuple[str, str, bool]] = []  # (split, text, is_chat)

        def flush() -> None:
            encoded: list = [None] * len(pending)
            for is_chat in (False, True):
                index = [i for i, (_, _, chat) in enumerate(pending) if chat == is_chat]
                if index:
                    texts = [pending[i][1] for i in index]
                    encodings = encode_batch[is_chat](texts, add_special_tokens=False)
                    for i, enc in zip(index, encodings, strict=True):
                        encoded[i] = enc.ids
            for (split, _, _), ids in zip(pending, encoded, strict=True):
                arr = np.empty(len(ids) + 1, dtype=dtype)
                arr[:-1] = ids
                arr[-1] = eos
                writer.add(split, arr)
            bar.update(len(pending))
            pending.clear()

        for record, where in read_records(files, rejects):
            try:
                text, is_chat = document_text(record, text_field)
            except Unusable as e:
                rejects.add(e.reason, where, record, e.detail)
                continue
            has_id = record.get("id") is not None
            key = str(record["id"]) if has_id else hashlib.sha1(text.encode("utf-8")).hexdigest()
            pending.append(("val" if is_val(key, seed, val_fraction) else "train", text, is_chat))
            if len(pending) >= BATCH:
                flush()
        flush()
        writer.finish(want_val=val_fraction > 0)
    if writer.docs["train"] == 0:
        raise XiaolmError("no documents to pack", where=", ".join(map(str, inputs)),
                          hint=f"records need '{text_field}' or chat fields; see {out_dir}/rejects.jsonl")
    meta = {"dtype": dtype.name, "vocab_size": vocab, "eos_id": eos, "pad_id": tokenizer.pad_token_id,
            "im_start_id": tokenizer.convert_tokens_to_ids(IM_START),
            "im_end_id": tokenizer.convert_tokens_to_ids(IM_END),
            "train_tokens": writer.tokens["train"], "val_tokens": writer.tokens["val"],
            "train_docs": writer.docs["train"], "val_docs": writer.docs["val"],
            "tokenizer_hash": tok_hash, "tokenizer_dir": settings["tokenizer_dir"],
            "records_in": writer.docs["train"] + writer.docs["val"] + rejects.total,
            "rejected": dict(rejects.counts.most_common()),
            "examples": dict(rejects.examples), "val_fraction": val_fraction, "seed": seed,
            "seconds": round(time.perf_counter() - start, 3), "inputs": fingerprint}
    atomic_write_json(out_dir / "meta.json", meta)
    atomic_write_text(out_dir / "config.yaml", config_text)
    atomic_write_text(done, "")
    log.info("data/pack: %d train tokens (%d docs), %d val tokens (%d docs), %d rejected (%s) — %s",
             meta["train_tokens"], meta["train_docs"], meta["val_tokens"], meta["val_docs"], rejects.total,
             rejects.summary(), out_dir)
    return meta


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a packed dir, with a clear error when it is not one."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise XiaolmError("not a packed data dir (no meta.json)", where=str(data_dir),
                          hint="create it with `xiaolm data pack`")
    return json.loads(path.read_text(encoding="utf-8"))


def load_tokens(data_dir: str | Path, split: str = "train") -> np.memmap:
    """The split's token array, memory-mapped read-only (an empty split gives an empty array)."""
    if split not in SPLITS:
        raise XiaolmError(f"unknown split '{split}'", hint="use 'train' or 'val'")
    meta = read_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise XiaolmError(f"missing {split}.bin", where=str(data_dir), hint="rerun `xiaolm data pack`")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise XiaolmError(f"{split}.bin size {size} is not a multiple of {dtype.itemsize} ({dtype.name})",
                          where=str(path), hint="the file is truncated; rerun `xiaolm data pack`")
    if size == 0:
        return np.empty(0, dtype=dtype).view(np.memmap)
    return np.memmap(path, dtype=dtype, mode="r")
