"""The text-to-text path through the one loop: a tiny T5 pretrained on plain text (each window cut into source and
target), resumed bitwise after an interruption, then SFT with only the decoder training, DPO full and with LoRA
(merged), export, and the exported directory in transformers' Auto classes with our greedy output."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FIXTURES
from tests.test_dpo import log_rows, make_pairs, write_jsonl
from xiaolm.data.pack import pack_files
from xiaolm.infer.generate import GenerationConfig, chat_stop_ids, generate
from xiaolm.model.adapters import LoraSettings
from xiaolm.model.export import export_hf, load_model
from xiaolm.model.t5 import T5Config
from xiaolm.train.config import DataConfig, DPOSettings, TrainConfig
from xiaolm.train.dpo import run_dpo
from xiaolm.train.pretrain import SourceCut, run_pretrain
from xiaolm.train.sft import run_sft

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def cfg(tmp, out, **kw) -> TrainConfig:
    base = dict(out=str(tmp / out), max_steps=6, batch_size=4, lr=3e-3, warmup_steps=0, log_every=1, eval_every=3,
                eval_batches=2, save_every=2, device="cpu", dtype="fp32",
                model=T5Config(dim=32, n_layers=2, n_heads=4, head_dim=8, ffn_dim=64, max_seq_len=64))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_tokenizer_dir):
    tmp = tmp_path_factory.mktemp("t5pipe")
    pack_files([str(FIXTURES / "corpus_zh.jsonl")], tiny_tokenizer_dir, tmp / "packed", val_fraction=0.1)
    return tmp


def test_source_cut_keeps_a_source_and_a_target_and_is_a_function_of_the_row():
    import numpy as np

    cut = SourceCut(0.25, 0.75, seed=3)
    y = torch.arange(40).repeat(5, 1)
    cut.mask(y, np.arange(100, 105))
    again = torch.arange(40).repeat(5, 1)
    cut.mask(again, np.arange(100, 105))
    assert torch.equal(y, again)
    sources = (y == -100).sum(1) + 1  # window tokens before the cut
    assert ((sources >= 10) & (sources <= 31)).all() and len(set(sources.tolist())) > 1
    assert all(torch.equal(row[row != -100], torch.arange(int(s) - 1, 40)) for row, s in zip(y, sources, strict=True))


def test_pretrain_sft_dpo_export_and_load_in_transformers(packed, tiny_tokenizer_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tmp = packed
    data = DataConfig(path=str(tmp / "packed"), seq_len=32)
    run_pretrain(cfg(tmp, "pre", data=data))
    run_pretrain(cfg(tmp, "killed", data=data))
    shutil.rmtree(tmp / "killed" / "checkpoints" / "step-6")
    (tmp / "killed" / "latest").write_text("step-4\n")
    run_pretrain(cfg(tmp, "killed", data=data), resume=True)
    assert log_rows(tmp / "killed") == log_rows(tmp / "pre")
    a = load_file(str(tmp / "pre" / "checkpoints" / "step-6" / "model.safetensors"))
    b = load_file(str(tmp / "killed" / "checkpoints" / "step-6" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in log_rows(tmp / "pre")]
    assert losses[-1] < losses[0]

    chats = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]}
             for p in make_pairs(40)]
    write_jsonl(tmp / "chats.jsonl", chats)
    sft = cfg(tmp, "sft", init_from=str(tmp / "pre"), freeze=["encoder", "embeddings"],
              data=DataConfig(path=str(tmp / "chats.jsonl"), seq_len=48, val_fraction=0.1))
    summary = run_sft(sft)
    before, after = load_model(tmp / "pre")[0], load_model(tmp / "sft")[0]
    for name, p in before.state_dict().items():  # the encoder and embeddings stayed, the decoder trained
        assert torch.equal(p, after.state_dict()[name]) == name.startswith(("encoder.", "shared.")), name
    assert summary["trainable_params"] < summary["params"]

    write_jsonl(tmp / "pairs.jsonl", make_pairs(12))
    pairs = DataConfig(path=str(tmp / "pairs.jsonl"), val_path=str(tmp / "pairs.jsonl"), seq_len=48)
    run_dpo(cfg(tmp, "dpo", init_from=str(tmp / "sft"), data=pairs, dpo=DPOSettings(beta=0.1)))
    rows = log_rows(tmp / "dpo")
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5) and rows[-1]["loss"] < rows[0]["loss"]
    run_dpo(cfg(tmp, "dpo-lora", init_from=str(tmp / "sft"), data=pairs, lora=LoraSettings(r=4, alpha=8), lr=1e-2))
    done = json.loads((tmp / "dpo-lora" / "done.json").read_text())
    assert 0 < done["trainable_params"] < done["params"] / 3

    for run, merge in (("dpo", False), ("dpo-lora", True)):
        out = export_hf(tmp / run, tmp / f"hf-{run}", merge=merge)
        ours, tok = load_model(out)
        hf = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
        hf_tok = AutoTokenizer.from_pretrained(out)
        messages = [{"role": "user", "content": "你好？"}]
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                         return_tensors="pt")["input_ids"]
        theirs = hf.generate(ids, max_new_tokens=16, do_sample=False, repetition_penalty=1.0)[0, 1:].tolist()
        stops = chat_stop_ids(tok)
        mine = generate(ours, ids[0].tolist(), GenerationConfig(max_new_tokens=16, temperature=0, stop_ids=stops))
        assert mine == [t for t in theirs if t not in stops][:len(mine)] and len(mine) > 1
        assert theirs[len(mine):len(mine) + 1] in ([], [t for t in theirs[len(mine):len(mine) + 1] if t in stops])


def test_text_to_text_pretraining_on_prompt_response_pairs_is_sft_from_a_fresh_model(packed, tiny_tokenizer_dir):
    tmp = packed
    pairs = [{"prompt": p["prompt"], "response": p["chosen"]} for p in make_pairs(40, seed=5)]
    write_jsonl(tmp / "qa.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                 {"role": "assistant", "content": r["response"]}]} for r in pairs])
    summary = run_sft(cfg(tmp, "pairs", max_steps=8, data=DataConfig(path=str(tmp / "qa.jsonl"), seq_len=48,
                                                                    tokenizer=str(tiny_tokenizer_dir))))
    model, _ = load_model(tmp / "pairs")
    assert model.cfg.arch == "t5" and summary["steps"] == 8
    losses = [r["loss"] for r in log_rows(tmp / "pairs")]
    assert losses[-1] < losses[0]
