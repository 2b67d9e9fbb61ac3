"""DPO: the same numbers as TRL's DPOTrainer from the same weights and batches, exact resume, a LoRA run without a
reference copy, a reference cache reused on resume, bad pairs counted, and held-out preference accuracy rising."""

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.test_export import make_model
from xiaolm.chat_format import IM_END, render_chat
from xiaolm.errors import XiaolmError
from xiaolm.model.adapters import LoraSettings
from xiaolm.model.export import load_model, save_model_weights
from xiaolm.model.llama import Llama, LlamaConfig
from xiaolm.tokenizer import load_tokenizer
from xiaolm.tokenizer.chat import IGNORE
from xiaolm.train import dpo
from xiaolm.train.config import DataConfig, DPOSettings, TrainConfig
from xiaolm.train.sft import shuffled_index

VOCAB = 300
WORDS = ["你好", "世界", "今天", "天气", "很好", "我们", "一起", "学习", "中文", "数学", "小模型", "说话", "春眠",
         "不觉晓", "处处", "闻啼鸟"]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = "".join(rng.choices(WORDS, k=rng.randint(1, 3))) + "？"
        chosen = "".join(rng.choices(WORDS, k=rng.randint(1, 4))) + "。"
        rejected = "".join(rng.choices(WORDS, k=rng.randint(1, 4))) + "！"
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def hf_dir(tmp: Path, tokenizer_dir: Path, model: nn.Module, name: str = "base") -> Path:
    out = tmp / name
    save_model_weights(model, out)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def dpo_cfg(tmp: Path, out: str, data: Path, val: Path | None = None, **kw) -> TrainConfig:
    base = dict(out=str(tmp / out), init_from=str(tmp / "base"), max_steps=5, batch_size=2, lr=1e-3,
                warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, beta2=0.999, grad_clip=1.0, log_every=1,
                eval_every=100, save_every=100, device="cpu", dtype="fp32",
                data=DataConfig(path=str(data), val_path=str(val or data), seq_len=64))
    base.update(kw)
    return TrainConfig(**base)


def log_rows(run_dir: Path, key: str = "loss") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_mb", "mfu")} for r in rows if key in r]


@pytest.fixture
def setup(tmp_path, tiny_tokenizer_dir):
    hf_dir(tmp_path, tiny_tokenizer_dir, make_model(VOCAB))
    return tmp_path, write_jsonl(tmp_path / "pairs.jsonl", make_pairs(10))


