"""The `xiaolm` command: one subcommand per stage; each loads its config and calls the stage."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from xiaolm.errors import XiaolmError

log = logging.getLogger("xiaolm")
_SETTING = re.compile(r"^[A-Za-z_][\w.]*=")

TRAIN_EPILOG = """examples:
  xiaolm {stage} --config configs/{stage}.yaml
  xiaolm {stage} --config configs/{stage}.yaml max_steps=2000 lr=3e-4 model.n_layers=8
  xiaolm {stage} --config configs/{stage}.yaml --resume      # continue after an interruption
keys: out seed device dtype max_steps batch_size grad_accum lr warmup_steps log_every eval_every save_every
      init_from model.* (dim n_layers n_heads n_kv_heads max_seq_len ...) data.* (path tokenizer seq_len ...)"""


def _add_parser(sub, name: str, help_text: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _executor_options(parser: argparse.ArgumentParser) -> None:
    """--executor and --workers of the shard-parallel data stages (one task per input file)."""
    parser.add_argument("--executor", default="local", choices=["local", "ray"],
                        help="local process pool (default) or Ray (pip install 'xiaolm[ray]')")
    parser.add_argument("--workers", type=int, default=0, help="local processes (default: all CPU cores)")


def _recipes() -> dict:
    from xiaolm.data.sources import RECIPES

    return RECIPES


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line grammar."""
    p = argparse.ArgumentParser(prog="xiaolm", description="Train a small Chinese chat model from scratch.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="start with:  xiaolm demo        (whole pipeline on the embedded corpus)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = _add_parser(sub, "demo", "run the whole pipeline on the embedded corpus (CPU, minutes)",
                    "examples:\n  xiaolm demo\n  xiaolm demo --out runs/demo2 pretrain.max_steps=600 scale=2")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--config", help="YAML file with demo settings")
    d.add_argument("overrides", nargs="*", metavar="key=value")

    data = sub.add_parser("data", help="data stages: import, clean, dedup, pack")
    data = data.add_subparsers(dest="data_cmd", required=True)
    c = _add_parser(data, "clean", "normalize and filter text/chat records; rejects go to rejects.jsonl",
                    "examples:\n  xiaolm data clean raw/*.jsonl --out data/clean\n"
                    "  xiaolm data clean raw/ --out data/clean min_chars=20 t2s=false\n"
                    "  xiaolm data clean data/belle --out data/clean --workers 8   # one task per input file\n"
                    "input files are cleaned in parallel; exact duplicates are dropped within each file "
                    "(data dedup removes them across files)")
    c.add_argument("inputs", nargs="+", metavar="INPUT")
    c.add_argument("--out", required=True)
    c.add_argument("--config")
    _executor_options(c)
    recipes_help = "\n".join(f"  {name:16s} {r.kind:4s}  {r.layout}" for name, r in _recipes().items())
    im = _add_parser(data, "import", "convert a public Chinese dataset's files into xiaolm records",
                     "examples:\n  xiaolm data import belle Belle_open_source_0.5M.json --out data/belle\n"
                     "  xiaolm data import zhwiki extracted/ --out data/zhwiki\nrecipes:\n" + recipes_help)
    im.add_argument("recipe", metavar="RECIPE", help="one of the recipes listed below")
    im.add_argument("inputs", nargs="+", metavar="INPUT")
    im.add_argument("--out", required=True)
    _executor_options(im)
    dd = _add_parser(data, "dedup", "remove exact and near-duplicate records (MinHash + LSH on character n-grams)",
                     "examples:\n  xiaolm data dedup data/clean --out data/dedup\n"
                     "  xiaolm data dedup data/clean --out data/dedup --threshold 0.7 --workers 8\n"
                     "  xiaolm data dedup data/clean --out data/dedup --executor ray  # Ray cluster (RAY_ADDRESS)\n"
                     "  xiaolm data dedup raw/ ngram=7 partition_mb=64 --out data/dedup   # settings before --out")
    dd.add_argument("inputs", nargs="+", metavar="INPUT", help="files, globs, directories; and key=value settings")
    dd.add_argument("--out", required=True)
    dd.add_argument("--threshold", type=float, help="Jaccard similarity of duplicates (default 0.8)")
    _executor_options(dd)
    dd.add_argument("--config")
    k = _add_parser(data, "pack", "tokenize records into train.bin / val.bin + meta.json",
                    "examples:\n  xiaolm data pack data/clean --tokenizer tok --out data/packed\n"
                    "  xiaolm data pack data/dedup --tokenizer tok --out data/packed --executor ray\n"
                    "input files are tokenized in parallel and their token files concatenated in input order")
    k.add_argument("inputs", nargs="+", metavar="INPUT")
    k.add_argument("--tokenizer", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--val-fraction", type=float, default=0.01)
    k.add_argument("--seed", type=int, default=0)
    _executor_options(k)

    tok = sub.add_parser("tokenizer", help="tokenizer stages").add_subparsers(dest="tok_cmd", required=True)
    t = _add_parser(tok, "train", "train a byte-level BPE tokenizer with ChatML special tokens",
                    "examples:\n  xiaolm tokenizer train data/clean --out tok --vocab-size 8192\n"
                    "  xiaolm tokenizer train data/clean --out tok --vocab-size 32000 --max-memory 8GB --workers 4\n"
                    "  xiaolm tokenizer train data/clean --out tok-spm --vocab-size 32000 --backend sentencepiece")
    t.add_argument("inputs", nargs="+", metavar="INPUT")
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--cjk-chars", action="store_true",
                   help="one token per CJK character (no merges across characters); best for tiny models")
    t.add_argument("--backend", default="bpe", choices=["bpe", "sentencepiece"],
                   help="bpe: bounded-memory chunk counts + byte-level BPE (default); sentencepiece: unigram "
                        "on a sample of lines, byte fallback")
    t.add_argument("--max-memory", default="2GB",
                   help="memory the training may use, e.g. 512MB or 8GB (default %(default)s)")
    t.add_argument("--workers", type=int, help="counting processes (default: one per CPU, at most 8)")
    ts = _add_parser(tok, "stats", "measure a tokenizer on text: chars/bytes per token, vocabulary use",
                     "examples:\n  xiaolm tokenizer stats tok data/val.jsonl --limit 10000")
    ts.add_argument("tokenizer_dir", metavar="DIR")
    ts.add_argument("inputs", nargs="+", metavar="TEXT")
    ts.add_argument("--limit", type=int, default=0, help="measure only the first N texts")
    ts.add_argument("--worst", type=int, default=5, help="how many worst-compressed texts to show")
    ts.add_argument("--json", action="store_true", help="print the stats as JSON")

    for stage, text in (("pretrain", "pretrain a Llama-style model on packed token files"),
                        ("sft", "supervised fine-tuning on chat records (loss on assistant tokens)"),
                        ("finetune", "fine-tune for triplet extraction, scored by triplet F1, chat ability kept")):
        s = _add_parser(sub, stage, text, TRAIN_EPILOG.format(stage=stage))
        s.add_argument("--config", help="YAML config file")
        s.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
        s.add_argument("overrides", nargs="*", metavar="key=value")

    e = _add_parser(sub, "export", "export a run dir to a Hugging Face model directory",
                    "examples:\n  xiaolm export runs/demo/sft --out my-model --dtype fp16")
    e.add_argument("run_dir")
    e.add_argument("--out", required=True)
    e.add_argument("--format", default="hf", choices=["hf"])
    e.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])

    ch = _add_parser(sub, "chat", "chat with a model in the terminal (/reset, /exit)",
                     "examples:\n  xiaolm chat runs/demo/model\n  xiaolm chat runs/demo/sft --temperature 0")
    ch.add_argument("model")
    ch.add_argument("--temperature", type=float, default=0.7)
    ch.add_argument("--top-k", type=int, default=0)
    ch.add_argument("--top-p", type=float, default=0.9)
    ch.add_argument("--repetition-penalty", type=float, default=1.1)
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--system", default=None, help="system prompt")

    ev = _add_parser(sub, "eval", "evaluate a model: perplexity, exact match, multiple choice",
                     "examples:\n  xiaolm eval runs/demo/model --task ppl --data runs/demo/corpus/eval/val_text.jsonl\n"
                     "  xiaolm eval runs/demo/model --task exact --data runs/demo/corpus/eval/heldout_qa.jsonl\n"
                     "  xiaolm eval runs/demo/model --task choice --data runs/demo/corpus/eval/choice.jsonl")
    ev.add_argument("model")
    ev.add_argument("--task", required=True, choices=["ppl", "exact", "choice", "extraction"])
    ev.add_argument("--data", required=True)
    ev.add_argument("--limit", type=int, default=0, help="evaluate only the first N items")
    ev.add_argument("--out", help="write the result as JSON here")
    ev.add_argument("--device", default="auto", metavar="auto|cpu|cuda|mps",
                    help="where the model runs (default auto: cuda, then mps, then cpu)")
    ev.add_argument("--no-doc-mask", dest="doc_mask", action="store_false",
                    help="ppl: let attention cross document boundaries (for models pretrained with "
                         "data.doc_mask=false)")
    return p


