"""CLI contract: --help works for every stage; user errors are one clear line and exit code 2."""

import json
from pathlib import Path

import pytest
import yaml

from xiaolm import cli
from xiaolm.cli import COMMANDS, main

FIXTURES = Path(__file__).parent / "fixtures"
STAGES = [["demo"], ["data", "import"], ["data", "clean"], ["data", "dedup"], ["data", "pack"],
          ["tokenizer", "train"], ["pretrain"], ["sft"], ["export"], ["chat"], ["eval"]]


def test_the_documented_stages_are_in_the_command_table():
    assert {tuple(a) for a in STAGES} <= set(COMMANDS)


@pytest.mark.parametrize("argv", [list(path) for path in COMMANDS], ids=lambda a: " ".join(a))
def test_every_stage_has_help_with_examples(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    assert "example" in capsys.readouterr().out


def error_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_missing_input_file_names_the_path(tmp_path, capsys):
    line = error_line(["data", "clean", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")], capsys)
    assert "nope.jsonl" in line and "not found" in line


def test_unknown_config_key_names_the_key(tmp_path, capsys):
    line = error_line(["pretrain", "model.depth=3"], capsys)
    assert "unknown config key 'model.depth'" in line


def test_malformed_chat_file_is_a_clear_error(tmp_path, capsys, tokenizer_dir):
    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"messages": [\n', encoding="utf-8")
    line = error_line(["sft", f"data.path={bad}", f"out={tmp_path / 'run'}", f"data.tokenizer={tokenizer_dir}",
                       "model.dim=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=1"], capsys)
    assert line.startswith("xiaolm: error:") and "chat.jsonl" in line and "bad_json" in line
    assert "rejects.jsonl" in line


def test_eval_on_missing_model_is_a_clear_error(tmp_path, capsys):
    line = error_line(["eval", str(tmp_path / "nomodel"), "--task", "ppl", "--data", "x.jsonl"], capsys)
    assert "nomodel" in line


def test_clean_settings_may_follow_the_output_option(tmp_path, capsys):
    src = tmp_path / "raw.jsonl"
    src.write_text('{"text": "春眠不觉晓，处处闻啼鸟。"}\n{"text": "短"}\n', encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["data", "clean", str(src), "--out", str(tmp_path / "out"), "min_chars=1", "t2s=false"])
    assert e.value.code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["records_out"] == 2
    assert "unrecognized arguments" in error_line(["export", str(tmp_path), "--out", "x", "a=b"], capsys)


def ok(argv) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, argv


def saved_config(out: Path) -> dict:
    return yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))


def test_a_training_stage_is_one_table_entry(monkeypatch):
    calls = []
    monkeypatch.setitem(COMMANDS, ("newstage",), cli.train_command("newstage", "a new method", "json:dumps"))
    monkeypatch.setattr(json, "dumps", lambda cfg, resume: calls.append((cfg, resume)))
    ok(["newstage", "max_steps=3", "model.dim=32", "--resume"])
    (cfg, resume), = calls
    assert (cfg.max_steps, cfg.model.dim, resume) == (3, 32, True)


def test_export_merge_lora_folds_the_adapter(monkeypatch, tmp_path, capsys):
    import xiaolm.model.export as export

    calls = []
    monkeypatch.setattr(export, "export_hf", lambda src, out, dtype, merge: calls.append((dtype, merge)) or out)
    ok(["export", str(tmp_path), "--out", str(tmp_path / "a")])
    ok(["export", str(tmp_path), "--out", str(tmp_path / "b"), "--merge-lora", "--dtype", "fp16"])
    assert calls == [("fp32", False), ("fp16", True)]
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--merge-lora" in capsys.readouterr().out


def test_pack_takes_settings_a_config_file_and_its_old_flags(tmp_path, tokenizer_dir):
    corpus = str(FIXTURES / "corpus_zh.jsonl")
    (tmp_path / "pack.yaml").write_text("val_fraction: 0.2\nseed: 5\n", encoding="utf-8")
    ok(["data", "pack", corpus, "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "a"), "seed=3",
        "--config", str(tmp_path / "pack.yaml")])
    assert (saved_config(tmp_path / "a")["val_fraction"], saved_config(tmp_path / "a")["seed"]) == (0.2, 3)
    ok(["data", "pack", corpus, "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "b"), "seed=3",
        "--seed", "4", "--val-fraction", "0.1"])  # a flag is the same setting and wins
    assert (saved_config(tmp_path / "b")["val_fraction"], saved_config(tmp_path / "b")["seed"]) == (0.1, 4)


def test_tokenizer_train_takes_settings_like_its_flags(tmp_path):
    corpus = str(FIXTURES / "corpus_zh.jsonl")
    ok(["tokenizer", "train", corpus, "--out", str(tmp_path / "a"), "vocab_size=300", "min_frequency=1",
        "cjk_chars=true", "--workers", "1"])
    ok(["tokenizer", "train", corpus, "--out", str(tmp_path / "b"), "--vocab-size", "300", "--min-frequency", "1",
        "--cjk-chars", "--workers", "1"])
    a, b = saved_config(tmp_path / "a"), saved_config(tmp_path / "b")
    assert a == {**b, "inputs": a["inputs"]} and (a["vocab_size"], a["cjk_chars"]) == (300, True)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_import_takes_settings(tmp_path):
    ok(["data", "import", "belle", str(FIXTURES / "sources" / "belle"), "--out", str(tmp_path / "o"),
        "shard_records=1", "--workers", "1"])
    assert saved_config(tmp_path / "o")["shard_records"] == 1
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert len(report["shards"]) == report["records_written"] == 2


@pytest.mark.parametrize("argv", [["data", "pack", "x.jsonl", "--tokenizer", "tok"], ["tokenizer", "train", "x"],
                                  ["data", "import", "belle", "x"]], ids=lambda a: " ".join(a[:2]))
def test_an_unknown_stage_setting_names_the_key(argv, tmp_path, capsys):
    line = error_line([*argv, "--out", str(tmp_path / "o"), "vocab=3"], capsys)
    assert "unknown config key 'vocab'" in line
