"""The `xiaolm` command: a table of subcommands; each loads its config and calls one stage.

A subcommand is one entry of COMMANDS: its help, examples, a function adding its arguments and a handler
`(args) -> None`. A training stage is one line of TRAIN_STAGES. Every stage that has settings takes them the same
way: `--config FILE`, then `key=value` overrides (the older flags are aliases that win over both), and writes the
resolved settings to config.yaml in its output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from xiaolm import recipe
from xiaolm.config import load_config
from xiaolm.errors import XiaolmError
from xiaolm.eval.command import EXAMPLES as EVAL_EXAMPLES
from xiaolm.eval.command import cmd_eval, eval_arguments
from xiaolm.eval.report_card import cmd_report, report_arguments
from xiaolm.infer import pairs, serve_command

log = logging.getLogger("xiaolm")
_SETTING = re.compile(r"^[A-Za-z_][\w.]*=")
Handler = Callable[[argparse.Namespace], None]
T = TypeVar("T")

TRAIN_EPILOG = """examples:
  xiaolm {stage} --config configs/{stage}.yaml
  xiaolm {stage} --config configs/{stage}.yaml max_steps=2000 lr=3e-4 model.n_layers=8
  xiaolm {stage} --config configs/{stage}.yaml --resume      # continue after an interruption
keys: out seed device dtype max_steps batch_size grad_accum lr warmup_steps log_every eval_every save_every
      init_from model.* (dim n_layers n_heads n_kv_heads max_seq_len ...) data.* (path tokenizer seq_len ...)"""

# A training stage: its help and the function `(TrainConfig, resume=) -> dict` that runs it. One line adds one.
TRAIN_STAGES = {
    "pretrain": ("pretrain a Llama-style model on packed token files", "xiaolm.train.pretrain:run_pretrain"),
    "sft": ("supervised fine-tuning on chat records (loss on assistant tokens)", "xiaolm.train.sft:run_sft"),
    "dpo": ("direct preference optimization on {prompt, chosen, rejected} records", "xiaolm.train.dpo:run_dpo"),
    "reward": ("Bradley-Terry reward model (scalar head) on preference records", "xiaolm.train.reward:run_reward"),
    "grpo": ("GRPO: G sampled answers per prompt, group-relative advantages, verifiable rewards",
             "xiaolm.train.grpo:run_grpo"),
    "ppo": ("PPO: value head, KL penalty to the reference, GAE, clipped losses, a KL guard",
            "xiaolm.train.ppo:run_ppo"),
    "finetune": ("fine-tune for triplet extraction, scored by triplet F1, chat ability kept",
                 "xiaolm.train.finetune:run_finetune"),
}


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, examples, a function adding its arguments, and what runs it."""

    help: str
    examples: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Handler


def _split_settings(positionals: list[str]) -> tuple[list[str], list[str]]:
    """(inputs, `key=value` settings): argparse hands every positional of a stage to INPUT..."""
    settings = [a for a in positionals if _SETTING.match(a) and not Path(a).exists()]
    return [a for a in positionals if a not in settings], settings


def _stage_config(cls: type[T], args: argparse.Namespace, settings: list[str], aliases: tuple[str, ...] = ()) -> T:
    """cls from --config, then `key=value` settings, then the alias flags the user gave (they default to None)."""
    flags = [f"{key}={getattr(args, key)}" for key in aliases if getattr(args, key) is not None]
    return load_config(cls, args.config, [*settings, *flags])


def _config_option(parser: argparse.ArgumentParser, what: str = "settings") -> None:
    parser.add_argument("--config", metavar="FILE", help=f"YAML file with {what}; key=value arguments override it")


def _executor_options(parser: argparse.ArgumentParser) -> None:
    """--executor and --workers of the shard-parallel data stages (one task per input file)."""
    parser.add_argument("--executor", default="local", choices=["local", "ray"],
                        help="local process pool (default) or Ray (pip install 'xiaolm[ray]')")
    parser.add_argument("--workers", type=int, default=0, help="local processes (default: all CPU cores)")


