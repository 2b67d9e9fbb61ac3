"""Streaming pretraining data: windows cover the documents, the shuffle buffer is bounded, resume is exact."""

import json

import numpy as np
import pytest
import torch

from xiaolm.data.stream import TokenStream, validation_windows
from xiaolm.errors import XiaolmError
from xiaolm.tokenizer import load_tokenizer


def write_docs(path, n=60, start=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(start, start + n):
            text = f"第{i}篇文章。" + "春眠不觉晓，处处闻啼鸟。" * (1 + i % 3)
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def test_unshuffled_windows_are_the_documents_joined_by_eos(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    write_docs(tmp_path / "d" / "a.jsonl", 20)
    stream = TokenStream([tmp_path / "d"], tok, seq_len=15, buffer_size=1)
    expected = []
    for line in (tmp_path / "d" / "a.jsonl").read_text(encoding="utf-8").splitlines():
        expected += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [stream.eos]
    got = np.concatenate([next(stream) for _ in range(len(expected) // 16)])
    assert got.tolist() == expected[: len(got)]


def test_shuffle_buffer_mixes_windows_and_holds_at_most_its_size(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    write_docs(tmp_path / "a.jsonl", 200)
    plain = TokenStream([tmp_path / "a.jsonl"], tok, seq_len=15, buffer_size=1)
    mixed = TokenStream([tmp_path / "a.jsonl"], tok, seq_len=15, buffer_size=32, seed=3)
    a = [tuple(next(plain)) for _ in range(100)]
    b = [tuple(next(mixed)) for _ in range(100)]
    assert a != b and len(set(a) & set(b)) > 50  # same material, another order
    assert len(mixed.buffer) == 32


def test_state_dict_resumes_with_exactly_the_next_windows(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    write_docs(tmp_path / "a.jsonl", 50)
    write_docs(tmp_path / "b.jsonl", 50, start=50)

    def fresh():
        return TokenStream([tmp_path], tok, seq_len=15, buffer_size=16, seed=1)

    whole = fresh()
    expected = [next(whole) for _ in range(400)]  # more than one epoch of these files
    first = fresh()
    head = [next(first) for _ in range(137)]
    state = first.state_dict()
    torch.save(state, tmp_path / "s.pt")
    resumed = fresh()
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    tail = [next(resumed) for _ in range(263)]
    assert all(np.array_equal(x, y) for x, y in zip(head + tail, expected, strict=True))
    assert resumed.epoch >= 1


def test_processes_read_disjoint_records_and_refuse_another_process_count(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    write_docs(tmp_path / "a.jsonl", 40)
    ranks = [TokenStream([tmp_path], tok, seq_len=15, rank=r, world=2) for r in range(2)]
    texts = [[t for batch, _ in s._batches(lambda r: r["text"], skip=0) for t in batch] for s in ranks]
    assert len(texts[0]) == len(texts[1]) == 20 and not set(texts[0]) & set(texts[1])
    one = TokenStream([tmp_path], tok, seq_len=15)
    with pytest.raises(XiaolmError, match="same number of processes"):
        one.load_state_dict(ranks[1].state_dict())


def write_with_bad_lines(path, n=700):
    """Documents with an invalid JSON line, a record without text and a malformed chat every 100 lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"第{i}篇。" + "白日依山尽。" * (1 + i % 2)}, ensure_ascii=False) + "\n")
            if i % 100 == 50:
                f.write('{"text": "没有结尾\n')
                f.write(json.dumps({"title": f"无正文{i}"}, ensure_ascii=False) + "\n")
                f.write(json.dumps({"messages": [{"role": "robot", "content": "坏"}]}, ensure_ascii=False) + "\n")
    return path


def test_unusable_records_of_the_first_pass_go_to_rejects_once_across_a_resume(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    write_with_bad_lines(tmp_path / "d" / "a.jsonl")

    def fresh(name, rank=0, world=1):
        return TokenStream([tmp_path / "d"], tok, seq_len=15, buffer_size=4, seed=1, rank=rank, world=world,
                           rejects=tmp_path / name)

    whole = fresh("whole.jsonl")
    for _ in range(2000):  # past the end of the first pass
        next(whole)
    assert whole.epoch >= 1
    assert dict(whole.rejects.counts) == {"bad_json": 7, "missing_field": 7, "bad_chat": 7}
    lines = (tmp_path / "whole.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 21 and json.loads(lines[0])["where"].endswith("a.jsonl:52")

    cut = fresh("cut.jsonl")
    for _ in range(300):
        next(cut)
    state = cut.state_dict()
    assert 0 < state["records_done"] < 700 and 0 < state["rejects_bytes"]
    for _ in range(300):  # rejects logged after the checkpoint, then the process dies
        next(cut)
    cut.rejects.close()
    assert (tmp_path / "cut.jsonl").stat().st_size > state["rejects_bytes"]
    resumed = fresh("cut.jsonl")
    resumed.load_state_dict(state)
    for _ in range(2000):
        next(resumed)
    assert (tmp_path / "cut.jsonl").read_text(encoding="utf-8").splitlines() == lines
    assert resumed.rejects.counts == whole.rejects.counts

    ranks = [fresh(f"rank{r}.jsonl", rank=r, world=2) for r in range(2)]
    for stream in ranks:
        for _ in range(2000):
            next(stream)
    per_rank = [[json.loads(x) for x in (tmp_path / f"rank{r}.jsonl").read_text(encoding="utf-8").splitlines()]
                for r in range(2)]
    assert {x["reason"] for x in per_rank[1]} <= {"missing_field", "bad_chat"}  # unreadable lines: rank 0 only
    assert sorted(x["where"] for x in per_rank[0] + per_rank[1]) == sorted(json.loads(x)["where"] for x in lines)


def test_validation_windows_are_one_pass_and_too_little_text_is_refused(tmp_path, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    write_docs(tmp_path / "v.jsonl", 10)
    windows = validation_windows([tmp_path / "v.jsonl"], tok, seq_len=15, limit=1000)
    assert 1 <= len(windows) < 1000 and windows.shape[1] == 16
    (tmp_path / "tiny.jsonl").write_text('{"text": "短"}\n', encoding="utf-8")
    with pytest.raises(XiaolmError, match="less than one window"):
        validation_windows([tmp_path / "tiny.jsonl"], tok, seq_len=15, limit=10)


def run_cut_and_resumed(tmp_path, tokenizer_dir, run, seq_len, stream=False) -> None:
    """Train 8 steps, and again as if killed after step 4 then resumed: same losses; no val_path is refused."""
    import shutil

    from tests.test_train_loop import losses
    from xiaolm.model.llama import LlamaConfig
    from xiaolm.train.config import DataConfig, TrainConfig

    def cfg(out):
        return TrainConfig(out=str(tmp_path / out), max_steps=8, batch_size=4, lr=3e-3, warmup_steps=2,
                           log_every=1, eval_every=4, eval_batches=2, save_every=4, device="cpu", dtype="fp32",
                           model=LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=seq_len),
                           data=DataConfig(path=str(tmp_path / "train"), val_path=str(tmp_path / "val.jsonl"),
                                           tokenizer=str(tokenizer_dir), seq_len=seq_len, shuffle_buffer=8,
                                           stream=stream))

    run(cfg("full"))
    run(cfg("cut"))
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-8")  # as if killed after step 4
    (tmp_path / "cut" / "done.json").unlink()
    run(cfg("cut"), resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    with pytest.raises(XiaolmError, match="data.val_path"):
        bad = cfg("x")
        bad.data.val_path = ""
        run(bad)


def test_pretraining_streams_from_records_and_resumes_bitwise(tmp_path, tiny_tokenizer_dir):
    from xiaolm.train.pretrain import run_pretrain

    write_docs(tmp_path / "train" / "a.jsonl", 80)
    write_docs(tmp_path / "val.jsonl", 10, start=500)
    run_cut_and_resumed(tmp_path, tiny_tokenizer_dir, run_pretrain, seq_len=32)


def write_chats(path, n, start=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(start, start + n):
            chat = {"messages": [{"role": "user", "content": f"第{i}个问题是什么？"},
                                 {"role": "assistant", "content": f"答案是{i}。" + "好的。" * (i % 3)}]}
            f.write(json.dumps(chat, ensure_ascii=False) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "没有回答"}]}, ensure_ascii=False) + "\n")
    return path


def test_chat_stream_yields_every_chat_once_per_epoch_and_resumes_exactly(tmp_path, tiny_tokenizer_dir):
    from xiaolm.data.stream import ChatStream
    from xiaolm.tokenizer.chat import encode_example

    tok = load_tokenizer(tiny_tokenizer_dir)
    write_chats(tmp_path / "c.jsonl", 300)
    records = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines()[:300]]
    expected = sorted(tuple(encode_example(tok, r, 64)[0]) for r in records)

    def fresh():
        return ChatStream([tmp_path / "c.jsonl"], tok, seq_len=64, buffer_size=16, seed=2,
                          rejects=tmp_path / "rejects.jsonl")

    whole = fresh()
    first_epoch = [next(whole) for _ in range(300 - 16)] + list(whole.buffer)  # the buffer holds the rest
    assert sorted(tuple(ids) for ids, _ in first_epoch) == expected
    assert all(ids.dtype == np.int32 and len(ids) == len(labels) for ids, labels in first_epoch)
    head_stream = fresh()
    head = [next(head_stream) for _ in range(100)]
    torch.save(head_stream.state_dict(), tmp_path / "s.pt")
    resumed = fresh()
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    again = fresh()
    full = [next(again) for _ in range(500)]
    tail = [next(resumed) for _ in range(400)]
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(head + tail, full,
                                                                                           strict=True))
    assert dict(again.rejects.counts) == {"no_assistant_tokens": 1}


def test_sft_streams_chats_and_resumes_bitwise(tmp_path, tiny_tokenizer_dir):
    from xiaolm.train.sft import run_sft

    write_chats(tmp_path / "train" / "a.jsonl", 120)
    write_chats(tmp_path / "val.jsonl", 10, start=500)
    run_cut_and_resumed(tmp_path, tiny_tokenizer_dir, run_sft, seq_len=64, stream=True)
    rejected = [json.loads(x) for x in (tmp_path / "full" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["reason"] for r in rejected] == ["no_assistant_tokens"] and rejected[0]["where"].endswith("a.jsonl:121")


def test_pretraining_streams_parquet_and_reports_rejects_before_the_first_pass_ends(tmp_path, tiny_tokenizer_dir,
                                                                                   caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xiaolm.model.llama import LlamaConfig
    from xiaolm.train.config import DataConfig, TrainConfig
    from xiaolm.train.pretrain import run_pretrain

    texts = [f"第{i}篇文章。" + "春眠不觉晓，处处闻啼鸟。" * 3 if i % 50 else None for i in range(2000)]
    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"text": texts}), tmp_path / "train" / "a.parquet", row_group_size=300)
    write_docs(tmp_path / "val.jsonl", 10, start=500)
    cfg = TrainConfig(out=str(tmp_path / "run"), max_steps=3, batch_size=2, lr=3e-3, warmup_steps=1, log_every=1,
                      eval_every=3, eval_batches=1, save_every=3, device="cpu", dtype="fp32",
                      model=LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=32),
                      data=DataConfig(path=str(tmp_path / "train"), val_path=str(tmp_path / "val.jsonl"),
                                      tokenizer=str(tiny_tokenizer_dir), seq_len=32, shuffle_buffer=8))
    caplog.set_level("WARNING")
    run_pretrain(cfg)
    rejected = [json.loads(x) for x in (tmp_path / "run" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rejected and rejected[0]["where"] == f"{tmp_path / 'train' / 'a.parquet'}:row 1"
    assert len(rejected) < 40  # 3 steps read a part of the 2,000 rows
    assert f"{len(rejected)} records skipped so far (the first pass did not end)" in caplog.text
