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
from xiaolm.train.config import DataConfig, TrainConfig

log = logging.getLogger(__name__)


def _demo_model() -> LlamaConfig:
    return LlamaConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256)


def _pretrain() -> TrainConfig:
    return TrainConfig(max_steps=600, batch_size=16, lr=2e-3, warmup_steps=30, log_every=10, eval_every=150,
                       save_every=150, model=_demo_model(), data=DataConfig(seq_len=256))


def _sft() -> TrainConfig:
    return TrainConfig(max_steps=350, batch_size=32, lr=1e-3, warmup_steps=10, log_every=10, eval_every=100,
                       save_every=100, data=DataConfig(seq_len=256, val_fraction=0.02))


@dataclass
class DemoConfig:
    """Settings of the demo pipeline; every stage's own keys sit under its name.

    `seed` seeds every stage: the corpus, the pack split, pretrain and sft. A stage seed you set (`pretrain.seed`
    or `sft.seed` other than its default 0) is kept for that stage instead. The keys by which the demo joins its
    stages (each stage's `out`, `data.path`, `data.tokenizer`, `init_from`; `pretrain.model.vocab_size`, which the
    tokenizer decides; `sft.model`, which is the pretrained model's) are refused by name when set.
    """

    seed: int = 0
    scale: float = 1.0  # amount of corpus text generated / sampled
    vocab_size: int = 4096
    cjk_chars: bool = True  # character-level Chinese: tiny models learn numerals and facts much faster
    eval_limit: int = 0  # evaluate only the first N items of each kind of each set (0 = all)
    pretrain: TrainConfig = field(default_factory=_pretrain)
    sft: TrainConfig = field(default_factory=_sft)


