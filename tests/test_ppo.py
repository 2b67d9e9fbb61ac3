"""PPO: GAE by hand, a reward that rises while the KL guard holds, exact resume with the value head over several
epochs per rollout, a reward model (ours, re-tokenized by its own tokenizer) as the reward, LoRA with the
adapter-disabled base as reference."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.test_dpo import VOCAB, capture_objectives, hf_dir, log_rows, write_jsonl
from tests.test_export import make_model
from tests.test_grpo import prompts
from xiaolm.model.adapters import LoraSettings
from xiaolm.model.export import load_reward_model
from xiaolm.model.reward import RewardModel, reward_batch, save_reward_model
from xiaolm.tokenizer import load_tokenizer
from xiaolm.tokenizer.chat import encode_chat
from xiaolm.train import ppo
from xiaolm.train.config import DataConfig, PPOSettings, RLSettings, TrainConfig
from xiaolm.train.ppo import gae, run_ppo
from xiaolm.train.rewards import Rewards

LONG = "tests.rl_rewards:long_reply"


@pytest.fixture
def setup(tmp_path, tiny_tokenizer_dir):
    hf_dir(tmp_path, tiny_tokenizer_dir, make_model(VOCAB))
    return tmp_path, write_jsonl(tmp_path / "prompts.jsonl", prompts(40))


def ppo_cfg(tmp, out, data, rl=None, **kw) -> TrainConfig:
    base = dict(out=str(tmp / out), init_from=str(tmp / "base"), max_steps=6, batch_size=8, grad_accum=2, lr=3e-3,
                warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, log_every=1, eval_every=100, save_every=100,
                device="cpu", dtype="fp32", data=DataConfig(path=str(data), val_fraction=0.2, seq_len=64),
                rl=rl or RLSettings(max_new_tokens=12, rewards=[LONG], eval_prompts=8), ppo=PPOSettings())
    base.update(kw)
    return TrainConfig(**base)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 5.0]])
    values = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[False, True, True, False], [False, False, True, True]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # λ = γ = 1: the advantage is the sum of the rewards still to come minus the value; padding is 0
    assert torch.allclose(adv, torch.tensor([[0, 3 - 0.5, 2 - 0.5, 0], [0, 0, 8 - 1, 5 - 1]]))
    assert torch.allclose(ret, torch.tensor([[0, 3.0, 2.0, 0], [0, 0, 8.0, 5.0]]))
    adv0, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)  # λ = 0: one-step TD errors
    assert torch.allclose(adv0[0, 1:3], torch.tensor([1 + 0.5 - 0.5, 2 + 0 - 0.5]))


def test_ppo_raises_the_reward_with_kl_under_the_guard(setup):
    tmp, data = setup
    # the format reward (an answer that ends by itself): about 5% of a random model's answers do at first
    rl = RLSettings(max_new_tokens=12, rewards=["format"], eval_prompts=8, epochs=2, kl_stop=20.0)
    summary = run_ppo(ppo_cfg(tmp, "run", data, rl=rl, max_steps=80, eval_every=40, lr=1e-3))
    assert "stopped" not in summary
    rows = log_rows(tmp / "run")
    first, last = [r["reward"] for r in rows[:10]], [r["reward"] for r in rows[-10:]]
    assert sum(last) / 10 > sum(first) / 10 + 0.04, (first, last)
    assert {"kl", "kl_penalty", "entropy", "value", "value_loss", "policy_loss", "clip_fraction", "response_length",
            "value_clip_fraction"} <= set(rows[-1])
    assert all(r["kl"] < 20.0 for r in rows) and rows[-1]["kl"] > 0
    assert (tmp / "run" / "best" / "heads.safetensors").is_file()  # the value head travels with the weights
    assert set(load_file(str(tmp / "run" / "best" / "heads.safetensors"))) == {"value.weight", "value.bias"}


def test_resume_after_interruption_is_exact_with_the_value_head(setup):
    tmp, data = setup
    rl = RLSettings(max_new_tokens=12, rewards=[LONG], eval_prompts=8, epochs=2)
    kw = dict(max_steps=6, save_every=1, eval_every=3, rl=rl, keep_last=10)
    run_ppo(ppo_cfg(tmp, "full", data, **kw))
    run_ppo(ppo_cfg(tmp, "killed", data, **kw))
    for step in (4, 5, 6):  # killed after step 3: in the middle of a rollout's two epochs
        shutil.rmtree(tmp / "killed" / "checkpoints" / f"step-{step}")
    (tmp / "killed" / "latest").write_text("step-3\n")
    run_ppo(ppo_cfg(tmp, "killed", data, **kw), resume=True)
    assert log_rows(tmp / "killed") == log_rows(tmp / "full")
    for name in ("model.safetensors", "heads.safetensors"):
        a = load_file(str(tmp / "full" / "checkpoints" / "step-6" / name))
        b = load_file(str(tmp / "killed" / "checkpoints" / "step-6" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_reward_model_scores_in_its_own_tokenizer(setup):
    tmp, data = setup
    torch.manual_seed(3)
    rm = RewardModel(make_model(VOCAB)).eval()
    out = tmp / "rm"
    out.mkdir()
    save_reward_model(rm.lm.state_dict(), rm.score.weight, rm.lm.cfg, out)
    for f in (tmp / "base").iterdir():
        if f.name.startswith("tokenizer") or f.name.startswith("special"):
            shutil.copy2(f, out / f.name)
    loaded, tok = load_reward_model(out)
    rewards = Rewards([], [], loaded, tok)
    conversation = [{"role": "user", "content": "今天天气？"}]
    ours = rewards.model_scores([conversation], ["很好。"])
    ids, labels = encode_chat(load_tokenizer(out), [*conversation, {"role": "assistant", "content": "很好。"}])
    batch = reward_batch([(torch.tensor(ids).numpy(), torch.tensor(labels).numpy())], 0)
    with torch.no_grad():
        assert float(ours[0]) == pytest.approx(float(loaded(batch["x"], batch["last"])[0]), abs=1e-6)
    rl = RLSettings(max_new_tokens=12, rewards=[], reward_model=str(out), eval_prompts=4)
    run_ppo(ppo_cfg(tmp, "run", data, rl=rl, max_steps=2))
    rows = log_rows(tmp / "run")
    assert all("reward_model" in r and r["reward"] == pytest.approx(r["reward_model"], abs=1e-5) for r in rows)


def test_lora_ppo_keeps_one_model_and_saves_adapter_and_value_head(setup, monkeypatch):
    tmp, data = setup
    made = capture_objectives(monkeypatch, ppo)
    summary = run_ppo(ppo_cfg(tmp, "lora", data, lora=LoraSettings(r=4, alpha=8), max_steps=3, eval_every=3))
    assert made[0].reference.mode == "adapter" and made[0].reference.copy is None
    assert 0 < summary["trainable_params"] < summary["params"] / 4
    assert (tmp / "lora" / "best" / "adapter_config.json").is_file()
    assert (tmp / "lora" / "best" / "heads.safetensors").is_file()
    assert log_rows(tmp / "lora")[0]["kl"] == pytest.approx(0, abs=1e-6)
