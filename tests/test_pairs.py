"""`xiaolm data pairs --from-sft`: the reference answer chosen, the model's own answer rejected; an answer equal to
the reference is dropped and counted; unusable chats go to rejects with file:line; the pairs train a reward model."""

import json
import subprocess
import sys

from tests.test_dpo import VOCAB, hf_dir, write_jsonl
from tests.test_export import make_model
from xiaolm.infer.generate import GenerationConfig, chat_stop_ids, generate_batch
from xiaolm.infer.pairs import build_pairs
from xiaolm.model.export import load_model
from xiaolm.tokenizer import encode_prompt


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_pairs_reject_the_models_answer_and_drop_identical_ones(tmp_path, tiny_tokenizer_dir):
    base = hf_dir(tmp_path, tiny_tokenizer_dir, make_model(VOCAB))
    model, tok = load_model(base)
    greedy = GenerationConfig(max_new_tokens=8, temperature=0, stop_ids=chat_stop_ids(tok))
    own = tok.decode(generate_batch(model, [encode_prompt(tok, [{"role": "user", "content": "世界？"}])], greedy)[0],
                     skip_special_tokens=True).strip()
    assert own  # the random model says something, so the identical case below is real
    records = [chat("你好？", "你好，很高兴认识你。") | {"id": "a"}, chat("世界？", own) | {"id": "b"},
               {"messages": [{"role": "user", "content": "只有问题"}]}, chat("今天？", "今天天气很好。") | {"id": "c"}]
    data = write_jsonl(tmp_path / "chats.jsonl", [*records, "{not json"])
    report = build_pairs(str(base), [str(data)], tmp_path / "pairs", GenerationConfig(max_new_tokens=8, temperature=0),
                         batch_size=2, device="cpu")
    pairs = [json.loads(line) for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert [p["id"] for p in pairs] == ["a", "c"] and report["pairs"] == 2
    assert report["dropped"] == {"identical": 1, "empty_answer": 0}
    for pair, record in zip(pairs, (records[0], records[3]), strict=True):
        assert pair["chosen"] == record["messages"][-1]["content"]
        assert pair["messages"] == record["messages"][:-1] and pair["rejected"] and pair["rejected"] != pair["chosen"]
    rejects = [json.loads(line) for line in (tmp_path / "pairs" / "rejects.jsonl").read_text().splitlines()]
    assert {(r["reason"], r["where"]) for r in rejects} == {("no_reference_answer", f"{data}:3"),
                                                            ("bad_json", f"{data}:5")}
    assert json.loads((tmp_path / "pairs" / "report.json").read_text())["rejected"] == 2


def test_pairs_command_is_seeded_and_feeds_the_reward_stage(tmp_path, tiny_tokenizer_dir):
    from tests.test_dpo import dpo_cfg
    from xiaolm.train.reward import run_reward

    base = hf_dir(tmp_path, tiny_tokenizer_dir, make_model(VOCAB))
    data = write_jsonl(tmp_path / "chats.jsonl", [chat(f"问题{i}？", f"回答{i}很好。") for i in range(12)])
    outs = []
    for name in ("p1", "p2"):
        cmd = [sys.executable, "-m", "xiaolm", "data", "pairs", str(data), "--from-sft", str(base), "--out",
               str(tmp_path / name), "--max-new-tokens", "6", "--seed", "3", "--device", "cpu"]
        subprocess.run(cmd, check=True, capture_output=True)
        outs.append((tmp_path / name / "pairs.jsonl").read_text())
    assert outs[0] == outs[1] and len(outs[0].splitlines()) >= 10  # same seed, same sampled answers
    run_reward(dpo_cfg(tmp_path, "rm", tmp_path / "p1" / "pairs.jsonl", max_steps=2, batch_size=4))
    assert (tmp_path / "rm" / "best" / "heads.safetensors").is_file()
