"""`xiaolm finetune` for triplet extraction: the answer format round-trips, F1 counts exact triplets, chat rows
come in the stated share, bad records are rejected by line, and the run picks best/ by val_f1, resumes bitwise
and reports chat ability before and after."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from xiaolm.data.demo.later_stages import extraction_records
from xiaolm.data.demo.templates import QUESTIONS
from xiaolm.data.demo.world import generate_world
from xiaolm.errors import XiaolmError
from xiaolm.eval.extraction import check_triplets, extraction_chat, format_triplets, parse_triplets, triplet_scores
from xiaolm.eval.perplexity import answer_perplexity
from xiaolm.model.export import load_model
from xiaolm.model.llama import LlamaConfig
from xiaolm.records.rejects import RejectLog
from xiaolm.train.config import DataConfig, FinetuneSettings, TrainConfig
from xiaolm.train.finetune import FinetuneObjective, load_extraction, run_finetune
from xiaolm.train.stage import build_model

BAD = [  # (line, reason)
    ({"text": "北州有一条河。", "triplets": [["北州", "河流"]]}, "bad_triplets"),
    ({"text": "北州有一条河。", "triplets": [["北州", "河流", 3]]}, "bad_triplets"),
    ({"text": "北州有一条河。", "triplets": "北州, 河流, 明月河"}, "bad_triplets"),
    ({"text": "", "triplets": [["北州", "河流", "明月河"]]}, "missing_text"),
    ({"triplets": [["北州", "河流", "明月河"]]}, "missing_text"),
    ({"text": "北州有一条河。" * 40, "triplets": [["北州", "河流", "明月河"]]}, "too_long"),
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def demo_data(tmp: Path, n_train: int, n_val: int, seed: int = 0) -> dict[str, Path]:
    """Demo extraction records (train with BAD appended, val), chats and held-out chat items from the same world."""
    world = generate_world(seed)
    records = extraction_records(world, random.Random(seed), n_train + n_val)
    facts = world.facts()
    chats = [{"messages": [{"role": "user", "content": QUESTIONS[r][0][0].format(s=s)},
                           {"role": "assistant", "content": QUESTIONS[r][1].format(s=s, o=o)}]} for s, r, o in facts]
    items = [{"messages": c["messages"][:1], "answer": c["messages"][1]["content"]} for c in chats[:8]]
    return {"train": write_jsonl(tmp / "extraction.jsonl", records[:n_train] + [r for r, _ in BAD]),
            "val": write_jsonl(tmp / "extraction_val.jsonl", records[n_train:]),
            "chats": write_jsonl(tmp / "chats.jsonl", chats), "chat_val": write_jsonl(tmp / "chat_val.jsonl", items)}


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory) -> Path:
    """One token per CJK character, trained on the demo's extraction texts and chats."""
    from xiaolm.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("ftok")
    paths = demo_data(tmp, 200, 0)
    records = [json.loads(line) for line in paths["train"].read_text(encoding="utf-8").splitlines()[:200]]
    as_chats = write_jsonl(tmp / "as_chats.jsonl", [extraction_chat(r) for r in records])
    return train_tokenizer([as_chats, paths["chats"]], tmp / "tokenizer", vocab_size=600, min_frequency=1,
                           cjk_chars=True)


def toy_cfg(tmp: Path, tokenizer: Path, out: str, paths: dict, **kw) -> TrainConfig:
    model = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=192)
    base = dict(out=str(tmp / out), max_steps=8, batch_size=8, lr=3e-3, warmup_steps=2, log_every=1, eval_every=2,
                eval_batches=1, save_every=4, device="cpu", dtype="fp32", threads=1, model=model,
                data=DataConfig(path=str(paths["train"]), val_path=str(paths["val"]), tokenizer=str(tokenizer),
                                seq_len=160, chat_path=str(paths["chats"]), chat_val_path=str(paths["chat_val"])),
                finetune=FinetuneSettings(chat_mix=0.25, eval_records=8, max_new_tokens=24, retention_items=8))
    base.update(kw)
    return TrainConfig(**base)


