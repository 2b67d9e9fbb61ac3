"""The README's walk-through from public downloads to token files, run through the CLI on the recipe fixtures."""

import json
from pathlib import Path

import numpy as np

from xiaolm.cli import run
from xiaolm.data.pack import load_tokens, read_meta

SOURCES = Path(__file__).parent / "fixtures" / "sources"


def report(path: Path) -> dict:
    return json.loads((path / "report.json").read_text(encoding="utf-8"))


def xiaolm(argv: list[str]) -> None:
    assert run(argv) == 0, argv


def test_public_downloads_to_token_files(tmp_path):
    data = tmp_path / "data"
    xiaolm(["data", "import", "belle", str(SOURCES / "belle" / "Belle_open_source_0.5M.json"), "--out",
          str(data / "raw" / "belle")])
    xiaolm(["data", "import", "zhwiki", str(SOURCES / "zhwiki" / "extracted"), "--out", str(data / "raw" / "zhwiki")])
    xiaolm(["data", "import", "skypile", str(SOURCES / "skypile" / "2020-40_zh_head_0000.jsonl"), "--out",
          str(data / "raw" / "skypile")])
    xiaolm(["data", "clean", str(data / "raw" / "zhwiki"), str(data / "raw" / "skypile"), "--out",
          str(data / "clean" / "text"), "--workers", "2"])
    xiaolm(["data", "clean", str(data / "raw" / "belle"), "--out", str(data / "clean" / "chat"), "min_answer_chars=2",
          "--workers", "1"])
    xiaolm(["data", "dedup", str(data / "clean" / "text"), "--out", str(data / "dedup" / "text"), "--workers", "2"])
    xiaolm(["data", "dedup", str(data / "clean" / "chat"), "--out", str(data / "dedup" / "chat"), "--threshold", "0.9",
          "--workers", "1"])
    xiaolm(["tokenizer", "train", str(data / "dedup" / "text"), "--out", str(tmp_path / "tok"), "--vocab-size", "300",
          "--max-memory", "256MB"])
    xiaolm(["data", "pack", str(data / "dedup" / "text"), "--tokenizer", str(tmp_path / "tok"), "--out",
          str(data / "packed"), "--workers", "2"])

    text = report(data / "clean" / "text")
    imported = [report(data / "raw" / name) for name in ("zhwiki", "skypile")]
    assert len(imported[0]["shards"]) == 2  # one shard (at least) per input file: zhwiki's AA/ and AB/
    assert text["shards"] == sum(len(r["shards"]) for r in imported) and text["records_out"] > 0
    assert text["records_in"] == report(data / "raw" / "zhwiki")["records_written"] + \
        report(data / "raw" / "skypile")["records_written"]
    assert report(data / "dedup" / "text")["records_in"] == text["records_out"]
    chats = [json.loads(line) for p in sorted((data / "dedup" / "chat").glob("part-*.jsonl"))
             for line in p.read_text(encoding="utf-8").splitlines()]
    assert chats and all(m["role"] in ("user", "assistant") for c in chats for m in c["messages"])
    meta = read_meta(data / "packed")
    kept = report(data / "dedup" / "text")["records_out"]
    assert meta["train_docs"] + meta["val_docs"] == kept and meta["vocab_size"] == 300
    tokens = np.concatenate([load_tokens(data / "packed", "train"), load_tokens(data / "packed", "val")])
    assert int((tokens == meta["eos_id"]).sum()) == kept and tokens.max() < 300
