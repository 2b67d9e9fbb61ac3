"""`xiaolm data pairs --from-sft MODEL CHATS --out DIR`: reward-model pairs in Zero-Chatgpt's style.

For each chat record whose last message is the assistant's answer, that reference answer is `chosen` and the
model's own sampled answer to the same conversation is `rejected`. A sampled answer identical to the reference
(whitespace trimmed) or empty is dropped and counted; records that cannot give a pair go to rejects.jsonl with
file:line and reason. Sampling is seeded per batch, so a rerun writes the same pairs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xiaolm.chat_format import normalize_chat
from xiaolm.errors import Unusable, XiaolmError
from xiaolm.io import atomic_open, atomic_write_json
from xiaolm.records.read import convert_records
from xiaolm.records.rejects import RejectLog

if TYPE_CHECKING:  # torch-heavy: imported when pairs are built, so `xiaolm --help` stays fast
    from xiaolm.infer.generate import GenerationConfig

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    """A usable chat record: the conversation before its last answer, that answer, its ids and provenance."""

    messages: list[dict]
    reference: str
    ids: list[int]
    meta: dict[str, Any]


def _prompt(tokenizer: Any, record: dict, room: int) -> Prompt:
    """The record split into conversation and reference answer; Unusable when it cannot give a pair."""
    from xiaolm.tokenizer import encode_prompt

    try:
        messages = normalize_chat(record)
    except ValueError as e:
        raise Unusable("bad_chat", str(e)) from None
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise Unusable("no_reference_answer", "the last message must be a non-empty assistant answer")
    if len(messages) < 2 or messages[-2]["role"] != "user":
        raise Unusable("no_user_turn", "the answer must follow a user turn")
    ids = encode_prompt(tokenizer, messages[:-1])
    if len(ids) > room:
        raise Unusable("prompt_too_long", f"{len(ids)} prompt tokens leave no room for an answer "
                                          f"(at most {room} fit before the answer's budget)")
    meta = {k: record[k] for k in ("id", "source") if k in record}
    return Prompt(messages[:-1], messages[-1]["content"], ids, meta)


def build_pairs(model_path: str, inputs: list[str], out_dir: str | Path, gen: GenerationConfig,
                batch_size: int = 16, limit: int = 0, device: str = "auto") -> dict[str, Any]:
    """Write out_dir/pairs.jsonl (+ report.json, rejects.jsonl) and return the report."""
    from xiaolm.device import resolve_device
    from xiaolm.infer.generate import chat_stop_ids, generate_batch
    from xiaolm.model.export import load_model

    start = time.perf_counter()
    model, tokenizer = load_model(model_path, device=resolve_device(device))
    if tokenizer is None:
        raise XiaolmError("the model has no tokenizer", where=model_path,
                          hint="use a training run dir or an exported model dir")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    room = model.cfg.max_seq_len - gen.max_new_tokens
    if room < 1:
        raise XiaolmError(f"--max-new-tokens {gen.max_new_tokens} leaves no room for a prompt in the model's "
                          f"{model.cfg.max_seq_len}-token context", hint="lower --max-new-tokens")
    with RejectLog(out / "rejects.jsonl") as rejects:
        prompts = convert_records(inputs, lambda r: _prompt(tokenizer, r, room), rejects)
    if limit:
        prompts = prompts[:limit]
    if not prompts:
        raise XiaolmError("no chat record ends with an assistant answer after a user turn", where=", ".join(inputs),
                          hint=f"see {out / 'rejects.jsonl'}")
    gen = replace(gen, stop_ids=[*gen.stop_ids, *chat_stop_ids(tokenizer)])
    counts = {"identical": 0, "empty_answer": 0}
    written = 0
    with atomic_open(out / "pairs.jsonl", "w") as f:
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first:first + batch_size]
            run = gen if gen.seed is None else replace(gen, seed=gen.seed + first)  # the batch's own seed
            answers = generate_batch(model, [p.ids for p in batch], run)
            for prompt, ids in zip(batch, answers, strict=True):
                answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
                if not answer:
                    counts["empty_answer"] += 1
                elif answer == prompt.reference.strip():
                    counts["identical"] += 1
                else:
                    pair = {"messages": prompt.messages, "chosen": prompt.reference, "rejected": answer,
                            **prompt.meta}
                    f.write(json.dumps(pair, ensure_ascii=False) + "\n")
                    written += 1
            log.info("pairs: %d / %d prompts answered, %d pairs", min(first + batch_size, len(prompts)),
                     len(prompts), written)
    report = {"model": str(model_path), "inputs": list(inputs), "prompts": len(prompts), "pairs": written,
              "dropped": counts, "rejected": rejects.total, "rejected_by_reason": rejects.counts,
              "generation": asdict(gen), "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(out / "report.json", report)
    log.info("pairs: %d pairs from %d prompts (%d identical, %d empty dropped; %d records rejected) — %s",
             written, len(prompts), counts["identical"], counts["empty_answer"], rejects.total, out / "pairs.jsonl")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, the chat files, where to write, and how to sample the model's answers."""
    p.add_argument("chats", nargs="+", metavar="CHATS", help="chat records (files, globs or folders)")
    p.add_argument("--from-sft", required=True, metavar="MODEL", help="the SFT model whose answers are rejected")
    p.add_argument("--out", required=True, help="output dir: pairs.jsonl, report.json, rejects.jsonl")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (default 0.9)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--limit", type=int, default=0, help="use only the first N usable chats")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|mps")


def run_pairs(args: argparse.Namespace) -> dict[str, Any]:
    """`xiaolm data pairs`."""
    from xiaolm.infer.generate import GenerationConfig

    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed)
    return build_pairs(args.from_sft, args.chats, args.out, gen, batch_size=args.batch_size, limit=args.limit,
                       device=args.device)