def run_trl(tmp: Path, pairs: list[dict], order: list[int], loss: str, beta: float, sft_weight: float
            ) -> list[dict]:
    """TRL's DPOTrainer on the same rows in the same order (sequential sampler), fp32 on CPU."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tmp / "base")
    # The prompt is pre-rendered ChatML ending in "<|im_start|>assistant\n" and each answer ends with <|im_end|>,
    # so TRL's completion tokens are ours (content + <|im_end|>). TRL's conversational path would also train on the
    # "\n" after <|im_end|>; with <|im_end|> as its EOS it appends nothing more.
    tokenizer.eos_token = IM_END
    rows = [{"prompt": render_chat([{"role": "user", "content": pairs[i]["prompt"]}], add_generation_prompt=True),
             "chosen": pairs[i]["chosen"] + IM_END, "rejected": pairs[i]["rejected"] + IM_END} for i in order]
    types, weights = (["sigmoid" if loss == "sigmoid" else "ipo"], [1.0])
    if sft_weight:  # TRL's "sft" loss is the mean NLL over the chosen answers' tokens, as our dpo.sft_weight
        types, weights = types + ["sft"], weights + [sft_weight]
    args = DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=2, max_steps=len(order) // 2,
                     learning_rate=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                     warmup_steps=0, lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1, beta=beta,
                     loss_type=types, loss_weights=weights, use_cpu=True, bf16=False, fp16=False,
                     report_to="none", save_strategy="no", train_sampling_strategy="sequential",
                     max_length=None, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = DPOTrainer(model=str(tmp / "base"), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r]


@pytest.mark.parametrize("loss,sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_matches_trl_dpo_trainer_step_by_step(setup, loss, sft_weight):
    tmp, data = setup
    pairs = [json.loads(line) for line in data.read_text().splitlines()]
    beta = 0.1 if loss == "sigmoid" else 0.5
    cfg = dpo_cfg(tmp, "ours", data, dpo=DPOSettings(beta=beta, loss=loss, sft_weight=sft_weight))
    dpo.run_dpo(cfg)
    ours = log_rows(tmp / "ours")
    order = [shuffled_index(k % len(pairs), len(pairs), cfg.seed, k // len(pairs)) for k in range(10)]
    theirs = run_trl(tmp, pairs, order, loss, beta, sft_weight)
    assert len(ours) == len(theirs) == 5
    # TRL names: loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (each a batch mean)
    diffs = {key: max(abs(a[key] - b[name]) for a, b in zip(ours, theirs, strict=True))
             for key, name in [("loss", "loss"), ("rewards_chosen", "rewards/chosen"),
                               ("rewards_rejected", "rewards/rejected"), ("margin", "rewards/margins")]}
    print(f"{loss} sft_weight={sft_weight}: max abs differences over 5 steps {diffs}")
    assert abs(ours[0]["loss"] - theirs[0]["loss"]) < 1e-4
    assert abs(ours[0]["rewards_chosen"] - theirs[0]["rewards/chosen"]) < 1e-4
    assert abs(ours[0]["rewards_rejected"] - theirs[0]["rewards/rejected"]) < 1e-4
    assert diffs["loss"] < 1e-3 and diffs["rewards_chosen"] < 1e-3 and diffs["rewards_rejected"] < 1e-3
    assert max(abs(r["rewards_chosen"]) for r in ours[1:]) > 1e-3  # the policy moved: rewards were compared


def test_answer_only_labels_and_answer_layouts(tokenizer):
    record = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                           {"role": "user", "content": "今天天气怎么样？"}],
              "chosen": {"role": "assistant", "content": "很好。"}, "rejected": [{"role": "assistant",
                                                                               "content": "不知道。"}]}
    (c_ids, c_labels), (r_ids, _) = dpo.encode_pair(tokenizer, record, 256)
    trained = tokenizer.decode([t for t in c_labels if t != IGNORE])
    assert trained == "很好。" + IM_END  # the earlier assistant turn is context, not trained
    assert list(c_ids[:5]) == list(r_ids[:5])


def test_bad_pairs_are_rejected_with_file_line_and_reason_and_the_run_continues(setup):
    tmp, _ = setup
    good = make_pairs(6)
    bad = [{"prompt": "你好？", "chosen": "世界。", "rejected": "世界。"},
           {"prompt": "你好？", "chosen": "", "rejected": "世界。"},
           {"prompt": "你好？", "chosen": "世界。"},
           {"messages": [{"role": "system", "content": "你好"}], "chosen": "世界。", "rejected": "中文。"},
           {"prompt": "你好" * 60, "chosen": "世界。", "rejected": "中文。"},
           "{not json"]
    data = write_jsonl(tmp / "mixed.jsonl", good[:3] + bad + good[3:])
    summary = dpo.run_dpo(dpo_cfg(tmp, "run", data, max_steps=2))
    assert summary["steps"] == 2
    rejected = [json.loads(line) for line in (tmp / "run" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["where"]) for r in rejected[:5]] == [
        ("same_answers", f"{data}:4"), ("empty_answer", f"{data}:5"), ("empty_answer", f"{data}:6"),
        ("no_user_turn", f"{data}:7"), ("prompt_too_long", f"{data}:8")]
    assert rejected[5]["where"] == f"{data}:9" and len(rejected) == 6 * 2  # data and val_path read the same file


def test_init_from_is_required(setup):
    tmp, data = setup
    with pytest.raises(XiaolmError, match="init_from"):
        dpo.run_dpo(dpo_cfg(tmp, "run", data, init_from=""))


def test_resume_after_interruption_is_bitwise(setup):
    tmp, data = setup
    kw = dict(max_steps=6, save_every=2, eval_every=3)
    dpo.run_dpo(dpo_cfg(tmp, "full", data, **kw))
    dpo.run_dpo(dpo_cfg(tmp, "killed", data, **kw))
    shutil.rmtree(tmp / "killed" / "checkpoints" / "step-6")
    (tmp / "killed" / "latest").write_text("step-4\n")
    dpo.run_dpo(dpo_cfg(tmp, "killed", data, **kw), resume=True)
    assert log_rows(tmp / "killed") == log_rows(tmp / "full")
    assert log_rows(tmp / "killed", "val_loss") == log_rows(tmp / "full", "val_loss")
    a = load_file(str(tmp / "full" / "checkpoints" / "step-6" / "model.safetensors"))
    b = load_file(str(tmp / "killed" / "checkpoints" / "step-6" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def capture_objectives(monkeypatch, module=dpo) -> list:
    """The objectives that `module`'s run function builds, appended as they are made."""
    made, run_stage = [], module.run_stage

    def spy(cfg, stage, tok, vocab, make, resume=False):
        return run_stage(cfg, stage, tok, vocab, lambda c, ctx: made.append(make(c, ctx)) or made[-1], resume)

    monkeypatch.setattr(module, "run_stage", spy)
    return made


