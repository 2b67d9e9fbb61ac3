"""Evaluation: perplexity (document masking, per source), exact match and multiple choice, `xiaolm eval`."""

import json
import math
import shutil

import pytest
import torch

from xiaolm.cli import main
from xiaolm.eval import qa
from xiaolm.eval.perplexity import perplexity, perplexity_by_source
from xiaolm.model.export import save_model_weights
from xiaolm.model.llama import Llama, LlamaConfig

VOCAB = 64


class CharTokenizer:
    """One id per character (1 … VOCAB-1), EOS = 0: documents of exact, known token lengths."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % (VOCAB - 1) + 1 for c in t] for t in texts]}

    def decode(self, ids):
        return "".join("x" if i else "" for i in ids)  # one character a non-EOS token


def make_model(vocab: int = VOCAB, seed: int = 0) -> Llama:
    """Random weights at a large scale, so attention's reach changes the losses visibly."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name or "lm_head" in name else 2 / p.shape[1] ** 0.5)
    return model.eval()


DOCS = ["春眠不觉晓处处", "闻啼鸟夜来风雨", "声花落知多少啊", "床前明月光疑是", "地上霜举头望明"]  # 7 chars + EOS = 8


def test_doc_mask_changes_perplexity_on_several_documents():
    model, tok = make_model(), CharTokenizer()
    masked = perplexity(model, tok, DOCS, seq_len=20)
    plain = perplexity(model, tok, DOCS, seq_len=20, doc_mask=False)
    assert abs(masked["loss"] - plain["loss"]) > 1e-3
    assert plain["tokens"] == 39  # one stream of 40 tokens, every target scored once by sliding windows
    assert masked["tokens"] == 35  # each document alone: its first token is not scored
    assert plain["characters"] == 34 and masked["characters"] == 30  # the unscored first tokens' characters left out
    assert plain["bits_per_char"] == pytest.approx(plain["loss"] * 39 / math.log(2) / 34)


def test_doc_mask_scores_each_document_as_if_alone():
    model, tok = make_model(), CharTokenizer()
    together = perplexity(model, tok, DOCS, seq_len=16)
    alone = [perplexity(model, tok, [d], seq_len=16) for d in DOCS]
    assert together["tokens"] == sum(a["tokens"] for a in alone) == 5 * 7
    mean_alone = sum(a["loss"] * a["tokens"] for a in alone) / together["tokens"]
    assert together["loss"] == pytest.approx(mean_alone, rel=1e-5)


def test_every_stride_scores_every_target_once_and_a_full_window_stride_is_non_overlapping():
    from xiaolm.eval.perplexity import sliding_windows

    ids = list(range(40))
    for stride in (1, 5, 16):
        windows = sliding_windows(ids, 16, stride)
        assert sum(new for _, new in windows) == 39 and all(len(w) <= 17 for w, _ in windows)
    assert [w[0] for w, _ in sliding_windows(ids, 16, 16)] == [0, 16, 32]


def test_perplexity_reports_each_source_and_the_whole():
    model, tok = make_model(), CharTokenizer()
    records = [{"text": d, "source": "poems" if i % 2 else "wiki"} for i, d in enumerate(DOCS)]
    result = perplexity_by_source(model, tok, records, seq_len=16)
    assert result["loss"] == pytest.approx(perplexity(model, tok, DOCS, seq_len=16)["loss"], rel=1e-6)
    assert set(result["by_source"]) == {"wiki", "poems"}
    wiki = perplexity(model, tok, [d for i, d in enumerate(DOCS) if i % 2 == 0], seq_len=16)
    assert result["by_source"]["wiki"]["loss"] == pytest.approx(wiki["loss"], rel=1e-6)
    assert result["by_source"]["wiki"]["tokens"] == wiki["tokens"]
    plain = perplexity_by_source(model, tok, records, seq_len=16, doc_mask=False)
    assert plain["by_source"]["wiki"]["loss"] == pytest.approx(
        perplexity(model, tok, [d for i, d in enumerate(DOCS) if i % 2 == 0], seq_len=16, doc_mask=False)["loss"])
    assert perplexity_by_source(model, tok, [{"text": d} for d in DOCS], seq_len=16)["by_source"] == {}


def test_exact_match_chance_is_per_kind_not_the_last_item(tiny_tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    model = make_model(len(tok))
    ask = [{"role": "user", "content": "你好"}]
    items = [{"messages": ask, "answer": "世界", "kind": "a", "chance": 0.1},
             {"messages": ask, "answer": "世界", "kind": "b", "chance": 0.5},
             {"messages": ask, "answer": "世界", "kind": "a", "chance": 0.3},
             {"messages": ask, "answer": "世界", "kind": "c"}]
    result = qa.exact_match(model, tok, items, max_new_tokens=2)
    assert result["a"]["chance"] == pytest.approx(0.2) and result["a"]["n"] == 2
    assert result["b"]["chance"] == 0.5 and result["c"]["chance"] == 0.0


def test_choice_takes_each_items_own_options(tiny_tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    items = [{"question": "一", "A": "对", "B": "错", "answer": "A"},
             {"question": "二", "A": "错", "B": "错", "C": "错", "D": "对", "answer": "D"},
             {"question": "三", "options": ["错", "对", "错"], "answer": "B"}]
    result = qa.choice_accuracy(make_model(len(tok)), tok, items)
    assert result["n"] == 3 and [e["pick"] in "ABCD" for e in result["examples"]] == [True] * 3
    assert result["chance"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 3) / 3)


def test_exact_match_chance_of_an_item_with_options_is_one_over_its_own_options(tiny_tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    ask = [{"role": "user", "content": "你好"}]
    items = [{"messages": ask, "answer": "A", "kind": "k", "A": "甲", "B": "乙"},
             {"messages": ask, "answer": "C", "kind": "k", "options": ["甲", "乙", "丙", "丁"]}]
    assert qa.exact_match(make_model(len(tok)), tok, items, max_new_tokens=1)["k"]["chance"] == pytest.approx(3 / 8)


def test_choice_item_without_options_is_a_clear_error(tiny_tokenizer_dir):
    from xiaolm.errors import XiaolmError
    from xiaolm.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    with pytest.raises(XiaolmError, match="item 1 has no options"):
        qa.choice_accuracy(make_model(len(tok)), tok, [{"question": "一", "answer": "A"}])


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    out = tmp_path / "model"
    save_model_weights(make_model(len(load_tokenizer(tiny_tokenizer_dir))), out)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture
def val_file(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"text": t, "source": s}, ensure_ascii=False) + "\n"
                            for t, s in [("你好，世界！", "chat"), ("春眠不觉晓。", "poems"), ("小模型。", "chat")]),
                    encoding="utf-8")
    return path


