"""`xiaolm report`: a card from what the stages left behind, in Markdown and as one self-contained HTML page."""

import base64
import json
import re

import pytest

from tests.test_dpo import VOCAB, hf_dir, write_jsonl
from tests.test_export import make_model
from tests.test_grpo import grpo_cfg, prompts
from xiaolm.cli import main
from xiaolm.errors import XiaolmError
from xiaolm.eval.report_card import num, write_report_card
from xiaolm.train.grpo import run_grpo


def test_one_number_format():
    assert [num(x) for x in (7, 1234567, 2.0, 1234.0, 0.123456, 12.3456, 5e7, None)] == \
        ["7", "1,234,567", "2", "1,234", "0.1235", "12.35", "50,000,000", "None"]


def test_a_card_for_a_training_run_and_a_data_stage(tmp_path, tiny_tokenizer_dir, capsys):
    tmp = tmp_path
    hf_dir(tmp, tiny_tokenizer_dir, make_model(VOCAB))
    data = write_jsonl(tmp / "prompts.jsonl", prompts(40))
    run_grpo(grpo_cfg(tmp, "grpo", data, max_steps=2, eval_every=2))
    stage = tmp / "data" / "clean"
    stage.mkdir(parents=True)
    (stage / "report.json").write_text(json.dumps({"records_in": 12, "records_out": 9,
                                                   "rejected": {"too_short": 2, "bad_json": 1}}))
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp / "grpo"), str(tmp), "--out", str(tmp / "card")])
    assert e.value.code == 0 and "report_card.html" in capsys.readouterr().out
    md = (tmp / "card" / "report_card.md").read_text(encoding="utf-8")
    assert "| clean | 12 | 9 | 3 | too_short 2, bad_json 1 |" in md
    done = json.loads((tmp / "grpo" / "done.json").read_text())
    assert f"| grpo | {num(done['params'])} | {num(done['trainable_params'])} | 2 |" in md
    assert md.count("| grpo |") == 1  # found from both roots, shown once
    link = re.search(r"!\[grpo loss\]\((.+?)\)", md).group(1)
    assert (tmp / "card" / link).resolve() == (tmp / "grpo" / "loss.png").resolve()
    page = (tmp / "card" / "report_card.html").read_text(encoding="utf-8")
    inline = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(inline) == (tmp / "grpo" / "loss.png").read_bytes()  # the plot travels inside the page
    assert "<table>" in page and "<td>too_short 2, bad_json 1</td>" in page


def test_nothing_to_report_is_a_clear_error(tmp_path):
    with pytest.raises(XiaolmError, match="found no stage output"):
        write_report_card([tmp_path])
    with pytest.raises(XiaolmError, match="no such directory"):
        write_report_card([tmp_path / "missing"])
