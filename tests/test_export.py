"""Model files: safetensors + config.json, run-dir and HF-dir loading, HF export that transformers loads."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.test_llama import large_init
from xiaolm.errors import XiaolmError
from xiaolm.infer.generate import GenerationConfig, generate
from xiaolm.model.export import export_hf, load_model, save_model_weights
from xiaolm.model.llama import Llama, LlamaConfig


def make_model(vocab: int, tie: bool = True, seed: int = 0) -> Llama:
    """Random weights at a large scale: greedy picks are far from ties and vary (a small init repeats)."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                              tie_embeddings=tie))
    return large_init(model)


def make_run_dir(root: Path, model: Llama, tiny_tokenizer_dir: Path, step: int = 200) -> Path:
    """The training-run layout: latest → checkpoints/step-N/{model.safetensors,config.json}, tokenizer/."""
    import shutil

    run = root / "run"
    save_model_weights(model, run / "checkpoints" / f"step-{step}")
    save_model_weights(make_model(model.cfg.vocab_size, seed=99), run / "checkpoints" / "step-100")  # older
    shutil.copytree(tiny_tokenizer_dir, run / "tokenizer")
    (run / "latest").write_text(f"step-{step}\n")
    return run


def same_weights(a: Llama, b: Llama) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("tie", [True, False])
def test_save_writes_hf_names_and_omits_a_tied_head(tmp_path, tie):
    model = make_model(80, tie=tie)
    save_model_weights(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) is not tie
    assert "model.layers.1.mlp.down_proj.weight" in keys
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tie and cfg["torch_dtype"] == "float32"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    loaded, tokenizer = load_model(tmp_path)
    assert tokenizer is None and same_weights(model, loaded) and not loaded.training


def test_save_in_half_precision(tmp_path):
    save_model_weights(make_model(80), tmp_path, dtype=torch.bfloat16)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, _ = load_model(tmp_path)
    assert model.model.norm.weight.dtype == torch.float32
    assert load_model(tmp_path, dtype=torch.bfloat16)[0].lm_head.weight.dtype == torch.bfloat16


def test_load_a_run_dir_follows_latest(tmp_path, tiny_tokenizer_dir):
    model = make_model(300)
    run = make_run_dir(tmp_path, model, tiny_tokenizer_dir)
    loaded, tokenizer = load_model(run)
    assert same_weights(model, loaded)
    assert tokenizer is not None and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2


def test_load_never_unpickles(tmp_path, monkeypatch):
    save_model_weights(make_model(80), tmp_path)

    def refuse(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(XiaolmError, match="model.safetensors"):
        load_model(tmp_path)


def test_clear_errors_for_things_that_are_not_models(tmp_path):
    with pytest.raises(XiaolmError, match="not a model"):
        load_model(tmp_path)  # empty dir
    with pytest.raises(XiaolmError, match="no such"):
        load_model(tmp_path / "missing")
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(XiaolmError, match="cannot load"):
        load_model(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").write_text("step-5\n")
    with pytest.raises(XiaolmError, match="step-5"):
        load_model(run)


def test_weights_that_do_not_fit_the_config(tmp_path):
    save_model_weights(make_model(80), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 90}))
    with pytest.raises(XiaolmError, match="do not fit"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(XiaolmError, match="missing"):
        load_model(tmp_path)


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_in_transformers_and_greedy_matches(tmp_path, tiny_tokenizer_dir, tie, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    model = make_model(300, tie=tie)
    out = export_hf(make_run_dir(tmp_path, model, tiny_tokenizer_dir), tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == [2, 0] and gen_cfg["pad_token_id"] == 0

    hf_logging.enable_propagation()  # transformers logs to its own handler; let caplog see it
    try:
        with warnings.catch_warnings(), caplog.at_level("WARNING", logger="transformers"):
            warnings.simplefilter("error")
            hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
            tok = AutoTokenizer.from_pretrained(out)
    finally:
        hf_logging.disable_propagation()
    assert not [r for r in caplog.records if r.name.startswith("transformers")], caplog.text
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) is tie  # re-tied
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]

    for penalty in (1.0, 1.3):
        cfg = GenerationConfig(max_new_tokens=20, temperature=0, repetition_penalty=penalty, stop_ids=[2, 0])
        ours = generate(model, ids, cfg)
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, use_cache=True,
                             repetition_penalty=penalty, temperature=None, top_p=None)[0, len(ids):].tolist()
        if theirs and theirs[-1] in (0, 2):
            theirs = theirs[:-1]  # HF keeps the stop token
        assert ours == theirs
        assert len(set(ours)) > 5  # a varied sequence, not one token repeated


def test_export_dtype_and_from_an_hf_dir(tmp_path, tiny_tokenizer_dir):
    model = make_model(300, tie=False)
    first = export_hf(make_run_dir(tmp_path, model, tiny_tokenizer_dir), tmp_path / "hf")
    again = export_hf(first, tmp_path / "hf16", dtype="fp16")  # an HF dir is a valid source too
    assert json.loads((again / "config.json").read_text())["torch_dtype"] == "float16"
    with safe_open(again / "model.safetensors", "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.float16
    loaded, tokenizer = load_model(again)
    assert tokenizer is not None
    assert (loaded.lm_head.weight - model.lm_head.weight).abs().max() < 1e-2
    export_hf(first, first)  # re-export in place replaces the directory cleanly
    assert same_weights(load_model(first)[0], model)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(XiaolmError, match="dtype"):
        export_hf(first, tmp_path / "x", dtype="int8")


def test_hf_config_without_eos_is_refused_and_without_pad_pads_with_eos():
    hf = make_model(50).cfg.hf_config()
    from xiaolm.model.llama import LlamaConfig

    assert LlamaConfig.from_hf_config({**hf, "pad_token_id": None}).pad_token_id == hf["eos_token_id"]
    with pytest.raises(XiaolmError, match="no eos_token_id"):
        LlamaConfig.from_hf_config({**hf, "eos_token_id": None})
