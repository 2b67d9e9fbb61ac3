"""LoRA adapters (peft) and frozen parts through the one loop: what trains, what is saved, resumed, exported."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_export import make_model
from tests.test_train_loop import losses, make_packed, tiny_cfg
from xiaolm.errors import XiaolmError
from xiaolm.infer.generate import GenerationConfig, generate
from xiaolm.model.adapters import LoraSettings
from xiaolm.model.export import export_hf, load_model, save_model_weights
from xiaolm.train.loop import train
from xiaolm.train.pretrain import PretrainObjective
from xiaolm.train.stage import build_model, trainable_model

VOCAB = 300


def base_dir(tmp: Path, tokenizer_dir: Path) -> Path:
    """An HF model dir (weights far from uniform, as in the export tests) with the tiny tokenizer."""
    model = make_model(VOCAB)
    out = tmp / "base"
    save_model_weights(model, out)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def lora_run(tmp: Path, tokenizer_dir: Path, out: str, resume: bool = False, **kw) -> dict:
    cfg = tiny_cfg(tmp, out, init_from=str(tmp / "base"), lora=LoraSettings(r=4, alpha=8), lr=2e-2, **kw)
    cfg.data.seq_len = 32
    cfg, model = build_model(cfg, VOCAB, torch.device("cpu"))
    model = trainable_model(model, cfg)
    objective = PretrainObjective(cfg.data.path, cfg.data.seq_len, cfg.seed, cfg.eval_batches, cfg.batch_size)
    return train(cfg, objective, model, tokenizer_dir, resume=resume, stage="lora")


@pytest.fixture
def lora_setup(tmp_path, tiny_tokenizer_dir):
    make_packed(tmp_path, vocab=VOCAB)
    base_dir(tmp_path, tiny_tokenizer_dir)
    return tmp_path, tiny_tokenizer_dir


def test_lora_checkpoint_holds_the_adapter_only_and_resumes_bitwise(lora_setup):
    tmp, tok = lora_setup
    summary = lora_run(tmp, tok, "full")
    assert 0 < summary["trainable_params"] < summary["params"] / 5
    ckpt = tmp / "full" / "checkpoints" / "step-12"
    assert {p.name for p in ckpt.glob("*.safetensors")} == {"adapter_model.safetensors"}
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model.safetensors").exists()
    lora_run(tmp, tok, "killed")
    shutil.rmtree(tmp / "killed" / "checkpoints" / "step-12")
    (tmp / "killed" / "latest").write_text("step-8\n")
    lora_run(tmp, tok, "killed", resume=True)
    assert losses(tmp / "killed") == losses(tmp / "full")
    a = load_file(str(ckpt / "adapter_model.safetensors"))
    b = load_file(str(tmp / "killed" / "checkpoints" / "step-12" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exported_adapter_loads_with_peft_on_the_exported_base_and_greedy_matches(lora_setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, tok = lora_setup
    lora_run(tmp, tok, "run")
    ours, tokenizer = load_model(tmp / "run")  # the base with the adapter merged in
    base, _ = load_model(tmp / "base")
    ids = tokenizer("你好，世界！", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        moved = (ours(torch.tensor([ids]))[0] - base(torch.tensor([ids]))[0]).abs().max()
    assert moved > 1e-2  # the adapter changed the model: the comparison below is not base against base
    cfg = GenerationConfig(max_new_tokens=16, temperature=0, stop_ids=[])
    expected = generate(ours, ids, cfg)

    out = export_hf(tmp / "run", tmp / "hf")
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter")
    theirs = peft_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=None, temperature=None, top_p=None)[0, len(ids):].tolist()
    assert theirs == expected and len(set(expected)) > 3

    merged = export_hf(tmp / "run", tmp / "hf-merged", merge=True)
    assert not (merged / "adapter").exists()
    hf = AutoModelForCausalLM.from_pretrained(merged)
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                         temperature=None, top_p=None)[0, len(ids):].tolist()
    assert theirs == expected


def test_frozen_parts_keep_their_weights_and_the_rest_trains(tmp_path):
    make_packed(tmp_path)
    cfg = tiny_cfg(tmp_path, "run", freeze=["embeddings", "layers.0"], max_steps=6, save_every=6)
    cfg, model = build_model(cfg, 64, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = trainable_model(model, cfg)
    objective = PretrainObjective(cfg.data.path, cfg.data.seq_len, cfg.seed, cfg.eval_batches, cfg.batch_size)
    summary = train(cfg, objective, model, tmp_path / "tok", stage="frozen")
    after = load_file(str(tmp_path / "run" / "checkpoints" / "step-6" / "model.safetensors"))
    for name, value in after.items():
        frozen = name.startswith(("model.embed_tokens.", "model.layers.0."))
        assert torch.equal(value, before[name]) is frozen, name
    assert summary["trainable_params"] < summary["params"]


def test_lora_and_freeze_settings_are_checked(tmp_path):
    make_packed(tmp_path)
    cfg, model = build_model(tiny_cfg(tmp_path, "run"), 64, torch.device("cpu"))
    with pytest.raises(XiaolmError, match="init_from"):
        trainable_model(model, tiny_cfg(tmp_path, "run", lora=LoraSettings(r=4)))
    with pytest.raises(XiaolmError, match="embeddings"):  # the message lists the parts that exist
        trainable_model(model, tiny_cfg(tmp_path, "run", freeze=["encoder"]))
    with pytest.raises(XiaolmError, match="layers 0 … 1"):
        trainable_model(model, tiny_cfg(tmp_path, "run", freeze=["layers.0-5"]))
    cfg = tiny_cfg(tmp_path, "run", init_from="x", lora=LoraSettings(r=4, targets=["qkv"]))
    with pytest.raises(XiaolmError, match="qkv"):
        trainable_model(model, cfg)
