"""`xiaolm demo`: the whole pipeline on the embedded corpus, one folder per stage, ending in a report."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from xiaolm.config import config_to_dict, save_config
from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_write_json
from xiaolm.model.llama import LlamaConfig
from xiaolm.model.registry import get_arch
from xiaolm.model.t5 import T5Config
from xiaolm.train.config import DataConfig, FinetuneSettings, GRPOSettings, RLSettings, TrainConfig

log = logging.getLogger(__name__)


def _demo_model() -> LlamaConfig:
    return LlamaConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256)


def _demo_t5() -> T5Config:
    """The text-to-text demo model: 2 encoder + 2 decoder blocks, 4.07M parameters against the Llama's 4.00M at
    the demo's vocabulary (the same width; a ReLU feed-forward of the SwiGLU's hidden width)."""
    return T5Config(dim=256, n_layers=2, n_heads=4, head_dim=64, ffn_dim=704, max_seq_len=256)


@dataclass
class DemoModel:
    """`model.arch=t5` runs the demo on the text-to-text path with _demo_t5's shape (unless pretrain.model.arch
    is set too, which then takes pretrain.model.* as given)."""

    arch: str = "llama"


def _pretrain() -> TrainConfig:
    return TrainConfig(max_steps=600, batch_size=16, lr=2e-3, warmup_steps=30, log_every=10, eval_every=150,
                       save_every=150, model=_demo_model(), data=DataConfig(seq_len=256))


def _sft() -> TrainConfig:
    return TrainConfig(max_steps=350, batch_size=6, lr=1e-3, warmup_steps=10, log_every=10, eval_every=100,
                       save_every=100, data=DataConfig(seq_len=256, val_fraction=0.02))


def _dpo() -> TrainConfig:
    return TrainConfig(max_steps=60, batch_size=8, lr=1e-4, min_lr_ratio=1.0, warmup_steps=5, weight_decay=0.0,
                       log_every=10, eval_every=60, eval_batches=13, save_every=60, data=DataConfig(seq_len=256))


def _reward() -> TrainConfig:
    return TrainConfig(max_steps=100, batch_size=8, lr=1e-4, warmup_steps=5, weight_decay=0.0, log_every=10,
                       eval_every=50, eval_batches=13, save_every=100, data=DataConfig(seq_len=256))


def _grpo() -> TrainConfig:
    return TrainConfig(max_steps=60, batch_size=16, grad_accum=2, lr=1e-4, min_lr_ratio=1.0, warmup_steps=5,
                       weight_decay=0.0, log_every=1, eval_every=30, save_every=60,
                       data=DataConfig(seq_len=128, val_fraction=0.1),
                       rl=RLSettings(max_new_tokens=16, rewards=["exact", "format"], reward_weights=[1.0, 0.1],
                                     eval_prompts=40),
                       grpo=GRPOSettings(group_size=8))


def _finetune() -> TrainConfig:
    return TrainConfig(max_steps=100, batch_size=16, lr=5e-4, warmup_steps=10, log_every=10, eval_every=100,
                       eval_batches=2, save_every=100, data=DataConfig(seq_len=256, val_fraction=0.1),
                       finetune=FinetuneSettings(chat_mix=0.25, eval_records=40, max_new_tokens=96))


@dataclass
class DemoConfig:
    """Settings of the demo pipeline; every stage's own keys sit under its name.

    `seed` seeds every stage: the corpus, the pack split, pretrain, sft, dpo, reward, grpo and finetune. A stage
    seed you set (`sft.seed=3`: other than its default 0) is kept for that stage instead. The keys by which the
    demo joins its stages (each stage's `out`, data files, `data.tokenizer`, `init_from`;
    `pretrain.model.vocab_size`, which the tokenizer decides; the later stages' `model`, which is the pretrained
    model's) are refused by name when set.
    `reward` (a reward model) and `grpo` (RL on numeral and arithmetic prompts) start from the DPO model; `finetune`
    runs twice: on the DPO model, and from an untrained model of the same shape (the ablation).
    """

    seed: int = 0
    scale: float = 1.0  # amount of corpus text generated / sampled
    vocab_size: int = 4096
    cjk_chars: bool = True  # character-level Chinese: tiny models learn numerals and facts much faster
    eval_limit: int = 0  # evaluate only the first N items of each kind of each set (0 = all)
    model: DemoModel = field(default_factory=DemoModel)  # model.arch=t5: the text-to-text path (no reward model)
    pretrain: TrainConfig = field(default_factory=_pretrain)
    sft: TrainConfig = field(default_factory=_sft)
    dpo: TrainConfig = field(default_factory=_dpo)
    reward: TrainConfig = field(default_factory=_reward)
    grpo: TrainConfig = field(default_factory=_grpo)
    finetune: TrainConfig = field(default_factory=_finetune)


STAGES = ("pretrain", "sft", "dpo", "reward", "grpo", "finetune")
JOINS = ("out", "data.path", "data.val_path", "data.tokenizer", "data.chat_path", "data.chat_val_path", "init_from")
# keys the demo sets itself, joining its stages → (what decides them, what to do instead); {stage} is the stage
DEMO_SETS = {
    **{f"{stage}.{key}": ("its stages run under --out",
                          "use --out to move the whole run, or run `xiaolm {stage}` yourself")
       for stage in STAGES for key in JOINS},
    "pretrain.model.vocab_size": ("the size of the tokenizer it trains", "use vocab_size=N"),
    **{f"{stage}.model": (f"{stage} continues the pretrained model", "set pretrain.model.* instead")
       for stage in STAGES[1:]},
}


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return flat


def check_demo_config(cfg: DemoConfig) -> None:
    """Refuse, by name, a setting the demo would override (see DemoConfig)."""
    given, default = _flat(config_to_dict(cfg)), _flat(config_to_dict(DemoConfig()))
    changed = [k for k in {**default, **given} if given.get(k) != default.get(k)]
    for prefix, (why, hint) in DEMO_SETS.items():
        for key in changed:
            if key == prefix or key.startswith(prefix + "."):
                stage = prefix.split(".")[0]
                raise XiaolmError(f"{key} is set by the demo ({why})", hint=hint.format(stage=stage))


def demo_stage_configs(cfg: DemoConfig, out: Path, corpus: dict[str, Path]) -> dict[str, TrainConfig]:
    """The training stages the demo runs, by name: joined under `out`, seeded by the rule of DemoConfig.

    pretrain → sft → dpo → reward, grpo and finetune (triplets, chat mixed in) from the DPO model, and
    finetune_scratch: the same fine-tune from an untrained model of the pretrained shape.
    """
    defaults = DemoConfig()

    def seeded(stage: str, **changes: Any) -> TrainConfig:
        own = getattr(cfg, stage)
        seed = cfg.seed if own.seed == getattr(defaults, stage).seed else own.seed
        return replace(own, seed=seed, out=str(out / changes.pop("name", stage)), **changes)

    model = cfg.pretrain.model
    if get_arch(cfg.model.arch).encoder_decoder and model.arch != cfg.model.arch:
        model = _demo_t5()
    elif cfg.model.arch != "llama" and model.arch != cfg.model.arch:
        raise XiaolmError(f"model.arch={cfg.model.arch!r}: the demo runs llama or t5", where="model.arch")
    pre = seeded("pretrain", model=model, data=replace(cfg.pretrain.data, path=str(out / "data" / "packed"),
                                                       tokenizer=str(out / "tokenizer")))
    sft = seeded("sft", init_from=pre.out, data=replace(cfg.sft.data, path=str(corpus["sft"])))
    dpo = seeded("dpo", init_from=sft.out, data=replace(cfg.dpo.data, path=str(corpus["preference"]),
                                                        val_path=str(corpus["preference_val"])))
    reward = seeded("reward", init_from=dpo.out, data=replace(cfg.reward.data, path=str(corpus["preference"]),
                                                              val_path=str(corpus["preference_val"])))
    grpo = seeded("grpo", init_from=dpo.out, data=replace(cfg.grpo.data, path=str(corpus["rl_prompts"])))
    fine_data = replace(cfg.finetune.data, path=str(corpus["extraction"]), chat_path=str(corpus["sft"]))
    finetune = seeded("finetune", init_from=dpo.out, data=fine_data)
    scratch = seeded("finetune", name="finetune_scratch", model=pre.model,
                     data=replace(fine_data, tokenizer=str(out / "tokenizer")))
    return {"pretrain": pre, "sft": sft, "dpo": dpo, "reward": reward, "grpo": grpo, "finetune": finetune,
            "finetune_scratch": scratch}


def _stage_done(run_dir: Path, max_steps: int, needs: str = "") -> bool:
    done = run_dir / "done.json"
    return (done.is_file() and json.loads(done.read_text(encoding="utf-8")).get("steps") == max_steps
            and (not needs or (run_dir / needs).is_file()))


def run_demo(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """Run or resume every stage under `out`; return the collected results (also in report.md)."""
    from xiaolm.data.clean import CleanConfig, clean_files
    from xiaolm.data.demo.corpus import build_demo_corpus
    from xiaolm.data.pack import pack_files
    from xiaolm.eval.perplexity import perplexity_by_source
    from xiaolm.eval.preference import preference_accuracy, reward_accuracy
    from xiaolm.eval.qa import choice_accuracy, exact_match
    from xiaolm.eval.report import write_report
    from xiaolm.eval.report_card import write_report_card
    from xiaolm.model.export import export_hf, load_model, load_reward_model
    from xiaolm.model.registry import build_model_from_config
    from xiaolm.records.read import read_items
    from xiaolm.tokenizer import load_tokenizer, train_tokenizer
    from xiaolm.train.dpo import run_dpo
    from xiaolm.train.finetune import run_finetune
    from xiaolm.train.grpo import run_grpo
    from xiaolm.train.metrics import plot_losses
    from xiaolm.train.pretrain import run_pretrain
    from xiaolm.train.reward import run_reward
    from xiaolm.train.sft import run_sft

    check_demo_config(cfg)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    results: dict[str, Any] = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                                          f"torch {torch.__version__}"}

    log.info("demo [1/12] corpus: building the embedded corpus and the fictional world")
    corpus_dir = out / "corpus"
    corpus_done = corpus_dir / "done.json"
    paths = ({k: Path(v) for k, v in json.loads(corpus_done.read_text(encoding="utf-8")).items()}
             if corpus_done.is_file() else {})
    if "rl_prompts" not in paths:  # not built yet, or by a version without the later stages' files
        paths = build_demo_corpus(corpus_dir, seed=cfg.seed, scale=cfg.scale)
        atomic_write_json(corpus_done, {k: str(v) for k, v in paths.items()})
    results["world"] = json.loads(Path(paths["world_summary"]).read_text(encoding="utf-8"))
    stages = demo_stage_configs(cfg, out, paths)
    pre, sft = stages["pretrain"], stages["sft"]
    results["arch"] = pre.model.arch

    log.info("demo [2/12] data clean: normalize, convert to Simplified, filter, deduplicate")
    raw = paths["raw_text"]
    clean_dir = out / "data" / "clean"
    results["clean"] = clean_files([str(raw)], clean_dir, CleanConfig())

    log.info("demo [3/12] tokenizer: byte-level BPE, vocab %d", cfg.vocab_size)
    tok_dir = out / "tokenizer"
    train_tokenizer([str(clean_dir)], tok_dir, vocab_size=cfg.vocab_size, cjk_chars=cfg.cjk_chars)
    tokenizer = load_tokenizer(tok_dir)
    results["vocab_size"] = len(tokenizer)

    log.info("demo [4/12] pack: token files for pretraining")
    results["pack"] = pack_files([str(clean_dir)], tok_dir, out / "data" / "packed", val_fraction=0.02,
                                 seed=cfg.seed)

    val = read_items(paths["val_text"])
    ppl: dict[str, float] = {}
    by_source: dict[str, dict[str, float]] = {}

    def measure(when: str, model: torch.nn.Module) -> None:
        result = perplexity_by_source(model, tokenizer, val, pre.data.seq_len)
        ppl[when] = result["ppl"]
        for source, r in result["by_source"].items():
            by_source.setdefault(source, {})[when] = r["ppl"]

    torch.manual_seed(pre.seed)
    measure("before", build_model_from_config(dataclasses.replace(pre.model, vocab_size=len(tokenizer))))

    log.info("demo [5/12] pretrain")
    results["pretrain"] = _train_stage(run_pretrain, pre)
    measure("after_pretrain", load_model(pre.out)[0])

    log.info("demo [6/12] sft: chat fine-tuning, loss on assistant tokens only")
    results["sft"] = _train_stage(run_sft, sft)
    results["sft_records"] = len(read_items(paths["sft"]))

    log.info("demo [7/12] export: Hugging Face model directory")
    model_dir = export_hf(sft.out, out / "model", dtype="fp32")
    results["model_dir"] = str(model_dir)

    log.info("demo [8/12] eval: perplexity, held-out exact match, multiple choice")
    model, tokenizer = load_model(model_dir)
    measure("after_sft", model)
    results["ppl"], results["ppl_by_source"] = ppl, by_source
    qa = first_of_each_kind(read_items(paths["eval_qa"]), cfg.eval_limit)
    results["exact"] = exact_match(model, tokenizer, qa)
    results["choice"] = choice_accuracy(model, tokenizer,
                                        first_of_each_kind(read_items(paths["eval_choice"]), cfg.eval_limit))
    results["samples"] = _sample_chats(model, tokenizer)
    results["chat_exact"] = {"sft": _accuracies(results["exact"])}

    log.info("demo [9/12] dpo: preference pairs, judged on pairs about entities and sums no training pair has")
    pairs = read_items(paths["preference_val"])
    results["preference"] = {"before": preference_accuracy(model, tokenizer, pairs)}
    results["dpo"] = _train_stage(run_dpo, stages["dpo"])
    model = load_model(stages["dpo"].out, with_tokenizer=False)[0]
    results["preference"]["after"] = preference_accuracy(model, tokenizer, pairs)
    results["chat_exact"]["dpo"] = _accuracies(exact_match(model, tokenizer, qa))

    if get_arch(pre.model.arch).encoder_decoder:
        log.info("demo [10/12] reward model: skipped (reward models are decoder-only)")
    else:
        log.info("demo [10/12] reward model: Bradley-Terry on the preference pairs, judged on the held-out ones")
        results["reward"] = _train_stage(run_reward, stages["reward"])
        reward_model = load_reward_model(Path(stages["reward"].out) / "best")[0]
        results["reward"]["heldout"] = reward_accuracy(reward_model, tokenizer, pairs)
        del reward_model

    log.info("demo [11/12] grpo: RL with verifiable rewards on numeral and arithmetic prompts")
    results["grpo"] = _train_stage(run_grpo, stages["grpo"])
    plot_losses(Path(stages["grpo"].out) / "log.jsonl", Path(stages["grpo"].out) / "reward.png",
                title="grpo: mean reward of the sampled answers", val_key="val_reward", train_key="reward")
    model = load_model(Path(stages["grpo"].out) / "best", with_tokenizer=False)[0]
    results["chat_exact"]["grpo"] = _accuracies(exact_match(model, tokenizer, qa))

    log.info("demo [12/12] finetune: triplet extraction with chat mixed in; the same from an untrained model")
    for name in ("finetune", "finetune_scratch"):
        results[name] = _train_stage(run_finetune, stages[name], needs="retention.json")
        results[name]["retention"] = json.loads((Path(stages[name].out) / "retention.json").read_text("utf-8"))
    model = load_model(Path(stages["finetune"].out) / "best", with_tokenizer=False)[0]
    results["chat_exact"]["finetune"] = _accuracies(exact_match(model, tokenizer, qa))
    results["seconds_total"] = time.perf_counter() - t0
    atomic_write_json(out / "results.json", results)
    write_report(out / "report.md", results)
    write_report_card([out])
    _print_summary(out, results)
    return results


def _accuracies(exact: dict) -> dict[str, float]:
    return {kind: m["accuracy"] for kind, m in exact.items()}


def first_of_each_kind(items: list[dict], limit: int) -> list[dict]:
    """The first `limit` items of each `kind` (all of them when limit is 0), in their order."""
    if limit <= 0:
        return items
    seen: dict[str, int] = {}
    kept = []
    for item in items:
        kind = str(item.get("kind", ""))
        if seen.get(kind, 0) < limit:
            seen[kind] = seen.get(kind, 0) + 1
            kept.append(item)
    return kept


def _train_stage(run, cfg: TrainConfig, needs: str = "") -> dict:
    """Run a training stage (resuming it), or read its summary when it has finished; with its seconds."""
    done = Path(cfg.out) / "done.json"
    if _stage_done(Path(cfg.out), cfg.max_steps, needs):
        log.info("%s already finished; skipping", cfg.out)
        return json.loads(done.read_text(encoding="utf-8"))
    start = time.perf_counter()
    summary = {**run(cfg, resume=True), "seconds": time.perf_counter() - start}
    atomic_write_json(done, summary)  # a later demo run reads the stage's time with its summary
    return summary


SAMPLE_QUESTIONS = ["你好，你是谁？", "把2024写成中文数字。", "十八加二十五等于多少？", "“画蛇添足”是什么意思？"]


def _sample_chats(model, tokenizer) -> list[tuple[str, str]]:
    from xiaolm.infer.generate import GenerationConfig, generate
    from xiaolm.tokenizer import IM_END, encode_prompt

    stop = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id]
    cfg = GenerationConfig(max_new_tokens=64, temperature=0.0, stop_ids=stop)
    samples = []
    for q in SAMPLE_QUESTIONS:
        ids = generate(model, encode_prompt(tokenizer, [{"role": "user", "content": q}]), cfg)
        samples.append((q, tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=True)))
    return samples


def _print_summary(out: Path, r: dict) -> None:
    from xiaolm.eval.report import pct

    exe = sys.argv[0] if Path(sys.argv[0]).name == "xiaolm" else "xiaolm"
    print("\n" + "=" * 64)
    print(f"xiaolm demo finished in {r['seconds_total']:.0f} s")
    print(f"  perplexity: {r['ppl']['before']:.0f} before pretraining → {r['ppl']['after_pretrain']:.1f} after")
    for kind, m in r["exact"].items():
        print(f"  exact match {kind:<11} {pct(m['accuracy']):>6}  (chance {pct(m['chance'])})")
    ch = r["choice"]
    print(f"  multiple choice    {pct(ch['accuracy']):>6}  (chance {pct(ch['chance'])})")
    pref = r["preference"]
    print(f"  held-out preference pairs, chosen more likely: {pct(pref['before']['accuracy'])} after SFT → "
          f"{pct(pref['after']['accuracy'])} after DPO  (chance 50%)")
    if "reward" in r:
        print(f"  reward model, held-out pairs ranked right: {pct(r['reward']['heldout']['accuracy'])}  (chance 50%)")
    print("  held-out exact match, DPO → GRPO: " + ", ".join(
        f"{kind} {pct(r['chat_exact']['dpo'][kind])} → {pct(r['chat_exact']['grpo'][kind])}"
        for kind in ("numerals", "arithmetic") if kind in r["chat_exact"]["grpo"]))
    print(f"  triplet F1: {r['finetune']['retention']['after']['triplet_f1']:.3f} fine-tuned after pretraining, "
          f"{r['finetune_scratch']['retention']['after']['triplet_f1']:.3f} from an untrained model")
    for q, a in r["samples"]:
        print(f"  > {q}\n    {a}")
    reward = "reward," if "reward" in r else ""
    print(f"  stages:  {out}/{{corpus,data,tokenizer,pretrain,sft,dpo,{reward}grpo,finetune,finetune_scratch}}")
    print(f"  report:  {out / 'report.md'}, report card {out / 'report_card.html'}")
    print(f"  chat:    {exe} chat {out / 'model'}")
    print("=" * 64)
