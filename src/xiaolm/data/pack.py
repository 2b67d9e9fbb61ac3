"""Tokenize records into flat token files (train.bin / val.bin, EOS after every document) + meta.json."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import yaml

from xiaolm.chat_format import EOS, IM_END, IM_START, load_tokenizer
from xiaolm.data.executor import in_worker, parallel_workers, run_tasks, work_dir
from xiaolm.data.stage import finish_stage, gather_rejects
from xiaolm.errors import Unusable, XiaolmError
from xiaolm.io import atomic_open
from xiaolm.records.inputs import finished_stage, inputs_fingerprint, stage_inputs
from xiaolm.records.read import read_records
from xiaolm.records.rejects import RejectLog, reject_summary
from xiaolm.records.text import record_text
from xiaolm.tokenizer.train import token_dtype, tokenizer_hash

log = logging.getLogger(__name__)

BATCH = 512
SPLITS = ("train", "val")


@dataclass
class PackConfig:
    """Settings of `xiaolm data pack`."""

    val_fraction: float = 0.01  # share of documents (whole ones) that go to val.bin
    seed: int = 0  # picks the validation documents
    text_field: str = "text"


def is_val(key: str, seed: int, fraction: float) -> bool:
    """Whether the document with this key goes to the validation split (a pure function of key and seed)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def _encoders(tokenizer_dir: str | Path) -> tuple[Any, dict[bool, Callable]]:
    """The tokenizer and its batch encoders for plain text (False) and ChatML-rendered chats (True)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    chat_encoder = tokenizer.backend_tokenizer
    # plain documents are encoded as text even where they spell out a special token such as <|im_end|>
    text_encoder = type(chat_encoder).from_str(chat_encoder.to_str())
    text_encoder.encode_special_tokens = True
    # encode_batch_fast skips offsets (tokenizers >= 0.20)
    return tokenizer, {chat: getattr(enc, "encode_batch_fast", enc.encode_batch)
                       for chat, enc in ((False, text_encoder), (True, chat_encoder))}


def pack_shard(out: Path, path: str, tokenizer_dir: str, val_fraction: float, seed: int, text_field: str) -> dict:
    """Tokenize one input file into out/train.bin and out/val.bin (+ rejects.jsonl); its counts for the merge."""
    from tqdm.auto import tqdm

    if in_worker():  # one process per core already: the tokenizer's own threads would only compete
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer, encode_batch = _encoders(tokenizer_dir)
    dtype = token_dtype(len(tokenizer))
    eos = tokenizer.convert_tokens_to_ids(EOS)
    tokens, docs, last = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    with RejectLog(out / "rejects.jsonl") as rejects, atomic_open(out / "train.bin", "wb") as ftrain, \
            atomic_open(out / "val.bin", "wb") as fval, \
            tqdm(desc="data/pack", unit="doc", disable=True if in_worker() else None) as bar:
        files = {"train": ftrain, "val": fval}
        pending: list[tuple[str, str, bool]] = []  # (split, text, is_chat)

        def flush() -> None:
            encoded: list = [None] * len(pending)
            for is_chat in (False, True):
                index = [i for i, (_, _, chat) in enumerate(pending) if chat == is_chat]
                if index:
                    encodings = encode_batch[is_chat]([pending[i][1] for i in index], add_special_tokens=False)
                    for i, enc in zip(index, encodings, strict=True):
                        encoded[i] = enc.ids
            for (split, _, _), ids in zip(pending, encoded, strict=True):
                arr = np.empty(len(ids) + 1, dtype=dtype)
                arr[:-1] = ids
                arr[-1] = eos
                arr.tofile(files[split])
                tokens[split] += len(arr)
                docs[split] += 1
                last[split] = len(arr)
            bar.update(len(pending))
            pending.clear()

        for record, where in read_records([path], rejects):
            try:
                text, is_chat = record_text(record, text_field, chat="chatml", allow_empty=False)
            except Unusable as e:
                rejects.add(e.reason, where, record, e.detail)
                continue
            has_id = record.get("id") is not None
            key = str(record["id"]) if has_id else hashlib.sha1(text.encode("utf-8")).hexdigest()
            pending.append(("val" if is_val(key, seed, val_fraction) else "train", text, is_chat))
            if len(pending) >= BATCH:
                flush()
        flush()
    return {"tokens": tokens, "docs": docs, "last_doc_tokens": last, "rejected": dict(rejects.counts),
            "examples": dict(rejects.examples), "bytes": Path(path).stat().st_size}


def _merge(shard_dirs: list[Path], shards: list[dict], out_dir: Path, want_val: bool, itemsize: int
           ) -> tuple[dict[str, int], dict[str, int]]:
    """Concatenate the shards' split files in input order into out_dir; (tokens, docs) per split.

    Neither split ends empty when it can be avoided: with no validation document (and ≥ 2 training ones) the last
    training document moves to val.bin; with no training document the last validation one moves to train.bin.
    """
    tokens = {s: sum(sh["tokens"][s] for sh in shards) for s in SPLITS}
    docs = {s: sum(sh["docs"][s] for sh in shards) for s in SPLITS}
    move = None
    if want_val and docs["val"] == 0 and docs["train"] >= 2:
        move = ("train", "val")
    elif docs["train"] == 0 and docs["val"] >= 1:
        move = ("val", "train")
    cut = {s: (-1, 0) for s in SPLITS}  # (shard index, bytes) cut off the end of that shard's split file
    if move is not None:
        src, dst = move
        k = max(i for i, sh in enumerate(shards) if sh["docs"][src])
        n = shards[k]["last_doc_tokens"][src]
        cut[src] = (k, n * itemsize)
        tokens[src], tokens[dst], docs[src], docs[dst] = tokens[src] - n, tokens[dst] + n, docs[src] - 1, docs[dst] + 1
    for split in SPLITS:
        with atomic_open(out_dir / f"{split}.bin", "wb") as dst_file:
            for i, d in enumerate(shard_dirs):
                path = d / f"{split}.bin"
                keep = path.stat().st_size - (cut[split][1] if cut[split][0] == i else 0)
                with open(path, "rb") as f:
                    _copy(f, dst_file, keep)
            if move is not None and move[1] == split:  # the moved document goes last
                k, size = cut[move[0]]
                with open(shard_dirs[k] / f"{move[0]}.bin", "rb") as f:
                    f.seek(-size, 2)
                    _copy(f, dst_file, size)
    return tokens, docs


def _copy(src: BinaryIO, dst: BinaryIO, size: int) -> None:
    while size > 0:
        chunk = src.read(min(size, 1 << 20))
        if not chunk:
            raise OSError(f"{src.name} ended {size} bytes early")
        dst.write(chunk)
        size -= len(chunk)


def pack_files(inputs: Sequence[str | Path], tokenizer_dir: str | Path, out_dir: str | Path,
               val_fraction: float = 0.01, seed: int = 0, text_field: str = "text", executor: str = "local",
               workers: int = 0) -> dict:
    """Write train.bin, val.bin and meta.json under out_dir; each whole document goes to one split.

    Input files are tokenized in parallel (`workers` processes, or Ray) into per-file token files, then
    concatenated in input order: the result does not depend on the number of processes, and a rerun after an
    interruption reuses the files already tokenized.
    """
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
    meta = finished_stage(out_dir, config_text, fingerprint, "meta.json")
    if meta is not None and meta.get("tokenizer_hash") == tok_hash:
        log.info("data/pack: %s is up to date (same inputs, tokenizer and settings); skipping", out_dir)
        return meta
    tokenizer, _ = _encoders(tokenizer_dir)
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    start = time.perf_counter()
    work = work_dir(out_dir, config_text + tok_hash, fingerprint, outputs=["train.bin", "val.bin"])
    names = [f"{i:05d}" for i in range(len(files))]
    shards = run_tasks(pack_shard, [(n, (str(f), settings["tokenizer_dir"], val_fraction, seed, text_field))
                                    for n, f in zip(names, files, strict=True)],
                       work / "pack", executor, workers, desc="data/pack")
    shard_dirs = [work / "pack" / n for n in names]
    tokens, docs = _merge(shard_dirs, shards, out_dir, val_fraction > 0, dtype.itemsize)
    rejected, examples = gather_rejects(out_dir, shard_dirs, shards)
    if docs["train"] == 0:
        raise XiaolmError("no documents to pack", where=", ".join(map(str, inputs)),
                          hint=f"records need '{text_field}' or chat fields; see {out_dir}/rejects.jsonl")
    seconds = time.perf_counter() - start
    meta = {"dtype": dtype.name, "vocab_size": vocab, "eos_id": tokenizer.convert_tokens_to_ids(EOS),
            "pad_id": tokenizer.pad_token_id, "im_start_id": tokenizer.convert_tokens_to_ids(IM_START),
            "im_end_id": tokenizer.convert_tokens_to_ids(IM_END),
            "train_tokens": tokens["train"], "val_tokens": tokens["val"],
            "train_docs": docs["train"], "val_docs": docs["val"],
            "tokenizer_hash": tok_hash, "tokenizer_dir": settings["tokenizer_dir"],
            "records_in": docs["train"] + docs["val"] + sum(rejected.values()),
            "rejected": dict(rejected.most_common()), "examples": examples, "val_fraction": val_fraction,
            "seed": seed, "shards": len(files), "executor": executor, "workers": parallel_workers(workers),
            "input_mb": round(sum(sh["bytes"] for sh in shards) / 1e6, 3), "seconds": round(seconds, 3),
            "inputs": fingerprint}
    finish_stage(out_dir, work, config_text, meta, record="meta.json")
    log.info("data/pack: %d train tokens (%d docs), %d val tokens (%d docs), %d rejected (%s) in %.1f s — %s",
             meta["train_tokens"], meta["train_docs"], meta["val_tokens"], meta["val_docs"], sum(rejected.values()),
             reject_summary(rejected), seconds, out_dir)
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
