"""`xiaolm eval`'s tasks against independent computations (plain transformers, sacrebleu, hand-computed ROUGE), the
C-Eval / CMMLU / medical-QA layouts of tests/fixtures/, and the errors bad input gets."""

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_eval import make_model
from xiaolm.cli import main
from xiaolm.errors import XiaolmError
from xiaolm.model.export import save_model_weights

FIXTURES = Path(__file__).parent / "fixtures"
CEVAL, CMMLU, MEDICAL = FIXTURES / "ceval", FIXTURES / "cmmlu", FIXTURES / "medical"


def long_model(vocab: int, seed: int = 0):
    """make_model's random weights with a context long enough for 1-shot C-Eval prompts in byte-level tokens."""
    from xiaolm.model.llama import Llama

    model = make_model(vocab, seed)
    longer = Llama(dataclasses.replace(model.cfg, max_seq_len=1024))
    longer.load_state_dict(model.state_dict())
    return longer.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("evalmodel") / "model"
    save_model_weights(long_model(len(load_tokenizer(tiny_tokenizer_dir))), out)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def run_eval(args: list[str], out: Path) -> tuple[dict, list[dict]]:
    with pytest.raises(SystemExit) as e:
        main(["eval", *map(str, args), "--out", str(out)])
    assert e.value.code == 0
    predictions = out / "predictions.jsonl"
    lines = predictions.read_text(encoding="utf-8").splitlines() if predictions.exists() else []
    return json.loads((out / "result.json").read_text(encoding="utf-8")), [json.loads(x) for x in lines]


def eval_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["eval", *map(str, args)])
    assert e.value.code == 2
    return capsys.readouterr().err


