"""Fine-tuning for a downstream task: triplet extraction (`xiaolm finetune`), keeping the chat ability.

Each extraction record becomes a chat with the fixed template of eval/extraction.py and trains like SFT (loss on
the answer only). A stated share of each batch (finetune.chat_mix) is chat data, to keep the chat ability. Each
evaluation answers held-out records greedily and scores exact triplets: best/ is the highest val_f1. At the end,
retention.json (also in done.json) compares the model before and after (best/): triplet F1 beside exact match
and answer perplexity on held-out chat items.
"""

from __future__ import annotations

import json
import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xiaolm.device import resolve_device
from xiaolm.errors import Unusable, XiaolmError
from xiaolm.eval.extraction import check_triplets, extraction_chat, extraction_f1
from xiaolm.eval.perplexity import answer_perplexity
from xiaolm.eval.qa import exact_match
from xiaolm.io import atomic_write_json
from xiaolm.model.registry import base_model
from xiaolm.records.read import read_items, read_records
from xiaolm.records.rejects import RejectLog
from xiaolm.tokenizer import load_tokenizer
from xiaolm.tokenizer.chat import Example, collate, collate_packed, encode_chat, pack_examples
from xiaolm.train.config import FinetuneSettings, TrainConfig
from xiaolm.train.objective import Metrics, RunContext
from xiaolm.train.pretrain import split_paths
from xiaolm.train.sft import (
    SFTObjective,
    load_chat_examples,
    pad_token_id,
    resolve_tokenizer_dir,
    shuffled_index,
    split_held_out,
)
from xiaolm.train.stage import build_model, run_stage

log = logging.getLogger(__name__)


def load_extraction(inputs: list[str], tokenizer, seq_len: int, rejects: RejectLog | None
                    ) -> tuple[list[Example], list[dict]]:
    """(encoded chats, their records) of extraction records; bad ones go to rejects with file:line.

    Rejected: `missing_text` (absent, empty or not a string), `bad_triplets` (not a list of three non-empty
    strings each, or a field the answer format cannot carry), `too_long` (prompt + answer is more than
    data.seq_len + 1 tokens, so training would cut the answer).
    """
    examples, records = [], []
    for record, where in read_records(inputs, rejects):
        text = record.get("text")
        why = check_triplets(record.get("triplets"))
        try:
            if not isinstance(text, str) or not text.strip():
                raise Unusable("missing_text", "needs a non-empty 'text' string")
            if why:
                raise Unusable("bad_triplets", why)
            ids, labels = encode_chat(tokenizer, extraction_chat(record)["messages"])
            if len(ids) > seq_len + 1:
                raise Unusable("too_long", f"prompt + answer take {len(ids) - 1} tokens > data.seq_len={seq_len}")
        except Unusable as e:
            if rejects is not None:
                rejects.add(e.reason, where, record, e.detail)
            continue
        examples.append((np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)))
        records.append(record)
    return examples, records


class FinetuneObjective(SFTObjective):
    """SFT on extraction chats with a fixed share of chat rows; judged by exact-triplet F1 of greedy answers.

    Row k of the stream is a chat when floor((k+1)·chat_mix) > floor(k·chat_mix): exactly that share of any
    run of rows (±1 in each batch), and both kinds walk their own shuffled epochs, so every row is a pure
    function of (seed, k). With pack_len a batch's chats share rows of up to pack_len tokens (pack_examples): the
    same chats and targets as the padded batch, on fewer positions.
    """

    best_metric = "val_f1"
    higher_is_better = True

    def __init__(self, train: list[Example], val: list[Example], val_records: list[dict], chats: list[Example],
                 settings: FinetuneSettings, tokenizer: Any, batch_size: int, seed: int, pad_id: int,
                 eval_batches: int, pack_len: int = 0):
        super().__init__(train, val, batch_size, seed, pad_id, eval_batches)
        self.pack_len = pack_len
        self.val_records, self.chats, self.settings, self.tokenizer = val_records, chats, settings, tokenizer
        self.share = Fraction(settings.chat_mix).limit_denominator(10_000)

    def chats_before(self, row: int) -> int:
        """How many of rows 0 … row-1 are chat rows."""
        return row * self.share.numerator // self.share.denominator

    def pick(self, row: int) -> tuple[str, int]:
        """("chat" or "task", index into that data) for stream row `row`."""
        chats = self.chats_before(row)
        kind, nth, data = (("chat", chats, self.chats) if self.chats_before(row + 1) > chats
                           else ("task", row - chats, self.train))
        epoch, pos = divmod(nth, len(data))
        return kind, shuffled_index(pos, len(data), self.seed, epoch)

    def train_batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        """Rows first … first+count-1: extraction chats, with chat rows in the stated share."""
        picks = [self.pick(row) for row in range(first, first + count)]
        examples = [(self.chats if kind == "chat" else self.train)[i] for kind, i in picks]
        if self.pack_len:
            return collate_packed(pack_examples(examples, self.pack_len), self.pad_id)
        return collate(examples, self.pad_id)

    @torch.no_grad()
    def evaluate(self, module: nn.Module, run: RunContext) -> Metrics:
        """val_loss on held-out extraction chats, then val_precision, val_recall, val_f1 of greedy answers."""
        results = super().evaluate(module, run)
        with run.autocast():
            scores = extraction_f1(base_model(module), self.tokenizer, self.val_records[:self.settings.eval_records],
                                   self.settings.max_new_tokens, self.batch_size)
        return {**results, **{f"val_{k}": scores[k] for k in ("precision", "recall", "f1")}}