def _stage_arguments(parser: argparse.ArgumentParser, executor: bool = True) -> None:
    """INPUT... (and key=value settings), --out, --config and, for shard-parallel stages, the executor options."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="files, globs, directories; and key=value settings (before or after the options)")
    parser.add_argument("--out", required=True)
    _config_option(parser)
    if executor:
        _executor_options(parser)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    _config_option(p, "demo settings")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def cmd_demo(args: argparse.Namespace) -> None:
    """`xiaolm demo`."""
    from xiaolm.demo import DemoConfig, run_demo

    run_demo(load_config(DemoConfig, args.config, args.overrides), Path(args.out))


def _import_arguments(p: argparse.ArgumentParser) -> None:
    from xiaolm.data.sources import RECIPES

    p.epilog += "\nrecipes:\n" + "\n".join(f"  {name:16s} {r.kind:4s}  {r.layout}" for name, r in RECIPES.items())
    p.add_argument("recipe", metavar="RECIPE", help="one of the recipes listed below")
    _stage_arguments(p)


def cmd_import(args: argparse.Namespace) -> None:
    """`xiaolm data import`."""
    from xiaolm.data.sources import ImportConfig, import_records

    inputs, settings = _split_settings(args.inputs)
    cfg = _stage_config(ImportConfig, args, settings)
    import_records(args.recipe, inputs, args.out, shard_records=cfg.shard_records, executor=args.executor,
                   workers=args.workers)


def cmd_clean(args: argparse.Namespace) -> None:
    """`xiaolm data clean`."""
    from xiaolm.data.clean import CleanConfig, clean_files

    inputs, settings = _split_settings(args.inputs)
    clean_files(inputs, args.out, _stage_config(CleanConfig, args, settings), executor=args.executor,
                workers=args.workers)


def _dedup_arguments(p: argparse.ArgumentParser) -> None:
    _stage_arguments(p)
    p.add_argument("--threshold", type=float, help="Jaccard similarity of duplicates, as threshold=X (default 0.8)")


def cmd_dedup(args: argparse.Namespace) -> None:
    """`xiaolm data dedup`."""
    from xiaolm.data.dedup import DedupConfig, dedup_files

    inputs, settings = _split_settings(args.inputs)
    dedup_files(inputs, args.out, _stage_config(DedupConfig, args, settings, ("threshold",)),
                executor=args.executor, workers=args.workers)


def _pack_arguments(p: argparse.ArgumentParser) -> None:
    _stage_arguments(p)
    p.add_argument("--tokenizer", required=True, metavar="DIR")
    p.add_argument("--val-fraction", type=float, help="share of documents held out, as val_fraction=X (default 0.01)")
    p.add_argument("--seed", type=int, help="picks the held-out documents, as seed=N (default 0)")


def cmd_pack(args: argparse.Namespace) -> None:
    """`xiaolm data pack`."""
    from xiaolm.data.pack import PackConfig, pack_files

    inputs, settings = _split_settings(args.inputs)
    cfg = _stage_config(PackConfig, args, settings, ("val_fraction", "seed"))
    pack_files(inputs, args.tokenizer, args.out, **dataclasses.asdict(cfg), executor=args.executor,
               workers=args.workers)


def _tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    _stage_arguments(p, executor=False)
    p.add_argument("--vocab-size", type=int, help="as vocab_size=N (default 8192)")
    p.add_argument("--min-frequency", type=int, help="as min_frequency=N (default 2)")
    p.add_argument("--cjk-chars", action="store_true", default=None,
                   help="one token per CJK character (no merges across characters); best for tiny models; as "
                        "cjk_chars=true")
    p.add_argument("--backend", choices=["bpe", "sentencepiece"],
                   help="bpe: bounded-memory chunk counts + byte-level BPE (default); sentencepiece: unigram on a "
                        "sample of lines, byte fallback; as backend=NAME")
    p.add_argument("--max-memory",
                   help="memory the training may use, e.g. 512MB or 8GB, as max_memory=SIZE (default 2GB)")
    p.add_argument("--workers", type=int, help="counting processes (default: one per CPU, at most 8)")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    """`xiaolm tokenizer train`."""
    from xiaolm.tokenizer import train_tokenizer
    from xiaolm.tokenizer.train import TokenizerConfig

    inputs, settings = _split_settings(args.inputs)
    cfg = _stage_config(TokenizerConfig, args, settings,
                        ("vocab_size", "min_frequency", "cjk_chars", "backend", "max_memory"))
    train_tokenizer(inputs, args.out, **dataclasses.asdict(cfg), workers=args.workers)


def _stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tokenizer_dir", metavar="DIR")
    p.add_argument("inputs", nargs="+", metavar="TEXT")
    p.add_argument("--limit", type=int, default=0, help="measure only the first N texts")
    p.add_argument("--worst", type=int, default=5, help="how many worst-compressed texts to show")
    p.add_argument("--json", action="store_true", help="print the stats as JSON")
    p.add_argument("--baseline", choices=["bytelevel"],
                   help="also train a plain tokenizers ByteLevel BPE of the same vocabulary on the tokenizer's own "
                        "training inputs (or --baseline-train) and report chars/token ours/baseline per source")
    p.add_argument("--baseline-train", action="append", metavar="INPUT", help="the baseline's training text")


def cmd_tokenizer_stats(args: argparse.Namespace) -> None:
    """`xiaolm tokenizer stats`."""
    from xiaolm.tokenizer.stats import format_stats, tokenizer_stats

    stats = tokenizer_stats(args.tokenizer_dir, args.inputs, limit=args.limit, worst=args.worst,
                            baseline=args.baseline, baseline_train=args.baseline_train)
    print(json.dumps(stats, ensure_ascii=False, indent=2) if args.json else format_stats(stats))


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def train_command(stage: str, help_text: str, target: str) -> Command:
    """The subcommand of a training stage: load its TrainConfig, then call `target` ("module:function")."""
    def handler(args: argparse.Namespace) -> None:
        from xiaolm.train.config import TrainConfig

        module, function = target.split(":")
        cfg = load_config(TrainConfig, args.config, args.overrides)
        getattr(importlib.import_module(module), function)(cfg, resume=args.resume)

    return Command(help_text, TRAIN_EPILOG.format(stage=stage), _train_arguments, handler)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="hf", choices=["hf", "gguf"], help="gguf: one file for llama.cpp / Ollama")
    p.add_argument("--dtype", help="hf: fp32 (default), fp16, bf16; gguf: f16 (default), f32, q8_0")
    p.add_argument("--merge-lora", action="store_true", help="LoRA run, hf: one plain model with the adapter folded "
                   "in (default: the base model plus the adapter in adapter/, which peft loads; gguf always merges)")


def cmd_export(args: argparse.Namespace) -> None:
    """`xiaolm export`."""
    from xiaolm.model import export, gguf

    out = gguf.export_gguf(args.run_dir, args.out, dtype=args.dtype or "f16") if args.format == "gguf" \
        else export.export_hf(args.run_dir, args.out, dtype=args.dtype or "fp32", merge=args.merge_lora)
    print(f"exported to {out}")


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--system", default=None, help="system prompt")


def cmd_chat(args: argparse.Namespace) -> None:
    """`xiaolm chat`."""
    from xiaolm.infer.chat import run_chat
    from xiaolm.infer.generate import GenerationConfig

    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    run_chat(args.model, gen, system=args.system)


# Every subcommand, in the order `xiaolm --help` lists them; a two-word path sits under its group.
COMMANDS: dict[tuple[str, ...], Command] = {
    ("demo",): Command(
        "run the whole pipeline on the embedded corpus (CPU, minutes)",
        "examples:\n  xiaolm demo\n  xiaolm demo --out runs/demo2 pretrain.max_steps=600 scale=2",
        _demo_arguments, cmd_demo),
    ("recipe", "list"): Command("the seed projects as recipes, one line each", "examples:\n  xiaolm recipe list",
                                recipe.list_arguments, recipe.cmd_list),
    ("recipe", "run"): Command(
        "run a recipe's stages in order (import … export), skipping finished ones and resuming the interrupted",
        "examples:\n  xiaolm recipe run baby-llama2 --scale fixture\n"
        "  xiaolm recipe run chatlm-t5-0.2b --scale full --downloads ~/downloads --out runs/chatlm",
        recipe.run_arguments, recipe.cmd_run),
    ("data", "import"): Command(
        "convert a public Chinese dataset's files into xiaolm records",
        "examples:\n  xiaolm data import belle Belle_open_source_0.5M.json --out data/belle\n"
        "  xiaolm data import zhwiki extracted/ --out data/zhwiki\n"
        "  xiaolm data import skypile skypile/ --out data/skypile shard_records=50000",
        _import_arguments, cmd_import),
    ("data", "clean"): Command(
        "normalize and filter text/chat records; rejects go to rejects.jsonl",
        "examples:\n  xiaolm data clean raw/*.jsonl --out data/clean\n"
        "  xiaolm data clean raw/ --out data/clean min_chars=20 t2s=false\n"
        "  xiaolm data clean data/belle --out data/clean --workers 8   # one task per input file\n"
        "input files are cleaned in parallel; exact duplicates are dropped within each file "
        "(data dedup removes them across files)",
        _stage_arguments, cmd_clean),
    ("data", "dedup"): Command(
        "remove exact and near-duplicate records (MinHash + LSH on character n-grams)",
        "examples:\n  xiaolm data dedup data/clean --out data/dedup\n"
        "  xiaolm data dedup data/clean --out data/dedup --threshold 0.7 --workers 8\n"
        "  xiaolm data dedup data/clean --out data/dedup --executor ray  # Ray cluster (RAY_ADDRESS)\n"
        "  xiaolm data dedup raw/ ngram=7 partition_mb=64 --out data/dedup",
        _dedup_arguments, cmd_dedup),
    ("data", "pairs"): Command(
        "reward-model pairs: the reference answer chosen, the SFT model's own sampled answer rejected",
        "examples:\n  xiaolm data pairs runs/demo/corpus/sft.jsonl --from-sft runs/demo/sft --out runs/pairs",
        pairs.add_arguments, pairs.run_pairs),
    ("data", "pack"): Command(
        "tokenize records into train.bin / val.bin + meta.json",
        "examples:\n  xiaolm data pack data/clean --tokenizer tok --out data/packed\n"
        "  xiaolm data pack data/clean --tokenizer tok --out data/packed val_fraction=0.02 seed=1\n"
        "  xiaolm data pack data/dedup --tokenizer tok --out data/packed --executor ray\n"
        "input files are tokenized in parallel and their token files concatenated in input order",
        _pack_arguments, cmd_pack),
    ("tokenizer", "train"): Command(
        "train a byte-level BPE tokenizer with ChatML special tokens",
        "examples:\n  xiaolm tokenizer train data/clean --out tok --vocab-size 8192\n"
        "  xiaolm tokenizer train data/clean --out tok vocab_size=8192 cjk_chars=true   # the same as settings\n"
        "  xiaolm tokenizer train data/clean --out tok --vocab-size 32000 --max-memory 8GB --workers 4\n"
        "  xiaolm tokenizer train data/clean --out tok-spm --vocab-size 32000 --backend sentencepiece\n"
        "  xiaolm tokenizer train data/clean --out tok cjk_space=true digits=3 newline_indent=true   # code, docs\n"
        "chunking (bpe): max_cjk_run=16 (0: no cap) cjk_space=false digits=1 (0: whole runs) newline_indent=false",
        _tokenizer_arguments, cmd_tokenizer_train),
    ("tokenizer", "stats"): Command(
        "measure a tokenizer on text: chars/bytes per token (per record source), vocabulary use",
        "examples:\n  xiaolm tokenizer stats tok data/val.jsonl --limit 10000\n"
        "  xiaolm tokenizer stats tok data/val.jsonl --baseline bytelevel   # ours / a plain BPE, per source",
        _stats_arguments, cmd_tokenizer_stats),
    **{(stage,): train_command(stage, *spec) for stage, spec in TRAIN_STAGES.items()},
    ("export",): Command(
        "export a run dir to a Hugging Face model directory, or to a GGUF file for llama.cpp / Ollama",
        "examples:\n  xiaolm export runs/demo/sft --out my-model --dtype fp16\n"
        "  xiaolm export runs/demo/model --out my-gguf --format gguf --dtype q8_0   # my-gguf/model.gguf\n"
        "  xiaolm export runs/lora --out my-model --merge-lora    # a LoRA run as one plain model",
        _export_arguments, cmd_export),
    ("chat",): Command(
        "chat with a model in the terminal (/reset, /exit)",
        "examples:\n  xiaolm chat runs/demo/model\n  xiaolm chat runs/demo/sft --temperature 0",
        _chat_arguments, cmd_chat),
    ("serve",): Command(
        "serve a model: OpenAI-compatible API with continuous batching, and a web chat page at /",
        "examples:\n  xiaolm serve runs/demo/model\n  xiaolm serve runs/demo/model --port 8080 --api-key KEY\n"
        "  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        "    -d '{\"model\": \"model\", \"messages\": [{\"role\": \"user\", \"content\": \"你好\"}]}'",
        serve_command.add_arguments, serve_command.run_serve),
    ("eval",): Command("evaluate a model: perplexity, BLEU/ROUGE, multiple choice (C-Eval, CMMLU), exact match, "
                       "triplet F1, preference accuracy", EVAL_EXAMPLES, eval_arguments, cmd_eval),
    ("report",): Command("one report card for a pipeline: data counts, training runs and curves, every eval number",
                         "examples:\n  xiaolm report runs/demo\n  xiaolm report runs/sft runs/dpo --out runs/card",
                         report_arguments, cmd_report),
}
GROUPS = {"data": "data stages", "tokenizer": "tokenizer stages", "recipe": "the seed projects as recipes"}


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line grammar, built from COMMANDS."""
    p = argparse.ArgumentParser(prog="xiaolm", description="Train a small Chinese chat model from scratch.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="start with:  xiaolm demo        (whole pipeline on the embedded corpus)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, cmd in COMMANDS.items():
        parent = sub
        if len(path) == 2:
            group = path[0]
            if group not in groups:
                names = ", ".join(q[1] for q in COMMANDS if len(q) == 2 and q[0] == group)
                groups[group] = sub.add_parser(group, help=f"{GROUPS[group]}: {names}").add_subparsers(
                    dest=f"{group}_command", required=True)
            parent = groups[group]
        s = parent.add_parser(path[-1], help=cmd.help, description=cmd.help, epilog=cmd.examples,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.arguments(s)
        s.set_defaults(handler=cmd.handler)
    return p


def run(argv: list[str] | None = None) -> int:
    """Parse arguments and run one subcommand's handler; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `key=value` settings after an option such as --out land here for stages that take INPUT...
        if not hasattr(args, "inputs") or not all(_SETTING.match(a) for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.inputs += extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.handler(args)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit 2."""
    try:
        code = run(argv)
    except XiaolmError as e:
        print(f"xiaolm: error: {e.format()}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("xiaolm: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
