"""llama.cpp itself (through llama-cpp-python) loads our GGUF files: same token ids, same greedy tokens.

`make test-gguf` installs llama-cpp-python (it builds llama.cpp from source: ~15 minutes on 2 cores) and runs
these; `make test` deselects them by their marker, so a missing llama_cpp is never a silent skip.
"""

import json

import numpy as np
import pytest
import torch

from tests.test_export import make_model, make_run_dir
from tests.test_gguf import GGUF_TEXTS, train_chars_tokenizer
from xiaolm.chat_format import load_tokenizer, render_chat
from xiaolm.infer.generate import GenerationConfig, generate
from xiaolm.model import gguf
from xiaolm.model.gguf import PROBE_TEXTS, as_llama_cpp_splits, export_gguf, probe_texts

pytestmark = [pytest.mark.slow, pytest.mark.llama_cpp]

# the demo's character-level setting, and the default rules without the CJK run cap (which llama.cpp lacks)
RULES = {"cjk_chars": {"cjk_chars": True}, "no_cjk_cap": {"max_cjk_run": 0}}


@pytest.fixture(scope="module", params=list(RULES))
def run_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    tok_dir = train_chars_tokenizer(root, **RULES[request.param])
    return make_run_dir(root, make_model(len(load_tokenizer(tok_dir)), tie=True), tok_dir)


def llama(path, **kw):
    import llama_cpp  # imported here: `make test` collects this file without the llama-cpp extra, then deselects it

    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False, **kw)


def test_llama_cpp_splits_text_into_our_token_ids(run_dir, tmp_path):
    tok = load_tokenizer(run_dir / "tokenizer")
    llm = llama(export_gguf(run_dir, tmp_path / "m.gguf", dtype="f32"), vocab_only=True)
    texts = [*GGUF_TEXTS, *PROBE_TEXTS, render_chat([{"role": "user", "content": "你好，hello 123"}], True),
             *probe_texts(json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text()))]
    for text in texts:
        ours = tok.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours, text[:40]
        assert llm.detokenize(ours, special=True).decode() == text


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_greedy_tokens_equal_ours(run_dir, tmp_path, dtype):
    from xiaolm.model.export import load_model

    model, tok = load_model(run_dir)
    prompt = tok.encode(render_chat([{"role": "user", "content": "你好，世界！"}], True), add_special_tokens=False)
    llm = llama(export_gguf(run_dir, tmp_path / f"m-{dtype}.gguf", dtype=dtype), logits_all=True)
    llm.eval(prompt)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0][0].numpy()
    theirs = np.asarray(llm.scores[: len(prompt)])
    # llama.cpp keeps its KV cache in f16 even for f32 weights: logits agree to ~0.2% of their range
    assert np.abs(theirs - logits).max() < (5e-3 if dtype == "f32" else 3e-2) * np.abs(logits).max()
    ours = generate(model, prompt, GenerationConfig(max_new_tokens=20, temperature=0.0))
    llm.reset()
    greedy = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        greedy.append(t)
        if len(greedy) == len(ours):
            break
    assert len(ours) == 20 and greedy == ours


def test_llama_cpp_splits_as_the_export_check_predicts_where_it_refuses(tmp_path, tokenizer_dir, monkeypatch):
    """The default tokenizer (CJK runs cut every 16 characters): the check's model of llama.cpp is llama.cpp."""
    run = make_run_dir(tmp_path, make_model(len(load_tokenizer(tokenizer_dir))), tokenizer_dir)
    monkeypatch.setattr(gguf, "check_pre_tokenizer", lambda *a, **k: None)
    llm = llama(export_gguf(run, tmp_path / "m.gguf", dtype="f32"), vocab_only=True)
    tok_json = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tok, predicted = load_tokenizer(tokenizer_dir), as_llama_cpp_splits(tok_json)
    differ = 0
    for text in [*PROBE_TEXTS, *probe_texts(tok_json)]:
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert theirs == predicted.encode(text, add_special_tokens=False).ids, text[:40]
        differ += theirs != tok.encode(text, add_special_tokens=False)
    assert differ > 0