# keys the demo sets itself, joining its stages → (what decides them, what to do instead); {stage} is the stage
DEMO_SETS = {
    **{f"{stage}.{key}": ("its stages run under --out",
                          "use --out to move the whole run, or run `xiaolm {stage}` yourself")
       for stage in ("pretrain", "sft") for key in ("out", "data.path", "data.tokenizer", "init_from")},
    "pretrain.model.vocab_size": ("the size of the tokenizer it trains", "use vocab_size=N"),
    "sft.model": ("sft continues the pretrained model", "set pretrain.model.* instead"),
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


def demo_stage_configs(cfg: DemoConfig, out: Path, sft_data: str | Path) -> tuple[TrainConfig, TrainConfig]:
    """The pretrain and sft configs the demo runs: joined under `out`, seeded by the rule of DemoConfig."""
    defaults = DemoConfig()
    pre = replace(cfg.pretrain, out=str(out / "pretrain"),
                  seed=cfg.seed if cfg.pretrain.seed == defaults.pretrain.seed else cfg.pretrain.seed,
                  data=replace(cfg.pretrain.data, path=str(out / "data" / "packed"), tokenizer=str(out / "tokenizer")))
    sft = replace(cfg.sft, out=str(out / "sft"), init_from=pre.out,
                  seed=cfg.seed if cfg.sft.seed == defaults.sft.seed else cfg.sft.seed,
                  data=replace(cfg.sft.data, path=str(sft_data)))
    return pre, sft


def _stage_done(run_dir: Path, max_steps: int) -> bool:
    done = run_dir / "done.json"
    return done.is_file() and json.loads(done.read_text(encoding="utf-8")).get("steps") == max_steps


def _timed(results: dict, name: str, start: float) -> None:
    results.setdefault("seconds", {})[name] = time.perf_counter() - start


def run_demo(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """Run or resume every stage under `out`; return the collected results (also in report.md)."""
    from xiaolm.data.clean import CleanConfig, clean_files
    from xiaolm.data.demo.corpus import build_demo_corpus
    from xiaolm.data.pack import pack_files
    from xiaolm.eval.perplexity import perplexity_by_source
    from xiaolm.eval.qa import choice_accuracy, exact_match
    from xiaolm.eval.report import write_report
    from xiaolm.model.export import export_hf, load_model
    from xiaolm.model.registry import build_model_from_config
    from xiaolm.records.read import read_items
    from xiaolm.tokenizer import load_tokenizer, train_tokenizer
    from xiaolm.train.pretrain import run_pretrain
    from xiaolm.train.sft import run_sft

    check_demo_config(cfg)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    results: dict[str, Any] = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                                          f"torch {torch.__version__}"}

    log.info("demo [1/8] corpus: building the embedded corpus and the fictional world")
    corpus_dir = out / "corpus"
    corpus_done = corpus_dir / "done.json"
    if corpus_done.is_file():
        paths = {k: Path(v) for k, v in json.loads(corpus_done.read_text(encoding="utf-8")).items()}
    else:
        paths = build_demo_corpus(corpus_dir, seed=cfg.seed, scale=cfg.scale)
        atomic_write_json(corpus_done, {k: str(v) for k, v in paths.items()})
    results["world"] = json.loads(Path(paths["world_summary"]).read_text(encoding="utf-8"))
    pre, sft = demo_stage_configs(cfg, out, paths["sft"])

    log.info("demo [2/8] data clean: normalize, convert to Simplified, filter, deduplicate")
    raw = paths["raw_text"]
    clean_dir = out / "data" / "clean"
    results["clean"] = clean_files([str(raw)], clean_dir, CleanConfig())

    log.info("demo [3/8] tokenizer: byte-level BPE, vocab %d", cfg.vocab_size)
    tok_dir = out / "tokenizer"
    train_tokenizer([str(clean_dir)], tok_dir, vocab_size=cfg.vocab_size, cjk_chars=cfg.cjk_chars)
    tokenizer = load_tokenizer(tok_dir)
    results["vocab_size"] = len(tokenizer)

    log.info("demo [4/8] pack: token files for pretraining")
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

    log.info("demo [5/8] pretrain")
    start = time.perf_counter()
    results["pretrain"] = _train_stage(run_pretrain, pre)
    results["pretrain"]["seconds"] = time.perf_counter() - start
    measure("after_pretrain", load_model(pre.out)[0])

    log.info("demo [6/8] sft: chat fine-tuning, loss on assistant tokens only")
    start = time.perf_counter()
    results["sft"] = _train_stage(run_sft, sft)
    results["sft"]["seconds"] = time.perf_counter() - start
    results["sft_records"] = len(read_items(paths["sft"]))

    log.info("demo [7/8] export: Hugging Face model directory")
    model_dir = export_hf(sft.out, out / "model", dtype="fp32")
    results["model_dir"] = str(model_dir)

    log.info("demo [8/8] eval: perplexity, held-out exact match, multiple choice")
    model, tokenizer = load_model(model_dir)
    measure("after_sft", model)
    results["ppl"], results["ppl_by_source"] = ppl, by_source
    results["exact"] = exact_match(model, tokenizer, first_of_each_kind(read_items(paths["eval_qa"]), cfg.eval_limit))
    results["choice"] = choice_accuracy(model, tokenizer,
                                        first_of_each_kind(read_items(paths["eval_choice"]), cfg.eval_limit))
    results["samples"] = _sample_chats(model, tokenizer)
    results["seconds_total"] = time.perf_counter() - t0
    atomic_write_json(out / "results.json", results)
    write_report(out / "report.md", results)
    _print_summary(out, results)
    return results


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


def _train_stage(run, cfg: TrainConfig) -> dict:
    if _stage_done(Path(cfg.out), cfg.max_steps):
        log.info("%s already finished; skipping", cfg.out)
        return json.loads((Path(cfg.out) / "done.json").read_text(encoding="utf-8"))
    return run(cfg, resume=True)


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
    for q, a in r["samples"]:
        print(f"  > {q}\n    {a}")
    print(f"  stages:  {out}/{{corpus,data,tokenizer,pretrain,sft}}")
    print(f"  report:  {out / 'report.md'}")
    print(f"  chat:    {exe} chat {out / 'model'}")
    print("=" * 64)
