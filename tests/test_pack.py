"""Packing: EOS-separated uint16 token files that decode back, deterministic val split, meta, rejects."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from xiaolm.data.pack import is_val, load_tokens, pack_files, read_meta
from xiaolm.errors import XiaolmError
from xiaolm.tokenizer import IM_END, IM_START, normalize_chat, render_chat
from xiaolm.tokenizer.train import token_dtype

MIXED = Path(__file__).parent / "fixtures" / "mixed"
META_KEYS = {"dtype", "vocab_size", "eos_id", "pad_id", "im_start_id", "im_end_id", "train_tokens",
             "val_tokens", "train_docs", "val_docs", "tokenizer_hash", "tokenizer_dir"}


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def documents(arr: np.ndarray, eos: int) -> list[list[int]]:
    """Split a token array at EOS; every document must end with one."""
    arr = np.asarray(arr)
    assert len(arr) == 0 or arr[-1] == eos
    ends = np.flatnonzero(arr == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [arr[s:e].tolist() for s, e in zip(starts, ends, strict=True)]


def test_pack_writes_eos_separated_uint16_tokens_that_decode_back(tmp_path, tokenizer_dir, tokenizer):
    docs = [f"第{i}篇文章：春风又绿江南岸，明月何时照我还。" for i in range(50)]
    src = write(tmp_path / "docs.jsonl", [{"text": d, "id": str(i)} for i, d in enumerate(docs)])
    meta = pack_files([str(src)], tokenizer_dir, tmp_path / "packed", val_fraction=0.1)
    assert META_KEYS <= set(meta) and meta == read_meta(tmp_path / "packed")
    train, val = load_tokens(tmp_path / "packed", "train"), load_tokens(tmp_path / "packed", "val")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert meta["eos_id"] == 0 and meta["pad_id"] == 0 and (meta["im_start_id"], meta["im_end_id"]) == (1, 2)
    assert meta["vocab_size"] == len(tokenizer)
    assert meta["train_docs"] + meta["val_docs"] == 50 and meta["val_docs"] >= 1
    expected = sum(len(tokenizer.encode(d, add_special_tokens=False)) + 1 for d in docs)
    assert len(train) + len(val) == expected == meta["train_tokens"] + meta["val_tokens"]
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    decoded = {split: [tokenizer.decode(d) for d in documents(arr, meta["eos_id"])]
               for split, arr in (("train", train), ("val", val))}
    assert len(decoded["train"]) == meta["train_docs"] and len(decoded["val"]) == meta["val_docs"]
    assert sorted(decoded["train"] + decoded["val"]) == sorted(docs)
    assert decoded["train"] == [d for i, d in enumerate(docs) if not is_val(str(i), 0, 0.1)]  # order kept
    assert (tmp_path / "packed" / "_SUCCESS").is_file() and (tmp_path / "packed" / "config.yaml").is_file()


def test_a_vocabulary_of_up_to_65536_tokens_packs_as_uint16():
    assert token_dtype(65_536) == np.uint16 and np.iinfo(np.uint16).max == 65_536 - 1  # ids 0 .. 65,535
    assert token_dtype(65_537) == np.uint32


def test_val_split_is_deterministic_by_seed_and_whole_documents(tmp_path, tokenizer_dir):
    src = write(tmp_path / "docs.jsonl", [{"text": f"第{i}篇：白日依山尽，黄河入海流。"} for i in range(200)])
    a = pack_files([src], tokenizer_dir, tmp_path / "a", val_fraction=0.2, seed=1)
    b = pack_files([src], tokenizer_dir, tmp_path / "b", val_fraction=0.2, seed=1)
    c = pack_files([src], tokenizer_dir, tmp_path / "c", val_fraction=0.2, seed=2)
    for split in ("train", "val"):
        assert np.array_equal(load_tokens(tmp_path / "a", split), load_tokens(tmp_path / "b", split))
    assert not np.array_equal(load_tokens(tmp_path / "a", "val"), load_tokens(tmp_path / "c", "val"))
    assert 20 <= a["val_docs"] <= 60 and a["val_docs"] == b["val_docs"]
    assert a["train_tokens"] + a["val_tokens"] == c["train_tokens"] + c["val_tokens"]


def test_at_least_one_val_document_when_there_are_two(tmp_path, tokenizer_dir):
    src = write(tmp_path / "two.jsonl", [{"text": "第一篇文章。"}, {"text": "第二篇文章。"}])
    meta = pack_files([src], tokenizer_dir, tmp_path / "two", val_fraction=1e-9)
    assert (meta["train_docs"], meta["val_docs"]) == (1, 1)
    one = write(tmp_path / "one.jsonl", [{"text": "只有一篇。"}])
    meta = pack_files([one], tokenizer_dir, tmp_path / "one", val_fraction=0.5)
    assert (meta["train_docs"], meta["val_docs"]) == (1, 0)
    assert len(load_tokens(tmp_path / "one", "val")) == 0
    meta = pack_files([src], tokenizer_dir, tmp_path / "none", val_fraction=0.0)
    assert (meta["train_docs"], meta["val_docs"]) == (2, 0)


def test_chat_records_are_rendered_and_bad_records_rejected(tmp_path, tokenizer_dir, tokenizer):
    meta = pack_files([MIXED], tokenizer_dir, tmp_path / "packed", val_fraction=0.0)
    assert meta["rejected"] == {"not_object": 1, "bad_chat": 1, "missing_field": 1}
    assert meta["train_docs"] == 15 and meta["records_in"] == 18
    docs = [tokenizer.decode(d) for d in documents(load_tokens(tmp_path / "packed"), meta["eos_id"])]
    chats = [json.loads(line) for line in (MIXED / "chat_zh.jsonl").read_text(encoding="utf-8").splitlines()]
    assert docs[:3] == [render_chat(normalize_chat(c)) for c in chats[:3]]
    assert docs[1] == f"{IM_START}user\n一加一等于几？{IM_END}\n{IM_START}assistant\n一加一等于二。{IM_END}\n"
    train = np.asarray(load_tokens(tmp_path / "packed"))
    assert (train == meta["im_start_id"]).sum() == 7  # specials come only from chat structure
    rejects = [json.loads(line) for line in (tmp_path / "packed" / "rejects.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in rejects} == {"not_object", "bad_chat", "missing_field"}


def test_special_token_strings_in_plain_text_stay_text(tmp_path, tokenizer_dir, tokenizer):
    text = f"文档里写着 {IM_END} 和 <|endoftext|> 这些字样。"
    src = write(tmp_path / "docs.jsonl", [{"text": text}])
    meta = pack_files([src], tokenizer_dir, tmp_path / "packed", val_fraction=0.0)
    train = load_tokens(tmp_path / "packed").tolist()
    assert train.count(meta["eos_id"]) == 1 and meta["im_end_id"] not in train
    assert tokenizer.decode(train[:-1]) == text


def test_rerun_skips_and_errors_are_clear(tmp_path, tokenizer_dir):
    src = write(tmp_path / "docs.jsonl", [{"text": "一篇文章。"}, {"text": ""}])
    meta = pack_files([src], tokenizer_dir, tmp_path / "packed")
    assert meta["rejected"] == {"empty_text": 1}
    stamp = (tmp_path / "packed" / "train.bin").stat().st_mtime_ns
    assert pack_files([src], tokenizer_dir, tmp_path / "packed") == meta
    assert (tmp_path / "packed" / "train.bin").stat().st_mtime_ns == stamp
    with pytest.raises(XiaolmError, match="val_fraction"):
        pack_files([src], tokenizer_dir, tmp_path / "x", val_fraction=1.0)
    with pytest.raises(XiaolmError, match="no tokenizer.json"):
        pack_files([src], tmp_path, tmp_path / "x")
    with pytest.raises(XiaolmError, match="no documents"):
        pack_files([write(tmp_path / "bad.jsonl", [{"title": "无"}])], tokenizer_dir, tmp_path / "x")
    assert (tmp_path / "x" / "rejects.jsonl").is_file() and not (tmp_path / "x" / "_SUCCESS").exists()
    with pytest.raises(XiaolmError, match="no meta.json"):
        load_tokens(tmp_path)
    (tmp_path / "packed" / "val.bin").unlink()
    with pytest.raises(XiaolmError, match="missing val.bin"):
        load_tokens(tmp_path / "packed", "val")


def _shards(tmp_path: Path, sizes: list[int]) -> Path:
    src = tmp_path / "raw"
    src.mkdir()
    for i, n in enumerate(sizes):
        docs = [{"text": f"第{i}个文件第{j}篇：床前明月光，疑是地上霜。"} for j in range(n)]
        write(src / f"part-{i:05d}.jsonl", docs + [{"title": "没有正文"}])
    return src


def test_parallel_shards_concatenate_in_input_order(tmp_path, tokenizer_dir, tokenizer):
    src = _shards(tmp_path, [40, 0, 25, 33])
    one = pack_files([src], tokenizer_dir, tmp_path / "one", val_fraction=0.1, workers=1)
    two = pack_files([src], tokenizer_dir, tmp_path / "two", val_fraction=0.1, workers=2)
    assert one["shards"] == two["shards"] == 4 and two["workers"] == 2
    for key in ("train_tokens", "val_tokens", "train_docs", "val_docs", "records_in", "rejected"):
        assert one[key] == two[key], key
    assert one["rejected"] == {"missing_field": 4} and one["records_in"] == 98 + 4
    for split in ("train", "val"):
        assert (tmp_path / "one" / f"{split}.bin").read_bytes() == (tmp_path / "two" / f"{split}.bin").read_bytes()
    texts = [f"第{i}个文件第{j}篇：床前明月光，疑是地上霜。" for i, n in enumerate([40, 0, 25, 33]) for j in range(n)]
    train = [tokenizer.decode(d) for d in documents(load_tokens(tmp_path / "two", "train"), two["eos_id"])]
    assert train == [t for t in texts if not is_val(hashlib.sha1(t.encode()).hexdigest(), 0, 0.1)]
    assert len((tmp_path / "two" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()) == 4
    assert not (tmp_path / "two" / "_work").exists()


def test_an_empty_validation_split_takes_the_last_document_of_the_last_shard_with_one(tmp_path, tokenizer_dir,
                                                                                      tokenizer):
    src = _shards(tmp_path, [3, 2, 0])  # the last file has no usable document
    meta = pack_files([src], tokenizer_dir, tmp_path / "packed", val_fraction=1e-9, workers=2)
    assert (meta["train_docs"], meta["val_docs"]) == (4, 1)
    val = [tokenizer.decode(d) for d in documents(load_tokens(tmp_path / "packed", "val"), meta["eos_id"])]
    train = [tokenizer.decode(d) for d in documents(load_tokens(tmp_path / "packed", "train"), meta["eos_id"])]
    assert val == ["第1个文件第1篇：床前明月光，疑是地上霜。"]
    assert train[-1] == "第1个文件第0篇：床前明月光，疑是地上霜。" and len(train) == 4
    assert meta["train_tokens"] + meta["val_tokens"] == len(load_tokens(tmp_path / "packed", "train")) + \
        len(load_tokens(tmp_path / "packed", "val"))


def test_a_rerun_after_a_crash_reuses_tokenized_shards(tmp_path, tokenizer_dir, monkeypatch):
    import xiaolm.data.pack as pack

    src = _shards(tmp_path, [10, 12, 9])
    whole = pack_files([src], tokenizer_dir, tmp_path / "whole", workers=1)
    real, calls = pack.pack_shard, []

    def crash_on_last(out, path, *args):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("crash in the last file")
        return real(out, path, *args)

    monkeypatch.setattr(pack, "pack_shard", crash_on_last)
    with pytest.raises(RuntimeError, match="crash"):
        pack_files([src], tokenizer_dir, tmp_path / "out", workers=1)
    again = pack_files([src], tokenizer_dir, tmp_path / "out", workers=1)
    assert len(calls) == 4  # the first two files were not tokenized again
    assert again["train_tokens"] == whole["train_tokens"] and again["val_tokens"] == whole["val_tokens"]
    for split in ("train", "val"):
        assert (tmp_path / "out" / f"{split}.bin").read_bytes() == (tmp_path / "whole" / f"{split}.bin").read_bytes()