def hf_nll(model, ids: list[int], first: int = 1) -> list[float]:
    """NLL of ids[first:] each given everything before it, one plain forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [-float(logp[t - 1, ids[t]]) for t in range(first, len(ids))]


TEXTS = [("你好，世界！今天天气很好。", "chat"), ("春眠不觉晓，处处闻啼鸟。", "poems"), ("小模型也能说话。", "chat")]


def test_perplexity_is_exp_of_the_mean_token_nll_of_plain_transformers(model_dir, hf_model, tmp_path):
    hf, tok = hf_model
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"text": t, "source": s}, ensure_ascii=False) + "\n" for t, s in TEXTS),
                    encoding="utf-8")
    result, _ = run_eval([model_dir, "--task", "ppl", "--data", data], tmp_path / "out")
    # document masking: each document alone, followed by EOS; its first token has no context and is not scored
    nll = {s: [] for _, s in TEXTS}
    chars = {s: 0 for _, s in TEXTS}
    for text, source in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        nll[source] += hf_nll(hf, ids)
        chars[source] += len(text) - len(tok.decode(ids[:1]))
    every = [x for v in nll.values() for x in v]
    assert result["tokens"] == len(every) and result["doc_mask"] is True
    assert result["ppl"] == pytest.approx(math.exp(sum(every) / len(every)), rel=1e-4)
    assert result["bits_per_char"] == pytest.approx(sum(every) / math.log(2) / sum(chars.values()), rel=1e-4)
    for source in nll:
        assert result["by_source"][source]["ppl"] == pytest.approx(math.exp(sum(nll[source]) / len(nll[source])),
                                                                   rel=1e-4)


def test_long_texts_are_scored_by_sliding_windows_with_the_stated_stride(model_dir, hf_model, tmp_path):
    hf, tok = hf_model
    text = "".join(t for t, _ in TEXTS) * 2
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    result, _ = run_eval([model_dir, "--task", "ppl", "--data", data, "--seq-len", "16", "--stride", "8"],
                         tmp_path / "out")
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ids) > 40 and result["seq_len"] == 16 and result["stride"] == 8
    nll, done = [], 0  # Hugging Face's recipe: windows of 17 ids every 8, each scoring the targets not yet scored
    for begin in range(0, len(ids), 8):
        end = min(begin + 17, len(ids))
        nll += hf_nll(hf, ids[begin:end], first=done + 1 - begin)
        done = end - 1
        if end == len(ids):
            break
    assert result["tokens"] == len(ids) - 1 == len(nll)
    assert result["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_bleu_equals_sacrebleu_on_the_same_strings_for_the_medical_layout(model_dir, tmp_path):
    import sacrebleu

    result, predictions = run_eval([model_dir, "--task", "bleu", "--data", MEDICAL / "test_zh_0.json",
                                    "--max-new-tokens", "8", "--rouge-words"], tmp_path / "out")
    rows = [json.loads(line) for line in (MEDICAL / "test_zh_0.json").read_text(encoding="utf-8").splitlines()]
    assert [p["prompt"] for p in predictions] == [r["instruction"] + r["input"] for r in rows]  # as published
    assert [p["reference"] for p in predictions] == [r["output"] for r in rows]
    replies = [p["reply"] for p in predictions]
    expected = sacrebleu.corpus_bleu(replies, [[r["output"] for r in rows]], tokenize="zh").score
    assert result["bleu"] == pytest.approx(expected) and result["n"] == 3
    assert "tok:zh" in result["signature"] and set(result["rouge_word"]) == {"rouge-1", "rouge-2", "rouge-l"}


def test_rouge_matches_a_hand_computed_case():
    from xiaolm.eval.generation import mean_rouge

    # 我爱北京 vs 我爱上海北京: unigrams 4 of 4 / 4 of 6; bigrams {我爱, 北京} 2 of 3 / 2 of 5; LCS 我爱北京 = 4
    r = mean_rouge(["我爱 北京"], ["我爱上海北京"])
    assert r["rouge-1"] == pytest.approx({"p": 1.0, "r": 4 / 6, "f": 0.8})
    assert r["rouge-2"] == pytest.approx({"p": 2 / 3, "r": 2 / 5, "f": 0.5})
    assert r["rouge-l"] == pytest.approx({"p": 1.0, "r": 4 / 6, "f": 0.8})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_choice_agrees_item_by_item_with_a_plain_transformers_loop(model_dir, hf_model, tmp_path):
    hf, tok = hf_model
    result, predictions = run_eval([model_dir, "--task", "choice", "--data", CEVAL, "--shots", "1"], tmp_path / "o")
    names = {"high_school_physics": "高中物理", "law": "法学"}
    expected = []
    for subject in ("high_school_physics", "law"):  # the val files, in name order, each with its first dev row
        shot = read_csv(CEVAL / "dev" / f"{subject}_dev.csv")[0]

        def block(row):
            return row["question"] + "\n" + "".join(f"{k}. {row[k]}\n" for k in "ABCD") + "答案："

        for row in read_csv(CEVAL / "val" / f"{subject}_val.csv"):
            prompt = f"以下是中国关于{names[subject]}考试的单项选择题，请选出其中的正确答案。\n\n" \
                     + block(shot) + shot["answer"] + "\n\n" + block(row)
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            per_char = []
            for k in "ABCD":
                o = tok(row[k], add_special_tokens=False)["input_ids"]
                per_char.append(-sum(hf_nll(hf, p + o, first=len(p))) / len(row[k]))
            with torch.no_grad():
                last = torch.log_softmax(hf(torch.tensor([p])).logits[0, -1].float(), -1)
            letters = [float(last[tok(k, add_special_tokens=False)["input_ids"][0]]) for k in "ABCD"]
            expected.append((row["answer"], per_char, letters))
    assert len(predictions) == len(expected) == 5
    for pred, (answer, per_char, letters) in zip(predictions, expected, strict=True):
        assert pred["answer"] == answer
        assert pred["text_scores"] == pytest.approx(per_char, abs=2e-4)
        assert pred["letter_logprobs"] == pytest.approx(letters, abs=2e-4)
        assert pred["text"] == "ABCD"[max(range(4), key=per_char.__getitem__)]
        assert pred["letter"] == "ABCD"[max(range(4), key=letters.__getitem__)]
    assert result["shots"] == 1 and result["default_method"] == "text" and result["chance"] == 0.25
    assert result["accuracy"] == result["accuracy_text"]
    assert set(result["by_subject"]) == {"high_school_physics", "law"}
    assert set(result["by_category"]) == {"STEM", "Humanities"}


def test_choice_reads_cmmlu_with_its_index_column_and_dev_shots(tmp_path):
    from xiaolm.eval.choice_data import ceval_prompt, read_choice_items

    items = read_choice_items([str(CMMLU)], shots=1)
    assert [i.answer for i in items] == ["A", "C"] and items[0].benchmark == "cmmlu"
    assert items[0].options == {"A": "粮食作物", "B": "油料作物", "C": "纤维作物", "D": "糖料作物"}
    assert items[0].category == "Other" and items[0].where.endswith("agronomy.csv:2")
    head = "以下是中国关于农学考试的单项选择题，请选出其中的正确答案。\n\n"
    assert ceval_prompt(items[1]).startswith(head + "小麦的果实是\nA. 颖果")
    assert ceval_prompt(items[1]).endswith("植物进行光合作用的主要器官是\nA. 根\nB. 茎\nC. 叶\nD. 花\n答案：")
    assert len(read_choice_items([str(CMMLU), str(CEVAL)], limit=100)) == 7  # --limit beyond the data is fine


@pytest.mark.parametrize("content, expected", [
    ("id,question,A,B,C,answer\n0,问,甲,乙,丙,A\n", "missing columns D"),
    ("id,question,A,B,C,D,answer\n0,问,甲,乙,丙,丁,E\n", "x.csv:2: answer 'E' is not one of A, B, C, D"),
    ("id,question,A,B,C,D,answer\n0,问,甲,乙,丙,丁,A\n1,问,甲,乙,丙,A\n", "x.csv:3: row has 6 fields"),
    ("", "x.csv: empty file"),
    ("text\n你好\n", "names no question column"),
])
def test_bad_choice_csvs_are_named_by_file_and_row(tmp_path, content, expected):
    from xiaolm.eval.choice_data import read_choice_items

    path = tmp_path / "x.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(XiaolmError, match=expected.replace("(", r"\(")) as e:
        read_choice_items([str(path)])
    assert e.value.hint


def test_the_ceval_test_split_without_answers_is_refused(model_dir, capsys):
    err = eval_error([model_dir, "--task", "choice", "--data", CEVAL / "test"], capsys)
    assert "high_school_physics_test.csv:2: no answer" in err and "val split" in err


def test_a_data_file_of_the_wrong_kind_is_named_with_its_line(model_dir, capsys, tmp_path):
    err = eval_error([model_dir, "--task", "ppl", "--data", CEVAL / "val" / "law_val.csv"], capsys)
    assert "law_val.csv:2: not a record for --task ppl" in err and '{"text": ...}' in err
    err = eval_error([model_dir, "--task", "rouge", "--data", CEVAL / "val" / "law_val.csv"], capsys)
    assert "law_val.csv:2: not a prompt/response record" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert f"{empty}: no records: the file is empty" in eval_error([model_dir, "--task", "exact", "--data", empty],
                                                                    capsys)


def test_a_model_dir_without_a_tokenizer_is_a_clear_error(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    err = eval_error([bare, "--task", "ppl", "--data", MEDICAL / "test_zh_0.json"], capsys)
    assert f"{bare}: model has no tokenizer files" in err


def test_preference_against_a_reference_is_dpo_implicit_reward_accuracy(model_dir, tmp_path, tiny_tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    ref = tmp_path / "ref"
    save_model_weights(long_model(len(load_tokenizer(tiny_tokenizer_dir)), seed=1), ref)
    data = MEDICAL / "reward_test.json"
    own, _ = run_eval([model_dir, "--task", "preference", "--data", data], tmp_path / "a")
    dpo, _ = run_eval([model_dir, "--task", "preference", "--data", data, "--ref", ref, "--beta", "0.5"],
                      tmp_path / "c")
    assert dpo["n"] == 1 and "implicit DPO reward" in dpo["score"]
    from xiaolm.eval.preference import preference_accuracy
    from xiaolm.model.export import load_model

    reference, _ = load_model(ref, with_tokenizer=False)
    model, tok = load_model(model_dir)
    record = json.loads(data.read_text(encoding="utf-8"))
    pair = {"prompt": record["question"], "chosen": record["response_chosen"], "rejected": record["response_rejected"]}
    ref_margin = preference_accuracy(reference, tok, [pair])["margin"]
    assert dpo["margin"] == pytest.approx(0.5 * (own["margin"] - ref_margin), abs=1e-4)
    assert dpo["accuracy"] == float(dpo["margin"] > 0)


def test_jsonl_items_with_a_subject_get_its_category_and_name(tmp_path):
    from xiaolm.eval.choice_data import ceval_prompt, read_choice_items

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "问", "options": ["甲", "乙"], "answer": "b", "subject": "law"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    item = read_choice_items([str(path)])[0]
    assert item.category == "Humanities" and item.answer == "B"
    assert ceval_prompt(item).startswith("以下是中国关于法学考试")
