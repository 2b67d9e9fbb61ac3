"""`xiaolm demo` honours the settings it is given or refuses them by name; one seed reaches every stage."""

from pathlib import Path

import pytest

import xiaolm.data.demo.corpus as corpus
import xiaolm.train.pretrain as pretrain
from xiaolm.cli import main
from xiaolm.config import load_config
from xiaolm.demo import DEMO_SETS, DemoConfig, demo_stage_configs, run_demo

TINY = ["scale=0.05", "vocab_size=600", "pretrain.model.dim=32", "pretrain.model.n_layers=1",
        "pretrain.model.n_heads=2", "pretrain.model.n_kv_heads=1"]


class Stop(Exception):
    """Raised by a stand-in stage: the test has seen what it wanted."""


def demo_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["demo", *argv])
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("key", [k + ".dim" if k.endswith(".model") else k for k in DEMO_SETS])
def test_a_key_the_demo_sets_itself_is_refused_by_name(key, tmp_path, monkeypatch, capsys):
    def started(*args, **kwargs):
        raise AssertionError(f"the demo ran, overriding {key}")

    monkeypatch.setattr(corpus, "build_demo_corpus", started)
    value = 64 if key.endswith(("vocab_size", "dim")) else tmp_path / "elsewhere"
    line = demo_error(["--out", str(tmp_path / "demo"), f"{key}={value}"], capsys)
    assert f"{key} is set by the demo" in line
    assert "xiaolm pretrain" in line if key == "pretrain.out" else True
    assert not (tmp_path / "demo").exists()


CORPUS = {key: Path(f"corpus/{key}.jsonl") for key in ("sft", "preference", "preference_val", "extraction",
                                                        "rl_prompts")}


def test_a_stage_seed_you_set_is_kept_and_the_demo_seed_reaches_the_others(tmp_path):
    stages = demo_stage_configs(load_config(DemoConfig, None, ["seed=7", "pretrain.seed=3", "finetune.seed=4"]),
                                tmp_path, CORPUS)
    assert {k: c.seed for k, c in stages.items()} == {"pretrain": 3, "sft": 7, "dpo": 7, "reward": 7, "grpo": 7,
                                                      "finetune": 4, "finetune_scratch": 4}
    stages = demo_stage_configs(load_config(DemoConfig, None, ["seed=7"]), tmp_path, CORPUS)
    assert {c.seed for c in stages.values()} == {7}


def test_the_default_demo_joins_its_stages(tmp_path):
    stages = demo_stage_configs(DemoConfig(), tmp_path, CORPUS)
    pre, sft, dpo, reward, grpo, fine, scratch = stages.values()
    assert {c.seed for c in stages.values()} == {0}
    assert (pre.out, pre.data.path, pre.data.tokenizer) == (str(tmp_path / "pretrain"),
                                                             str(tmp_path / "data" / "packed"),
                                                             str(tmp_path / "tokenizer"))
    assert (sft.out, sft.init_from, sft.data.path) == (str(tmp_path / "sft"), pre.out, str(CORPUS["sft"]))
    assert (dpo.init_from, dpo.data.path, dpo.data.val_path) == (sft.out, str(CORPUS["preference"]),
                                                                 str(CORPUS["preference_val"]))
    assert (reward.init_from, reward.data.path, reward.data.val_path) == (dpo.out, str(CORPUS["preference"]),
                                                                          str(CORPUS["preference_val"]))
    assert (grpo.init_from, grpo.data.path, grpo.out) == (dpo.out, str(CORPUS["rl_prompts"]), str(tmp_path / "grpo"))
    assert (fine.init_from, fine.data.path, fine.data.chat_path) == (dpo.out, str(CORPUS["extraction"]),
                                                                    str(CORPUS["sft"]))
    assert fine.finetune.chat_mix > 0 and scratch.finetune == fine.finetune and scratch.max_steps == fine.max_steps
    # the ablation: the same fine-tune from nothing, a model of the pretrained shape and the demo's tokenizer
    assert (scratch.init_from, scratch.model, scratch.data.tokenizer) == ("", pre.model, str(tmp_path / "tokenizer"))
    assert scratch.out != fine.out and scratch.data.path == fine.data.path
    assert DemoConfig().pretrain.out == "runs/train"  # resolving leaves the settings as they were


def test_the_demo_seed_reaches_the_corpus_and_a_pretrain_seed_reaches_pretraining(tmp_path, monkeypatch):
    seen = {}
    build = corpus.build_demo_corpus

    def record_corpus(out_dir, seed=0, scale=1.0, **kw):
        seen["corpus"] = seed
        return build(out_dir, seed=seed, scale=scale, **kw)

    def record_pretrain(cfg, resume=False):
        seen["pretrain"] = cfg.seed
        raise Stop

    monkeypatch.setattr(corpus, "build_demo_corpus", record_corpus)
    monkeypatch.setattr(pretrain, "run_pretrain", record_pretrain)
    with pytest.raises(Stop):
        run_demo(load_config(DemoConfig, None, [*TINY, "seed=2", "pretrain.seed=5"]), Path(tmp_path / "demo"))
    assert seen == {"corpus": 2, "pretrain": 5}


def test_eval_limit_keeps_the_first_items_of_each_kind():
    from xiaolm.demo import first_of_each_kind

    items = [{"kind": k, "i": i} for i, k in enumerate("aaabbbccc")]
    assert [x["i"] for x in first_of_each_kind(items, 2)] == [0, 1, 3, 4, 6, 7]
    assert first_of_each_kind(items, 0) == items