def log_rows(run_dir: Path) -> list[dict]:
    timing = ("tokens_per_s", "peak_mem_mb", "mfu")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_formatted_triplets_parse_back_to_the_same_triplets():
    cases = [[], [["渚漾城", "特产", "竹笋"]], [["渚漾城", "位于", "海州"], ["渚漾城", "河流", "明月河"]],
             [["A（甲）", "别名,字", "1,200万"], ["《三体》", "作者", "刘慈欣，等"]], [["s", "r", "o)"]]]
    for triplets in cases:
        assert check_triplets(triplets) is None
        assert parse_triplets(format_triplets(triplets)) == [tuple(t) for t in triplets]
    assert format_triplets([["渚漾城", "特产", "竹笋"]]) == "(渚漾城, 特产, 竹笋)" and format_triplets([]) == "无"
    assert parse_triplets("好的：\n（甲, 乙, 丙）\n(只有, 两项)\n( , 乙, 丙)") == [("甲", "乙", "丙")]
    for bad in ([["a, b", "r", "o"]], [["a\nb", "r", "o"]], [[" a", "r", "o"]], [["a", "r"]], "a, r, o"):
        assert check_triplets(bad) is not None


def test_f1_counts_exact_triplets_after_normalization():
    gold = [[["甲", "位于", "北州"], ["甲", "特产", "茶"]], [["ＡＢ城", "河流", "松江"]], [], [["丁", "位于", "东州"]]]
    predicted = [[("甲", "位于", "北州"), ("甲", "位于", "北州"), ("甲", "特产", "米")],  # duplicate counts once
                 [("AB城 ", "河流", "松江。")],  # full/half width, spaces, trailing punctuation
                 [("乙", "位于", "西州")], []]
    scores = triplet_scores(predicted, gold)
    assert (scores["tp"], scores["predicted"], scores["gold"]) == (2, 4, 4)
    assert scores["precision"] == scores["recall"] == scores["f1"] == pytest.approx(0.5)
    assert triplet_scores([[("a", "b", "c")]], [[("a", "b", "c")]])["f1"] == 1.0
    assert triplet_scores([[]], [[("a", "b", "c")]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0,
                                                         "predicted": 0, "gold": 1}
    scores = triplet_scores([[("a", "b", "c"), ("x", "y", "z")]], [[("a", "b", "c")]])
    assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx((0.5, 1.0, 2 / 3))


def objective(chat_mix: float, n_task: int = 7, n_chat: int = 5, seed: int = 0) -> FinetuneObjective:
    """Examples tagged by kind (first token 1 = task, 2 = chat) and index (second token)."""
    task = [(np.array([1, i, 0]), np.array([1, i, 0])) for i in range(n_task)]
    chats = [(np.array([2, i, 0]), np.array([2, i, 0])) for i in range(n_chat)]
    return FinetuneObjective(task, task, [], chats, FinetuneSettings(chat_mix=chat_mix), None, 8, seed, 0, 1)


def test_chat_mix_draws_the_stated_share_of_every_batch_deterministically():
    obj = objective(0.25)
    batches = [obj.train_batch(first, 8)["x"] for first in range(0, 800, 8)]
    assert all(int((b[:, 0] == 2).sum()) == 2 for b in batches)  # exactly 2 of 8 rows in every batch
    assert all(torch.equal(a, objective(0.25).train_batch(8 * i, 8)["x"]) for i, a in enumerate(batches))
    assert not torch.equal(torch.cat(batches), torch.cat([objective(0.25, seed=1).train_batch(f, 8)["x"]
                                                          for f in range(0, 800, 8)]))
    rows = torch.cat(batches)
    task_rows = rows[rows[:, 0] == 1][:, 1].tolist()
    assert len(task_rows) == 600 and all(sorted(task_rows[e * 7:(e + 1) * 7]) == list(range(7)) for e in range(85))
    chat_rows = rows[rows[:, 0] == 2][:, 1].tolist()
    assert len(chat_rows) == 200 and all(sorted(chat_rows[e * 5:(e + 1) * 5]) == list(range(5)) for e in range(40))
    for share, chats in ((0.0, 0), (0.1, 100), (1 / 3, 333), (1.0, 1000)):
        assert int((objective(share).train_batch(0, 1000)["x"][:, 0] == 2).sum()) == chats


def test_packed_batches_hold_the_padded_batches_chats_on_fewer_rows():
    padded = objective(0.25)
    task = [(np.array([1, i, 0]), np.array([1, i, 0])) for i in range(7)]
    chats = [(np.array([2, i, 0]), np.array([2, i, 0])) for i in range(5)]
    packed = FinetuneObjective(task, task, [], chats, FinetuneSettings(chat_mix=0.25), None, 8, 0, 0, 1, pack_len=4)
    for first in range(0, 80, 8):
        a, b = padded.train_batch(first, 8), packed.train_batch(first, 8)
        assert b["x"].shape == (4, 4) and a["x"].shape == (8, 2)  # two chats of 2 tokens in each row of 4
        assert sorted(map(tuple, b["x"].view(-1, 2).tolist())) == sorted(map(tuple, a["x"].tolist()))
        assert int(b["mask"].sum()) == int(a["mask"].sum())


def test_bad_records_are_rejected_by_line_and_the_rest_kept(tmp_path, demo_tokenizer):
    from xiaolm.tokenizer import load_tokenizer

    good = {"text": "北州有一条河，叫明月河。", "triplets": [["北州", "河流", "明月河"]]}
    path = write_jsonl(tmp_path / "x.jsonl", [good] + [r for r, _ in BAD] + [good])
    with RejectLog(tmp_path / "rejects.jsonl") as rejects:
        examples, records = load_extraction([str(path)], load_tokenizer(demo_tokenizer), 160, rejects)
    assert records == [good, good] and len(examples) == 2
    rows = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["where"], r["reason"]) for r in rows] == [(f"{path}:{i + 2}", reason)
                                                        for i, (_, reason) in enumerate(BAD)]