def test_lora_dpo_uses_the_adapter_free_base_as_reference_not_a_copy(setup, monkeypatch):
    tmp, data = setup
    made = capture_objectives(monkeypatch)
    summary = dpo.run_dpo(dpo_cfg(tmp, "lora", data, lora=LoraSettings(r=4, alpha=8), lr=1e-2))
    objective = made[0]
    assert objective.ref_mode == "adapter" and objective.reference.copy is None and not objective.cached
    assert not [v for v in vars(objective).values() if isinstance(v, nn.Module)]  # no second model held
    assert 0 < summary["trainable_params"] < summary["params"] / 5
    rows = log_rows(tmp / "lora")
    assert rows[0]["rewards_chosen"] == 0 and rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert rows[-1]["margin"] > 0  # the adapters moved away from the base, and in the preferred direction


def test_precomputed_reference_matches_a_copy_and_its_cache_is_reused_on_resume(setup, monkeypatch, caplog):
    tmp, data = setup
    kw = dict(max_steps=6, save_every=2, eval_every=3, dpo=DPOSettings(ref="precompute"))
    made = capture_objectives(monkeypatch)
    dpo.run_dpo(dpo_cfg(tmp, "pre", data, **kw))
    assert made[0].reference is None
    dpo.run_dpo(dpo_cfg(tmp, "copy", data, max_steps=6, save_every=2, eval_every=3))
    for a, b in zip(log_rows(tmp / "pre"), log_rows(tmp / "copy"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    cache = next((tmp / "pre").glob("ref_logps-*.safetensors"))
    stamp = cache.stat().st_mtime_ns
    shutil.rmtree(tmp / "pre" / "checkpoints" / "step-6")
    (tmp / "pre" / "latest").write_text("step-4\n")
    before = log_rows(tmp / "pre")
    with caplog.at_level(logging.INFO, logger="xiaolm.train.dpo"):
        dpo.run_dpo(dpo_cfg(tmp, "pre", data, **kw), resume=True)
    assert "reused" in caplog.text and cache.stat().st_mtime_ns == stamp
    assert log_rows(tmp / "pre") == before
    # the same init_from path holding other weights: the cache is not theirs, so it is computed afresh
    save_model_weights(make_model(VOCAB, seed=1), tmp / "base")
    shutil.rmtree(tmp / "pre" / "checkpoints")
    (tmp / "pre" / "latest").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xiaolm.train.dpo"):
        dpo.run_dpo(dpo_cfg(tmp, "pre", data, **kw))
    assert "reused" not in caplog.text and len(list((tmp / "pre").glob("ref_logps-*.safetensors"))) == 2


def preference_accuracy(model: nn.Module, objective: dpo.DPOObjective, split: str = "val") -> float:
    """Share of a split's pairs where the model gives the chosen answer the higher log-prob."""
    pairs = objective.val if split == "val" else objective.train
    right = 0
    with torch.no_grad():
        for batch in objective._batches(pairs):
            chosen, rejected = dpo.sequence_logps(model, batch).chunk(2)
            right += int((chosen > rejected).sum())
    return right / len(pairs)


@pytest.mark.slow
def test_dpo_on_the_demo_pairs_learns_the_training_preferences(tmp_path, tokenizer_dir, monkeypatch):
    from xiaolm.data.demo.heldout import arithmetic_pairs
    from xiaolm.data.demo.later_stages import preference_pairs
    from xiaolm.data.demo.world import generate_world

    rng = random.Random(0)
    _, train_arith = arithmetic_pairs(rng, 10)
    pairs, _ = preference_pairs(generate_world(0), rng, train_arith, 200)
    train, val = write_jsonl(tmp_path / "train.jsonl", pairs[:160]), write_jsonl(tmp_path / "val.jsonl", pairs[160:])
    vocab = len(load_tokenizer(tokenizer_dir))
    torch.manual_seed(0)
    base = Llama(LlamaConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    hf_dir(tmp_path, tokenizer_dir, base)
    made = capture_objectives(monkeypatch)
    cfg = dpo_cfg(tmp_path, "run", train, val, max_steps=300, batch_size=8, lr=1e-3, eval_every=300,
                  eval_batches=5, dpo=DPOSettings(beta=0.5))
    dpo.run_dpo(cfg)
    trained, _ = load_model(tmp_path / "run")
    before, after = preference_accuracy(base, made[0], "train"), preference_accuracy(trained, made[0], "train")
    print(f"training pairs' preference accuracy {before:.3f} → {after:.3f}")
    assert after > before + 0.2  # the optimization does what DPO says it does (0.531 → 0.856 observed)
    # Held out, a random-init 2-layer model moves little: preference accuracy 0.525 → 0.575–0.600 and reward
    # accuracy 0.55–0.68 on 40 pairs across corpus versions, within the noise of 40 pairs, so not asserted here.
    assert "val_accuracy" in log_rows(tmp_path / "run", "val_loss")[-1]


@pytest.mark.slow
@pytest.mark.parametrize("ref", ["copy", "adapter", "precompute"])
def test_two_ddp_processes_match_one_process(setup, ref):
    from tests.test_distributed import max_gap, xiaolm
    from tests.test_train_loop import losses

    tmp, data = setup
    args = [f"init_from={tmp / 'base'}", f"data.path={data}", f"data.val_path={data}", "data.seq_len=64",
            "device=cpu", "dtype=fp32", "max_steps=4", "lr=1e-3", "warmup_steps=0", "log_every=1", "eval_every=4",
            "save_every=4", f"dpo.ref={ref}", *(["lora.r=4", "lora.alpha=8"] if ref == "adapter" else [])]
    xiaolm(["dpo", f"out={tmp / 'single'}", "batch_size=4", *args])
    xiaolm(["dpo", f"out={tmp / 'multi'}", "batch_size=2", *args], processes=2)
    assert max_gap(losses(tmp / "single"), losses(tmp / "multi")) < 1e-5
    assert log_rows(tmp / "multi", "val_loss")[-1]["val_loss"] == pytest.approx(
        log_rows(tmp / "single", "val_loss")[-1]["val_loss"], abs=1e-5)