def cmd_eval(args: argparse.Namespace) -> dict:
    """`xiaolm eval`."""
    from xiaolm.device import resolve_device
    from xiaolm.eval.perplexity import perplexity_by_source
    from xiaolm.eval.qa import choice_accuracy, exact_match
    from xiaolm.model.export import load_model

    model, tokenizer = load_model(args.model, device=resolve_device(args.device))
    if tokenizer is None:
        raise XiaolmError("model has no tokenizer files", where=args.model, hint="export it with `xiaolm export`")
    from xiaolm.records.read import read_items

    items = read_items(args.data, args.limit)
    if not items:
        raise XiaolmError("no records to evaluate", where=args.data)
    if args.task == "ppl":
        missing = [i for i, r in enumerate(items) if not isinstance(r.get("text"), str)]
        if missing:
            raise XiaolmError(f"record {missing[0] + 1} has no 'text' field", where=args.data,
                              hint="ppl needs {\"text\": ...} records")
        result = perplexity_by_source(model, tokenizer, items, doc_mask=args.doc_mask)
    elif args.task == "exact":
        result = exact_match(model, tokenizer, items)
    elif args.task == "extraction":  # {"text", "triplets"} records: exact-triplet precision, recall, F1
        from xiaolm.eval.extraction import extraction_f1

        result = extraction_f1(model, tokenizer, items)
    else:
        result = choice_accuracy(model, tokenizer, items)
    text = json.dumps(result, ensure_ascii=False, indent=2)
    print(text)
    if args.out:
        from xiaolm.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return result


