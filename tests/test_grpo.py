"""GRPO: group-relative advantages and the clipped token loss by hand, a reward that rises, exact resume (the
rollouts' sampling included), failing reward functions counted, bad prompts rejected, the KL guard, LoRA with
the adapter-disabled base as reference."""

import json
import logging
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.test_dpo import VOCAB, WORDS, capture_objectives, hf_dir, log_rows, write_jsonl
from tests.test_export import make_model
from xiaolm.errors import XiaolmError
from xiaolm.model.adapters import LoraSettings
from xiaolm.train.config import DataConfig, GRPOSettings, RLSettings, TrainConfig
from xiaolm.train.grpo import GRPOObjective, aggregate, clipped_surrogate, group_advantages, run_grpo

LIKED = "tests.rl_rewards:liked_share"


def prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choices(WORDS, k=2)) + "？", "answer": "很好"} for _ in range(n)]


@pytest.fixture
def setup(tmp_path, tiny_tokenizer_dir):
    hf_dir(tmp_path, tiny_tokenizer_dir, make_model(VOCAB))
    return tmp_path, write_jsonl(tmp_path / "prompts.jsonl", prompts(40))


def grpo_cfg(tmp, out, data, rl=None, grpo=None, **kw) -> TrainConfig:
    base = dict(out=str(tmp / out), init_from=str(tmp / "base"), max_steps=6, batch_size=8, grad_accum=2, lr=3e-3,
                warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, log_every=1, eval_every=100, save_every=100,
                device="cpu", dtype="fp32", data=DataConfig(path=str(data), val_fraction=0.2, seq_len=64),
                rl=rl or RLSettings(max_new_tokens=12, rewards=[LIKED], eval_prompts=8),
                grpo=grpo or GRPOSettings(group_size=4))
    base.update(kw)
    return TrainConfig(**base)


def test_group_advantages_clip_and_aggregation_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4, scale=True)
    std = torch.tensor([1.0, 0, 0, 0]).std()
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # a group scored alike teaches nothing
    assert torch.allclose(group_advantages(rewards, 4, scale=False)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    old = torch.zeros(2, 3)
    logps = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]]))
    loss, clipped = clipped_surrogate(logps, old, torch.tensor([1.0, -1.0]), 0.2, 0.2)
    # A > 0: min(ρ, clip ρ); A < 0: −max(ρ, clip ρ)... as −min(ρA, clip(ρ)A)
    assert torch.allclose(loss, torch.tensor([[-1.2, -1.0, -0.5], [1.5, 1.0, 0.8]]))
    assert clipped.tolist() == [[True, False, False], [False, False, True]]
    per_token = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(aggregate(per_token, mask, "grpo", 3, 1, 4)) == pytest.approx((1.5 + 3.0) / 2)
    assert float(aggregate(per_token, mask, "dapo", 3, 1, 4)) == pytest.approx(6 / 3)
    assert float(aggregate(per_token, mask, "dapo", 6, 2, 4)) == pytest.approx(6 * 2 / 6)  # ÷ accum by the loop
    assert float(aggregate(per_token, mask, "dr_grpo", 3, 1, 4)) == pytest.approx(6 / (2 * 4))


def test_grpo_raises_the_reward_and_best_keeps_the_highest(setup):
    tmp, data = setup
    summary = run_grpo(grpo_cfg(tmp, "run", data, max_steps=40, eval_every=20))
    rows = log_rows(tmp / "run")
    first, last = [r["reward"] for r in rows[:5]], [r["reward"] for r in rows[-5:]]
    assert sum(last) / 5 > sum(first) / 5 + 0.3, (first, last)
    assert {"reward_liked_share", "response_length", "finished", "clip_fraction", "groups_without_signal",
            "reward_failures"} <= set(rows[-1])
    evals = log_rows(tmp / "run", "val_reward")
    assert summary["best_val_reward"] == pytest.approx(max(r["val_reward"] for r in evals), abs=1e-6)
    assert json.loads((tmp / "run" / "best" / "best.json").read_text())["val_reward"] == summary["best_val_reward"]


