"""CLI contract: --help works for every stage; user errors are one clear line and exit code 2."""

import pytest

from xiaolm.cli import main

STAGES = [["demo"], ["data", "import"], ["data", "clean"], ["data", "pack"], ["tokenizer", "train"], ["pretrain"],
          ["sft"], ["export"], ["chat"], ["eval"]]


@pytest.mark.parametrize("argv", STAGES, ids=lambda a: " ".join(a))
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
    import json

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["records_out"] == 2
    assert "unrecognized arguments" in error_line(["export", str(tmp_path), "--out", "x", "a=b"], capsys)