def test_eval_loads_the_model_on_the_chosen_device(model_dir, val_file, tmp_path, monkeypatch):
    import xiaolm.eval.tasks as tasks

    seen, real = [], tasks.load_model
    monkeypatch.setattr(tasks, "load_model", lambda path, device="cpu", **kw: seen.append(device)
                        or real(path, device=device, **kw))
    out = tmp_path / "ppl"
    with pytest.raises(SystemExit) as e:
        main(["eval", str(model_dir), "--task", "ppl", "--data", str(val_file), "--device", "cpu", "--out", str(out)])
    assert e.value.code == 0
    assert seen == [torch.device("cpu")]
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert set(result["by_source"]) == {"chat", "poems"} and math.isfinite(result["ppl"])


def test_eval_no_doc_mask_changes_the_perplexity(model_dir, val_file, tmp_path):
    losses = []
    for flags in ([], ["--no-doc-mask"]):
        out = tmp_path / "ppl"
        with pytest.raises(SystemExit):
            main(["eval", str(model_dir), "--task", "ppl", "--data", str(val_file), "--out", str(out), *flags])
        losses.append(json.loads((out / "result.json").read_text(encoding="utf-8"))["loss"])
    assert losses[0] != losses[1]


def test_eval_on_an_unknown_device_is_a_clear_error(model_dir, val_file, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(model_dir), "--task", "ppl", "--data", str(val_file), "--device", "tpu"])
    assert e.value.code == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


PAIRS = [{"prompt": "长江流经哪里？", "chosen": "长江流经武汉。", "rejected": "长江流经广州。"},
         {"prompt": "三加四等于多少？", "chosen": "七", "rejected": "八"},
         {"messages": [{"role": "user", "content": "你好"}], "chosen": "你好！我是小模型。", "rejected": "再见。"}]


def test_preference_accuracy_is_the_models_own_preference_pair_by_pair(model_dir, tmp_path):
    from xiaolm.model.export import load_model
    from xiaolm.tokenizer.chat import collate, encode_pair

    model, tok = load_model(model_dir)
    result = evaluate_preference(model_dir, tmp_path, PAIRS)
    margins = []
    for record in PAIRS:  # one pair at a time, padded to itself: the batched margins must agree
        chosen, rejected = encode_pair(tok, record, 256)
        with torch.no_grad():
            logps = [float(model(b["x"], b["y"], output="logprobs").sum()) for b in
                     (collate([chosen], tok.pad_token_id), collate([rejected], tok.pad_token_id))]
        margins.append(logps[0] - logps[1])
    assert result["n"] == 3 and result["chance"] == 0.5
    assert result["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    assert result["margin"] == pytest.approx(sum(margins) / 3, abs=1e-4)
    swapped = evaluate_preference(model_dir, tmp_path, [{**r, "chosen": r["rejected"], "rejected": r["chosen"]}
                                                        for r in PAIRS])
    assert swapped["accuracy"] == pytest.approx(1 - result["accuracy"])
    assert swapped["margin"] == pytest.approx(-result["margin"], abs=1e-4)


def test_a_preference_record_with_equal_answers_is_named(model_dir, tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "问", "chosen": "同", "rejected": "同"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["eval", str(model_dir), "--task", "preference", "--data", str(path)])
    assert e.value.code != 0
    assert "record 1" in capsys.readouterr().err


def evaluate_preference(model_dir, tmp_path, records) -> dict:
    path, out = tmp_path / "pairs.jsonl", tmp_path / "preference"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["eval", str(model_dir), "--task", "preference", "--data", str(path), "--out", str(out)])
    assert e.value.code == 0
    return json.loads((out / "result.json").read_text(encoding="utf-8"))


def test_letters_are_scored_on_the_whole_prompt_when_long_options_cut_it():
    import torch.nn.functional as F

    from tests.test_export import make_model
    from xiaolm.eval.choice import score_options

    model = make_model(300).eval()  # a 64-token context
    prompt = list(range(10, 60))  # 50 tokens: room for 14 only beside the 50-token options
    encoded = [(prompt, [list(range(100, 150)), list(range(150, 200))], [5, 6])]
    (_, letters), = score_options(model, encoded)
    with torch.no_grad():
        direct = F.log_softmax(model(torch.tensor([prompt]))[0][0, -1].float(), -1)[[5, 6]].tolist()
    assert letters == pytest.approx(direct, abs=1e-5)
