"""End to end: the demo pipeline at toy size produces every stage's output, a chat-able model and a report."""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from xiaolm.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "scale=0.05", "vocab_size=600", "pretrain.max_steps=6", "sft.max_steps=4",
            "pretrain.eval_every=3", "pretrain.batch_size=4", "sft.batch_size=4", "eval_limit=8",
            "pretrain.model.dim=32", "pretrain.model.n_layers=1", "pretrain.model.n_heads=2",
            "pretrain.model.n_kv_heads=1", "dpo.max_steps=2", "dpo.batch_size=2", "dpo.eval_batches=1",
            "finetune.max_steps=2", "finetune.batch_size=4", "finetune.finetune.eval_records=3",
            "finetune.finetune.max_new_tokens=8", "reward.max_steps=2", "reward.batch_size=2",
            "reward.eval_batches=1", "grpo.max_steps=2", "grpo.batch_size=8", "grpo.grad_accum=1",
            "grpo.grpo.group_size=4", "grpo.rl.max_new_tokens=6", "grpo.rl.eval_prompts=4"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    for stage in ("corpus", "data/clean", "data/packed", "tokenizer", "pretrain", "sft", "dpo", "reward", "grpo",
                  "finetune", "finetune_scratch", "model"):
        assert (out / stage).is_dir(), stage
    for cfg in ("data/clean/config.yaml", "tokenizer/config.yaml", "pretrain/config.yaml", "sft/config.yaml"):
        assert (out / cfg).is_file(), cfg
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "perplexity" in report and "exact match" in report and "chance" in report
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["ppl"]["after_pretrain"] < results["ppl"]["before"]
    assert set(results["chat_exact"]) == {"sft", "dpo", "grpo", "finetune"}
    assert (out / "grpo" / "reward.png").is_file() and "grpo/reward.png" in report
    card = (out / "report_card.html").read_text(encoding="utf-8")  # make demo ends with the report card
    assert all(f"<td>{stage}</td>" in card for stage in ("pretrain", "sft", "dpo", "reward", "grpo", "finetune"))
    assert card.count("data:image/png;base64,") >= 7 and "exact match" in card
    assert results["reward"]["heldout"]["n"] == results["preference"]["after"]["n"] and "reward model" in report
    assert results["preference"]["after"]["n"] == len((out / "corpus" / "eval" / "preference.jsonl").read_text(
        encoding="utf-8").splitlines())
    assert "held-out preference pairs" in report and "triplet F1" in report and "untrained" in report
    AutoModelForCausalLM.from_pretrained(str(out / "model"))
    AutoTokenizer.from_pretrained(str(out / "model"))
    assert "xiaolm chat" in capsys.readouterr().out
    # PPO on the demo's prompts, rewarded by the exact answer and the demo's reward model (as `make demo-full`)
    with pytest.raises(SystemExit) as e:
        main(["ppo", "--config", str(Path(__file__).parents[1] / "configs" / "ppo.yaml"), f"init_from={out / 'dpo'}",
              f"out={out / 'ppo'}",
              f"data.path={out / 'corpus' / 'rl_prompts.jsonl'}", f"rl.reward_model={out / 'reward'}", "max_steps=2",
              "batch_size=4", "grad_accum=1", "eval_every=2", "save_every=2", "rl.max_new_tokens=6",
              "rl.eval_prompts=4", "data.val_fraction=0.2"])
    assert e.value.code == 0
    rows = [json.loads(line) for line in (out / "ppo" / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {"reward_model", "reward_exact", "kl", "entropy", "value_loss"} <= set(rows[0]) and "val_reward" in rows[-1]
    # a second run skips the finished training stages
    mtime = (out / "pretrain" / "done.json").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        main(argv)
    assert (out / "pretrain" / "done.json").stat().st_mtime_ns == mtime