def test_toy_run_logs_val_f1_keeps_the_best_f1_and_reports_retention(tmp_path, demo_tokenizer):
    paths = demo_data(tmp_path, 40, 8)
    cfg = toy_cfg(tmp_path, demo_tokenizer, "run", paths)
    summary = run_finetune(cfg)
    out = tmp_path / "run"
    evals = [r for r in log_rows(out) if "val_f1" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8] and all("val_loss" in r and "val_recall" in r for r in evals)
    best = max(evals, key=lambda r: r["val_f1"])  # the first of equals: only a strict gain replaces best/
    assert json.loads((out / "best" / "best.json").read_text())["step"] == best["step"]
    assert summary["best_val_f1"] == pytest.approx(best["val_f1"], abs=1e-6)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == [reason for _, reason in BAD]
    assert rejects[0]["where"] == f"{paths['train']}:41"

    retention = json.loads((out / "retention.json").read_text())
    assert json.loads((out / "done.json").read_text())["retention"] == retention
    for when in ("before", "after"):
        assert set(retention[when]) == {"triplet_precision", "triplet_recall", "triplet_f1", "chat_exact",
                                        "chat_ppl"}
    assert retention["chat_items"] == 8 and retention["extraction_records"] == 8
    from xiaolm.tokenizer import load_tokenizer

    items = [json.loads(line) for line in paths["chat_val"].read_text().splitlines()]
    tokenizer = load_tokenizer(demo_tokenizer)
    _, untrained = build_model(cfg, len(tokenizer), torch.device("cpu"))  # the run's starting weights
    best_model, _ = load_model(out / "best")
    for when, model in (("before", untrained), ("after", best_model)):
        expected = answer_perplexity(model.eval(), tokenizer, items, 160)["ppl"]
        assert retention[when]["chat_ppl"] == pytest.approx(expected, rel=1e-5)
    assert retention["after"]["chat_ppl"] < retention["before"]["chat_ppl"]  # the chat rows trained too
    assert retention["after"]["triplet_f1"] == pytest.approx(summary["best_val_f1"], abs=1e-6)


