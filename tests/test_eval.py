"""Evaluation: perplexity (document masking, per source), exact match and multiple choice, `xiaolm eval`."""

import pytest
import torch

from xiaolm.eval import qa
from xiaolm.model.llama import Llama, LlamaConfig

VOCAB = 64


def make_model(vocab: int = VOCAB, seed: int = 0) -> Llama:
    """Random weights at a large scale, so attention's reach changes the losses visibly."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name or "lm_head" in name else 2 / p.shape[1] ** 0.5)
    return model.eval()


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


def test_choice_takes_each_items_own_options(tiny_tokenizer_dir, monkeypatch):
    from xiaolm.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    right = tok.encode("对", add_special_tokens=False)
    monkeypatch.setattr(qa, "option_logprob", lambda model, prompt, option: float(option[:-1] == right))
    items = [{"question": "一", "A": "对", "B": "错", "answer": "A"},
             {"question": "二", "A": "错", "B": "错", "C": "错", "D": "对", "answer": "D"},
             {"question": "三", "options": ["错", "对", "错"], "answer": "B"}]
    result = qa.choice_accuracy(make_model(len(tok)), tok, items)
    assert result["accuracy"] == 1.0
    assert result["chance"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 3) / 3)


def test_choice_item_without_options_is_a_clear_error(tiny_tokenizer_dir):
    from xiaolm.errors import XiaolmError
    from xiaolm.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    with pytest.raises(XiaolmError, match="item 1 has no options"):
        qa.choice_accuracy(make_model(len(tok)), tok, [{"question": "一", "answer": "A"}])
