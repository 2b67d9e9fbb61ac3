"""Reward model: learns which answer of a pair is preferred (held-out pairwise accuracy), resumes bitwise with its
head, and exports as an AutoModelForSequenceClassification that scores exactly as ours."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.test_dpo import VOCAB, dpo_cfg, hf_dir, log_rows, make_pairs, write_jsonl
from tests.test_export import make_model
from xiaolm.errors import XiaolmError
from xiaolm.eval.tasks import evaluate
from xiaolm.model.export import export_hf, load_model, load_reward_model
from xiaolm.model.reward import RewardModel, answer_end, reward_batch
from xiaolm.tokenizer import load_tokenizer
from xiaolm.tokenizer.chat import encode_pair
from xiaolm.train import reward
from xiaolm.train.reward import bradley_terry


@pytest.fixture
def setup(tmp_path, tiny_tokenizer_dir):
    hf_dir(tmp_path, tiny_tokenizer_dir, make_model(VOCAB))
    # make_pairs: the chosen answer ends in "。", the rejected one in "！": a rule a reward model can learn
    train = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(48, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", make_pairs(16, seed=2))
    return tmp_path, train, val


def test_the_head_reads_the_answers_last_token_and_rows_are_right_padded(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    chosen, rejected = encode_pair(tok, {"prompt": "你好？", "chosen": "世界很好。", "rejected": "不！"}, 64)
    batch = reward_batch([chosen, rejected], pad_id=0)
    for row, example in enumerate((chosen, rejected)):
        end = answer_end(example)
        assert tok.convert_ids_to_tokens(int(example[0][end])) == "<|im_end|>"
        assert int(batch["last"][row]) == end and batch["x"][row, :end + 1].tolist() == example[0][:end + 1].tolist()
        assert not batch["x"][row, end + 1:].any()  # right padding with pad id 0


def test_reward_model_learns_the_preference_and_best_keeps_the_highest_accuracy(setup):
    tmp, train, val = setup
    cfg = dpo_cfg(tmp, "rm", train, val, max_steps=40, batch_size=8, lr=3e-3, eval_every=20, save_every=20,
                  eval_batches=2)
    reward.run_reward(cfg)
    evals = log_rows(tmp / "rm", "val_accuracy")
    tok = load_tokenizer(tmp / "base")
    pairs = [encode_pair(tok, json.loads(line), 64) for line in val.read_text().splitlines()]
    batch = reward_batch([p[0] for p in pairs] + [p[1] for p in pairs], pad_id=0)

    def accuracy(model) -> float:
        with torch.no_grad():
            return float(bradley_terry(model(batch["x"], batch["last"]))[1]["accuracy"])

    torch.manual_seed(cfg.seed)  # the head as the run starts it
    untrained = RewardModel(load_model(tmp / "base")[0]).eval()
    assert accuracy(untrained) < 0.8  # about chance (0.5) before training
    assert accuracy(load_reward_model(tmp / "rm" / "best")[0]) == evals[-1]["val_accuracy"] >= 0.9
    result, _ = evaluate(str(tmp / "rm" / "best"), "preference", str(val), device="cpu", seq_len=64)
    assert result["accuracy"] == evals[-1]["val_accuracy"] and result["score"].startswith("reward model")
    best = json.loads((tmp / "rm" / "best" / "best.json").read_text())
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in evals)
    assert (tmp / "rm" / "best" / "heads.safetensors").is_file()


def test_resume_after_interruption_is_bitwise_with_the_head(setup):
    tmp, train, val = setup
    kw = dict(max_steps=6, save_every=2, eval_every=3, batch_size=4)
    reward.run_reward(dpo_cfg(tmp, "full", train, val, **kw))
    reward.run_reward(dpo_cfg(tmp, "killed", train, val, **kw))
    shutil.rmtree(tmp / "killed" / "checkpoints" / "step-6")
    (tmp / "killed" / "latest").write_text("step-4\n")
    reward.run_reward(dpo_cfg(tmp, "killed", train, val, **kw), resume=True)
    assert log_rows(tmp / "killed") == log_rows(tmp / "full")
    assert log_rows(tmp / "killed", "val_accuracy") == log_rows(tmp / "full", "val_accuracy")
    for name in ("model.safetensors", "heads.safetensors"):
        a = load_file(str(tmp / "full" / "checkpoints" / "step-6" / name))
        b = load_file(str(tmp / "killed" / "checkpoints" / "step-6" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_loads_as_sequence_classification_with_the_same_scores(setup):
    from transformers import AutoModelForSequenceClassification

    tmp, train, val = setup
    reward.run_reward(dpo_cfg(tmp, "rm", train, val, max_steps=4, batch_size=4))
    out = export_hf(tmp / "rm", tmp / "exported")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    ours, tok = load_reward_model(tmp / "rm")
    again, _ = load_reward_model(out)  # our loader reads the export back too
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.num_labels == 1
    examples = [side for record in make_pairs(3, seed=5) for side in encode_pair(tok, record, 64)]
    batch = reward_batch(examples, pad_id=hf.config.pad_token_id)
    with torch.no_grad():
        theirs = hf(input_ids=batch["x"], attention_mask=batch["mask"].long()).logits.squeeze(-1)
        mine = ours(batch["x"], batch["last"])
        reread = again(batch["x"], batch["last"])
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    assert torch.equal(mine, reread)
    assert mine.std() > 0  # distinct answers, distinct scores: the comparison is not of constants


def test_a_reward_model_is_not_loaded_as_a_causal_lm_and_init_from_is_required(setup):
    tmp, train, val = setup
    reward.run_reward(dpo_cfg(tmp, "rm", train, val, max_steps=2, batch_size=4))
    out = export_hf(tmp / "rm", tmp / "exported")
    with pytest.raises(XiaolmError, match="reward model"):
        load_model(out)
    with pytest.raises(XiaolmError, match="not a reward model"):
        load_reward_model(tmp / "base")
    with pytest.raises(XiaolmError, match="init_from"):
        reward.run_reward(dpo_cfg(tmp, "x", train, val, init_from=""))