def test_resume_after_losing_the_last_checkpoint_is_bitwise(tmp_path, demo_tokenizer):
    paths = demo_data(tmp_path, 40, 8)
    run_finetune(toy_cfg(tmp_path, demo_tokenizer, "full", paths))
    run_finetune(toy_cfg(tmp_path, demo_tokenizer, "killed", paths))
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "step-8")
    (tmp_path / "killed" / "latest").write_text("step-4\n")
    run_finetune(toy_cfg(tmp_path, demo_tokenizer, "killed", paths), resume=True)
    assert log_rows(tmp_path / "killed") == log_rows(tmp_path / "full")
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-8" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "step-8" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_settings_are_checked_before_any_work(tmp_path, demo_tokenizer):
    paths = demo_data(tmp_path, 4, 2)
    for settings, match in ((FinetuneSettings(chat_mix=1.5), "chat_mix"), (FinetuneSettings(task="ner"), "task")):
        with pytest.raises(XiaolmError, match=match):
            run_finetune(toy_cfg(tmp_path, demo_tokenizer, "run", paths, finetune=settings))
    cfg = toy_cfg(tmp_path, demo_tokenizer, "run", paths)
    cfg.data.chat_path = ""
    with pytest.raises(XiaolmError, match="chat_path"):
        run_finetune(cfg)


def test_cli_finetune_then_eval_extraction(tmp_path, demo_tokenizer, capsys):
    from xiaolm.cli import main

    paths = demo_data(tmp_path, 16, 4)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--config", str(Path(__file__).parent.parent / "configs" / "finetune.yaml"),
              "init_from=", f"data.tokenizer={demo_tokenizer}", f"data.path={paths['train']}",
              f"data.chat_path={paths['chats']}", f"data.chat_val_path={paths['chat_val']}", f"out={out}",
              "max_steps=2", "eval_every=2", "batch_size=4", "device=cpu", "model.dim=32", "model.n_layers=1",
              "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=320", "finetune.eval_records=2",
              "finetune.max_new_tokens=8", "finetune.chat_mix=0.5"])
    assert e.value.code == 0
    assert set(json.loads((out / "retention.json").read_text())["after"]) >= {"triplet_f1", "chat_exact"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["eval", str(out), "--task", "extraction", "--data", str(paths["val"])])
    assert e.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and set(result) >= {"precision", "recall", "f1", "examples"}


@pytest.mark.slow
def test_triplet_f1_rises_above_zero_on_the_demo_records(tmp_path, demo_tokenizer):
    # From scratch (init_from empty: the pretraining ablation). The demo's extraction is span copying plus a small
    # relation vocabulary; a toy pretraining of seconds teaches nothing of that, so the toy starts untrained
    # (F1 exactly 0: it never writes a well-formed line) and must learn the format and the copying itself.
    paths = demo_data(tmp_path, 400, 32)
    cfg = toy_cfg(tmp_path, demo_tokenizer, "run", paths, max_steps=240, batch_size=16, eval_every=240,
                  save_every=240, warmup_steps=20, threads=2,
                  model=LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
                  finetune=FinetuneSettings(chat_mix=0.25, eval_records=32, max_new_tokens=64, retention_items=8))
    retention = run_finetune(cfg)["retention"]
    assert retention["before"]["triplet_f1"] == 0.0
    assert retention["after"]["triplet_f1"] > 0.05