def _split_settings(positionals: list[str]) -> tuple[list[str], list[str]]:
    """(inputs, `key=value` settings): argparse hands every positional of a stage to INPUT..."""
    settings = [a for a in positionals if _SETTING.match(a) and not Path(a).exists()]
    return [a for a in positionals if a not in settings], settings


def run(argv: list[str] | None = None) -> int:
    """Parse arguments and run one stage; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `key=value` settings after an option such as --out land here for stages that take INPUT...
        if not hasattr(args, "inputs") or not all(_SETTING.match(a) for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.inputs += extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from xiaolm.config import load_config

    if args.command == "demo":
        from xiaolm.demo import DemoConfig, run_demo

        run_demo(load_config(DemoConfig, args.config, args.overrides), Path(args.out))
    elif args.command == "data" and args.data_cmd == "clean":
        from xiaolm.data.clean import CleanConfig, clean_files

        inputs, settings = _split_settings(args.inputs)
        clean_files(inputs, args.out, load_config(CleanConfig, args.config, settings), executor=args.executor,
                    workers=args.workers)
    elif args.command == "data" and args.data_cmd == "import":
        from xiaolm.data.sources import import_records

        import_records(args.recipe, args.inputs, args.out, executor=args.executor, workers=args.workers)
    elif args.command == "data" and args.data_cmd == "dedup":
        from xiaolm.data.dedup import DedupConfig, dedup_files

        inputs, settings = _split_settings(args.inputs)
        threshold = [f"threshold={args.threshold}"] if args.threshold is not None else []
        cfg = load_config(DedupConfig, args.config, [*settings, *threshold])
        dedup_files(inputs, args.out, cfg, executor=args.executor, workers=args.workers)
    elif args.command == "data" and args.data_cmd == "pack":
        from xiaolm.data.pack import pack_files

        pack_files(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                   executor=args.executor, workers=args.workers)
    elif args.command == "tokenizer" and args.tok_cmd == "stats":
        from xiaolm.tokenizer.stats import format_stats, tokenizer_stats

        stats = tokenizer_stats(args.tokenizer_dir, args.inputs, limit=args.limit, worst=args.worst)
        print(json.dumps(stats, ensure_ascii=False, indent=2) if args.json else format_stats(stats))
    elif args.command == "tokenizer":
        from xiaolm.tokenizer import train_tokenizer

        train_tokenizer(args.inputs, args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                        cjk_chars=args.cjk_chars, backend=args.backend, max_memory=args.max_memory,
                        workers=args.workers)
    elif args.command in ("pretrain", "sft", "finetune"):
        from xiaolm.train.config import TrainConfig

        cfg = load_config(TrainConfig, args.config, args.overrides)
        if args.command == "pretrain":
            from xiaolm.train.pretrain import run_pretrain

            run_pretrain(cfg, resume=args.resume)
        elif args.command == "finetune":
            from xiaolm.train.finetune import run_finetune

            run_finetune(cfg, resume=args.resume)
        else:
            from xiaolm.train.sft import run_sft

            run_sft(cfg, resume=args.resume)
    elif args.command == "export":
        from xiaolm.model.export import export_hf

        out = export_hf(args.run_dir, args.out, dtype=args.dtype)
        print(f"exported to {out}")
    elif args.command == "chat":
        from xiaolm.infer.chat import run_chat
        from xiaolm.infer.generate import GenerationConfig

        gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, repetition_penalty=args.repetition_penalty)
        run_chat(args.model, gen, system=args.system)
    elif args.command == "eval":
        cmd_eval(args)
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