def test_oversampling_trains_on_the_groups_that_differ_first():
    grpo = SimpleNamespace(oversample=2, settings=GRPOSettings(group_size=2))
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])  # groups: alike, differ, alike, differ
    rows, metrics = GRPOObjective.select_rows(grpo, rewards)
    assert rows == [2, 3, 6, 7] and metrics == {"sampled_groups_without_signal": 0.5}
    rows, _ = GRPOObjective.select_rows(grpo, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
    assert rows == [0, 1, 4, 5]  # too few differ: filled with the first group scored alike, in the order drawn
    grpo.oversample = 4
    rows, metrics = GRPOObjective.select_rows(grpo, torch.ones(8))
    assert rows == [0, 1] and metrics == {"sampled_groups_without_signal": 1.0}


@pytest.mark.parametrize("epochs,oversample", [(1, 1), (2, 1), (1, 3)])
def test_resume_after_interruption_is_exact_with_the_rollouts(setup, epochs, oversample):
    tmp, data = setup
    rl = RLSettings(max_new_tokens=12, rewards=[LIKED], eval_prompts=8, epochs=epochs)
    kw = dict(max_steps=6, save_every=1, eval_every=3, rl=rl, keep_last=10,
              grpo=GRPOSettings(group_size=4, oversample=oversample))
    run_grpo(grpo_cfg(tmp, "full", data, **kw))
    run_grpo(grpo_cfg(tmp, "killed", data, **kw))
    for step in (4, 5, 6):  # as if killed after saving step 3: with epochs=2, mid-way through a rollout's steps
        shutil.rmtree(tmp / "killed" / "checkpoints" / f"step-{step}")
    (tmp / "killed" / "latest").write_text("step-3\n")
    run_grpo(grpo_cfg(tmp, "killed", data, **kw), resume=True)
    assert log_rows(tmp / "killed") == log_rows(tmp / "full")
    assert log_rows(tmp / "killed", "val_reward") == log_rows(tmp / "full", "val_reward")
    a = load_file(str(tmp / "full" / "checkpoints" / "step-6" / "model.safetensors"))
    b = load_file(str(tmp / "killed" / "checkpoints" / "step-6" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    if epochs == 2:
        rows = log_rows(tmp / "full")
        assert rows[0]["reward"] == rows[1]["reward"] and rows[2]["reward"] == rows[3]["reward"]  # one rollout, 2 steps
    if oversample > 1:  # 3 × 4 prompts sampled a step, the 4 trained on picked by their rewards
        rows = log_rows(tmp / "full")
        assert all(r["groups_without_signal"] <= r["sampled_groups_without_signal"] for r in rows)
        assert any(r["groups_without_signal"] < r["sampled_groups_without_signal"] for r in rows)


def test_failing_reward_functions_are_counted_and_the_run_goes_on(setup, caplog):
    tmp, data = setup
    rl = RLSettings(max_new_tokens=12, rewards=[LIKED, "tests.rl_rewards:flaky"], eval_prompts=8)
    with caplog.at_level(logging.WARNING):
        summary = run_grpo(grpo_cfg(tmp, "run", data, rl=rl, max_steps=3))
    assert summary["steps"] == 3
    rows = log_rows(tmp / "run")
    assert rows[-1]["reward_failures"] >= 16 and rows[-1]["reward_flaky"] == 0  # 3 steps × 16 samples, all failing
    said = caplog.text
    assert "flaky raised ValueError" in said and "flaky returned float" not in said
    assert "returned NaN" in said.replace("nan", "NaN") or "returned None" in said or "returned str" in said


def test_bad_prompts_go_to_rejects_and_no_prompt_is_a_clear_error(setup):
    tmp, _ = setup
    bad = [{"prompt": "很好" * 40, "answer": "好"}, {"prompt": "你好？"}, {"messages": [{"role": "system",
           "content": "只有系统"}], "answer": "好"}, "not json", {"messages": [{"role": "user", "content": "今天？"},
           {"role": "assistant", "content": "很好"}]}]
    data = write_jsonl(tmp / "mixed.jsonl", prompts(10) + bad)
    rl = RLSettings(max_new_tokens=12, rewards=["exact", LIKED], eval_prompts=4)
    run_grpo(grpo_cfg(tmp, "run", data, rl=rl, max_steps=1))
    reasons = [json.loads(line)["reason"] for line in (tmp / "run" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(reasons) == sorted(["prompt_too_long", "no_answer", "no_user_turn", "bad_json"]), reasons
    only_bad = write_jsonl(tmp / "bad.jsonl", bad[:3])
    with pytest.raises(XiaolmError, match="need training and validation prompts"):
        run_grpo(grpo_cfg(tmp, "none", only_bad, rl=rl))
    with pytest.raises(XiaolmError, match="not a multiple of 3 samples"):
        run_grpo(grpo_cfg(tmp, "odd", data, grpo=GRPOSettings(group_size=3)))


def test_the_kl_guard_stops_and_rolls_back_to_best(setup):
    tmp, data = setup
    rl = RLSettings(max_new_tokens=12, rewards=[LIKED], eval_prompts=8, kl_stop=1e-3, kl_guard="rollback")
    summary = run_grpo(grpo_cfg(tmp, "run", data, rl=rl, max_steps=30, eval_every=1, lr=1e-2))
    assert summary["steps"] < 30 and "KL guard" in summary["stopped"] and "rolled back to best/" in summary["stopped"]
    rows = log_rows(tmp / "run", "kl")
    assert rows[-1]["kl"] > 1e-3 and all(r["kl"] <= 1e-3 for r in rows[:-1])
    last = (tmp / "run" / "latest").read_text().strip()
    a = load_file(str(tmp / "run" / "checkpoints" / last / "model.safetensors"))
    b = load_file(str(tmp / "run" / "best" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the last checkpoint holds the best weights again


def test_lora_grpo_uses_the_adapter_free_base_as_reference(setup, monkeypatch):
    from xiaolm.train import grpo

    made = capture_objectives(monkeypatch, grpo)
    tmp, data = setup
    rl = RLSettings(max_new_tokens=12, rewards=["tests.rl_rewards:long_reply"], eval_prompts=8)
    cfg = grpo_cfg(tmp, "lora", data, lora=LoraSettings(r=4, alpha=8), grpo=GRPOSettings(group_size=4, beta=0.1),
                   rl=rl, max_steps=4, lr=1e-2)
    summary = run_grpo(cfg)
    assert 0 < summary["trainable_params"] < summary["params"] / 4
    rows = log_rows(tmp / "lora")
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-6)  # adapters start at zero: the policy is the reference
    assert rows[-1]["kl"] > 0
    assert made[0].reference.mode == "adapter" and made[0].reference.copy is None  # no second model held
    assert (tmp / "lora" / "best" / "adapter_config.json").is_file()


def test_rollouts_run_under_bf16_autocast_with_fp32_weights(setup):
    tmp, data = setup  # as on a GPU with dtype=bf16: the KV cache has the weights' dtype, k/v come in bf16
    summary = run_grpo(grpo_cfg(tmp, "bf16", data, dtype="bf16", max_steps=2, eval_every=2))
    assert summary["steps"] == 2 and log_rows(tmp / "bf16")[-1]["response_length"] > 0