def measure(model: nn.Module, tokenizer: Any, records: list[dict], items: list[dict], settings: FinetuneSettings,
            seq_len: int) -> dict[str, float]:
    """Triplet P/R/F1 on held-out records; chat exact match and answer perplexity on held-out chat items."""
    model.eval()
    out = {}
    if records:
        scores = extraction_f1(model, tokenizer, records, settings.max_new_tokens)
        out = {f"triplet_{k}": scores[k] for k in ("precision", "recall", "f1")}
    if items:
        kinds = exact_match(model, tokenizer, items).values()
        out["chat_exact"] = sum(k["correct"] for k in kinds) / sum(k["n"] for k in kinds)
        out["chat_ppl"] = answer_perplexity(model, tokenizer, items, seq_len)["ppl"]
    return out


def best_scores(run_dir: Path) -> dict[str, float]:
    """Triplet P/R/F1 of best/: the evaluation logged at the step best.json names."""
    step = json.loads((run_dir / "best" / "best.json").read_text(encoding="utf-8"))["step"]
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    row = next(r for r in reversed(rows) if r.get("step") == step and "val_f1" in r)
    return {f"triplet_{k}": row[f"val_{k}"] for k in ("precision", "recall", "f1")}


def _check(cfg: TrainConfig) -> None:
    s = cfg.finetune
    if s.task != "triplets":
        raise XiaolmError(f"unknown finetune.task {s.task!r}", where="finetune.task", hint="use triplets")
    if not 0 <= s.chat_mix <= 1:
        raise XiaolmError(f"finetune.chat_mix={s.chat_mix} is not a share", where="finetune.chat_mix",
                          hint="use a number from 0 (no chat rows) to 1")
    if s.chat_mix > 0 and not cfg.data.chat_path:
        raise XiaolmError("finetune.chat_mix > 0 needs chat records", where="data.chat_path",
                          hint="point data.chat_path at chat JSONL (e.g. the SFT chats), or set finetune.chat_mix=0")
    if not cfg.data.path:
        raise XiaolmError("data.path is empty", where="config",
                          hint='set data.path to extraction JSONL: {"text", "triplets": [[s, r, o], ...]}')


def run_finetune(cfg: TrainConfig, resume: bool = False) -> dict:
    """The `xiaolm finetune` stage (task: triplets)."""
    _check(cfg)
    s, seq_len = cfg.finetune, cfg.data.seq_len
    tokenizer_dir = resolve_tokenizer_dir(cfg)
    tokenizer = load_tokenizer(tokenizer_dir)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes files
    with RejectLog(out / "rejects.jsonl" if main else None) as rejects:
        train_set, train_records = load_extraction(split_paths(cfg.data.path), tokenizer, seq_len, rejects)
        if cfg.data.val_path:
            val, val_records = load_extraction(split_paths(cfg.data.val_path), tokenizer, seq_len, rejects)
        else:  # examples and their records held out together
            kept, held = split_held_out(list(zip(train_set, train_records, strict=True)), cfg.data.val_fraction,
                                        cfg.seed)
            train_set, val, val_records = [e for e, _ in kept], [e for e, _ in held], [r for _, r in held]
        chats = (load_chat_examples(split_paths(cfg.data.chat_path), tokenizer, seq_len, rejects)
                 if s.chat_mix > 0 else [])
    if rejects.total:
        log.warning("finetune: %d records rejected (%s) — see %s", rejects.total, rejects.summary(),
                    out / "rejects.jsonl")
    if not train_set or not val or (s.chat_mix > 0 and not chats):
        raise XiaolmError(f"need training and validation extraction records and (with chat_mix) chats, got "
                          f"{len(train_set)}, {len(val)} and {len(chats)}; {rejects.total} rejected "
                          f"({rejects.summary()})", where=cfg.data.path, hint=f"see {out / 'rejects.jsonl'}")
    items = read_items(cfg.data.chat_val_path, s.retention_items) if cfg.data.chat_val_path else []
    held_out = val_records[:s.eval_records]
    pad_id = pad_token_id(tokenizer, tokenizer_dir)
    log.info("finetune: %d training and %d validation extraction records, %d chats mixed in at %.0f%%, "
             "%d held-out chat items", len(train_set), len(val), len(chats), 100 * s.chat_mix, len(items))
    device = resolve_device(cfg.device)
    _, before_model = build_model(cfg, len(tokenizer), device)
    before = measure(before_model, tokenizer, held_out, items, s, seq_len)
    del before_model
    summary = run_stage(cfg, "finetune", tokenizer_dir, len(tokenizer),
                        lambda c, ctx: FinetuneObjective(train_set, val, val_records, chats, c.finetune, tokenizer,
                                                         c.batch_size, c.seed, pad_id, c.eval_batches,
                                                         c.data.seq_len if c.data.pack else 0), resume)
    from xiaolm.model.export import load_model

    after_model, _ = load_model(out / "best", device=device, with_tokenizer=False)
    # best/'s triplet scores are its evaluation's, on the same held-out records: read, not generated again
    after = {**best_scores(out), **measure(after_model, tokenizer, [], items, s, seq_len)}
    summary["retention"] = {"before": before, "after": after, "after_model": "best", "extraction_records":
                            len(held_out), "chat_items": len(items)}
    if main:
        atomic_write_json(out / "retention.json", summary["retention"])
        atomic_write_json(out / "done.json", summary)
    log.info("finetune: triplet F1 %.3f → %.3f%s", before["triplet_f1"], after["triplet_f1"],
             f", chat exact {before['chat_exact']:.3f} → {after['chat_exact']:.3f}, answer ppl "
             f"{before['chat_ppl']:.1f} → {after['chat_ppl']:.1f}" if items else "")
    return summary
