"""Tokenize records into flat token files (train.bin / val.bin, EOS between documents) + meta.json."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xiaolm.data.read import RejectLog, read_records
from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_write_json

log = logging.getLogger(__name__)

BATCH = 512


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _is_val(key: str, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def pack_files(inputs: Sequence[str | Path], tokenizer_dir: str | Path, out_dir: str | Path,
               val_fraction: float = 0.01, seed: int = 0, text_field: str = "text") -> dict:
    """Write train.bin, val.bin and meta.json under out_dir; whole documents go to one split."""
    from tqdm.auto import tqdm

    from xiaolm.tokenizer import IM_END, IM_START, load_tokenizer, normalize_chat, render_chat, tokenizer_hash

    out_dir = Path(out_dir)
    tok_hash = tokenizer_hash(tokenizer_dir)
    settings = {"inputs": [str(i) for i in inputs], "tokenizer_hash": tok_hash, "val_fraction": val_fraction,
                "seed": seed, "text_field": text_field}
    if (out_dir / "_SUCCESS").is_file():
        meta = read_meta(out_dir)
        if meta.get("settings") == settings:
            log.info("data/pack: %s is up to date; skipping", out_dir)
            return meta
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    eos = tokenizer.eos_token_id
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {"train": [0, 0], "val": [0, 0]}  # tokens, documents
    start = time.perf_counter()
    with RejectLog(tmp / "rejects.jsonl") as rejects, open(tmp / "train.bin", "wb") as ftrain, \
            open(tmp / "val.bin", "wb") as fval, tqdm(desc="pack", unit="doc") as bar:
        files = {"train": ftrain, "val": fval}
        pending: list[tuple[str, str]] = []

        def flush() -> None:
            encoded = tokenizer([t for _, t in pending], add_special_tokens=False)["input_ids"]
            for (split, _), ids in zip(pending, encoded, strict=False):
                arr = np.asarray(ids + [eos], dtype=dtype)
                arr.tofile(files[split])
                counts[split][0] += len(arr)
                counts[split][1] += 1
            bar.update(len(pending))
            pending.clear()

        for n, (record, where) in enumerate(read_records(inputs, rejects)):
            if isinstance(record.get(text_field), str):
                text = record[text_field]
            else:
                try:
                    text = render_chat(normalize_chat(record))
                except ValueError as e:
                    rejects.add(f"no '{text_field}' field and not a chat record ({e})", where, record)
                    continue
            if not text:
                rejects.add("empty text", where, record)
                continue
            key = str(record.get("id", where))
            split = "val" if n > 0 and _is_val(key, seed, val_fraction) else "train"
            pending.append((split, text))
            if len(pending) >= BATCH:
                flush()
        if pending:
            flush()
    if counts["train"][1] == 0:
        raise XiaolmError("no documents to pack", where=", ".join(map(str, inputs)),
                          hint=f"inputs need '{text_field}' or chat records; see {tmp / 'rejects.jsonl'}")
    if counts["val"][1] == 0:
        _move_last_doc_to_val(tmp, dtype, eos, counts)
    meta = {"dtype": dtype.name, "vocab_size": vocab, "eos_id": eos, "pad_id": tokenizer.pad_token_id,
            "im_start_id": tokenizer.convert_tokens_to_ids(IM_START),
            "im_end_id": tokenizer.convert_tokens_to_ids(IM_END),
            "train_tokens": counts["train"][0], "val_tokens": counts["val"][0],
            "train_docs": counts["train"][1], "val_docs": counts["val"][1], "rejected": rejects.total,
            "tokenizer_hash": tok_hash, "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
            "seconds": round(time.perf_counter() - start, 2), "settings": settings}
    atomic_write_json(tmp / "meta.json", meta)
    (tmp / "_SUCCESS").write_text("")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.info("data/pack: %d train tokens (%d docs), %d val tokens (%d docs), %d rejected — %s",
             meta["train_tokens"], meta["train_docs"], meta["val_tokens"], meta["val_docs"], rejects.total, out_dir)
    return meta


def _move_last_doc_to_val(d: Path, dtype: np.dtype, eos: int, counts: dict) -> None:
    train = np.fromfile(d / "train.bin", dtype=dtype)
    ends = np.flatnonzero(train == eos)
    cut = int(ends[-2]) + 1 if len(ends) >= 2 else 0
    train[cut:].tofile(d / "val.bin")
    train[:cut].tofile(d / "train.bin")
    counts["val"] = [len(train) - cut, 1]
    counts["train"] = [cut, counts["train"][1] - 1]


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a packed dir, with a clear error when it is not one."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise XiaolmError("not a packed data dir (no meta.json)", where=str(data_dir),
                          hint="create it with `xiaolm data pack`")
    return json.loads(path.read_text(encoding="utf-8"))


def load_tokens(data_dir: str | Path, split: str = "train") -> np.memmap:
    """The split's token array, memory-mapped read-only."""
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise XiaolmError(f"missing {split}.bin", where=str(data_dir), hint="rerun `xiaolm data pack`")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
