"""`xiaolm eval`: one model, one task, its data files; the model on the same device choice as training."""

from __future__ import annotations

from pathlib import Path

import torch

from xiaolm.device import resolve_device
from xiaolm.errors import XiaolmError
from xiaolm.eval import TASKS
from xiaolm.model.export import DTYPES, load_model, load_reward_model, resolve_model_dir
from xiaolm.model.reward import is_reward_dir
from xiaolm.records.read import read_records
from xiaolm.records.rejects import RejectLog

# what each record-based task needs of a record, and how to say it
NEEDS = {"ppl": (lambda r: isinstance(r.get("text"), str), 'ppl needs {"text": ...} records'),
         "exact": (lambda r: isinstance(r.get("messages"), list) and "answer" in r,
                   'exact needs {"messages": [...], "answer": ...} records'),
         "extraction": (lambda r: isinstance(r.get("text"), str) and "triplets" in r,
                        'extraction needs {"text", "triplets": [[subject, relation, object], ...]} records'),
         "preference": (lambda r: "chosen" in r and "rejected" in r,
                        'preference needs {"prompt" or "messages", "chosen", "rejected"} records')}


def read_eval_records(data: list[str], limit: int = 0) -> list[tuple[dict, str]]:
    """(record, "file:line") of every data file, the first `limit` in all if given; a bad line or file is an error."""
    out: list[tuple[dict, str]] = []
    for name in data:
        with RejectLog(None) as rejects:
            found = list(read_records([name], rejects))
        if rejects.total and not (set(rejects.counts) == {"empty_file"} and not found):
            raise XiaolmError(f"{rejects.total} unreadable records ({rejects.summary()})", where=name,
                              hint="each line must be one JSON object (JSONL), or use CSV/Parquet")
        if not found:
            raise XiaolmError("no records: the file is empty", where=name, hint="give a file with records")
        out += found
        if limit and len(out) >= limit:
            return out[:limit]
    return out


def check_kind(task: str, records: list[tuple[dict, str]]) -> list[dict]:
    """The records, when each is of the kind `task` reads; else an error naming the first that is not."""
    ok, hint = NEEDS[task]
    for record, where in records:
        if not isinstance(record, dict) or not ok(record):
            raise XiaolmError(f"not a record for --task {task} (fields: {', '.join(map(str, record)) or 'none'})",
                              where=where, hint=hint)
    return [record for record, _ in records]


def trained_with_doc_mask(model_path: str) -> bool:
    """A run dir's data.doc_mask from its config.yaml; True (training's default) when it does not say."""
    for folder in (Path(model_path), *Path(model_path).parents[:2]):
        config = folder / "config.yaml"
        if config.is_file():
            import yaml

            loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
            data = loaded.get("data") if isinstance(loaded, dict) else None
            if isinstance(data, dict) and "doc_mask" in data:
                return bool(data["doc_mask"])
    return True


def load_for_eval(model_path: str, device: torch.device, dtype: str, reward: bool = False) -> tuple:
    """(model, tokenizer): the causal LM, or with `reward` the reward model (fp32); a model without tokenizer
    files is an error naming its folder."""
    if reward:
        model, tokenizer = load_reward_model(model_path, device)
    else:
        model, tokenizer = load_model(model_path, device=device, dtype=DTYPES[dtype])
    if tokenizer is None:
        raise XiaolmError("model has no tokenizer files (tokenizer.json)", where=model_path,
                          hint="export it with `xiaolm export`, or copy the tokenizer dir's files beside its weights")
    return model, tokenizer


def evaluate(model_path: str, task: str, data: list[str] | str, limit: int = 0, device: str = "auto",
             doc_mask: bool | None = None, shots: int = 0, method: str = "text", stride: int | None = None,
             seq_len: int = 512, words: bool = False, max_new_tokens: int | None = None, ref: str | None = None,
             beta: float = 0.1, dtype: str = "fp32", batch_size: int = 16) -> tuple[dict, list[dict]]:
    """Run one evaluation task on the records of `data`: (result, per-item predictions, possibly empty)."""
    if task not in TASKS:
        raise XiaolmError(f"unknown task {task!r}", where="--task", hint=f"use one of {', '.join(TASKS)}")
    data = [data] if isinstance(data, str) else list(data)
    where = resolve_device(device)
    # a reward model ranks preference pairs by its own scores
    reward = task == "preference" and is_reward_dir(resolve_model_dir(model_path)[0])
    model, tokenizer = load_for_eval(model_path, where, dtype, reward)
    result: dict = {"task": task, "model": model_path, "data": data}
    if task == "choice":
        from xiaolm.eval.choice import choice_scores
        from xiaolm.eval.choice_data import read_choice_items

        scores, predictions = choice_scores(model, tokenizer, read_choice_items(data, shots, limit), method,
                                            batch_size)
        return {**result, **scores}, predictions
    records = read_eval_records(data, limit)
    if task in ("bleu", "rouge"):
        from xiaolm.eval.generation import generation_scores

        scores, predictions = generation_scores(model, tokenizer, records, words, max_new_tokens or 128,
                                                        batch_size)
        return {**result, **scores}, predictions
    if task == "preference":
        records = preference_records(records)
    items = check_kind(task, records)
    if task == "ppl":
        from xiaolm.eval.perplexity import perplexity_by_source

        doc_mask = trained_with_doc_mask(model_path) if doc_mask is None else doc_mask
        return {**result, **perplexity_by_source(model, tokenizer, items, seq_len, batch_size, doc_mask, stride)}, []
    if task == "exact":
        from xiaolm.eval.qa import exact_match

        return {**result, **exact_summary(exact_match(model, tokenizer, items, max_new_tokens or 48, batch_size))}, []
    if task == "extraction":  # exact-triplet precision, recall, F1
        from xiaolm.eval.extraction import extraction_f1

        return {**result, **extraction_f1(model, tokenizer, items, max_new_tokens or 128, batch_size)}, []
    from xiaolm.eval.preference import preference_accuracy, reward_accuracy

    if reward:
        return {**result, **reward_accuracy(model, tokenizer, items, seq_len, batch_size)}, []
    reference = None
    if ref:
        reference, _ = load_model(ref, device=where, dtype=DTYPES[dtype], with_tokenizer=False)
        if reference.cfg.vocab_size != model.cfg.vocab_size:
            raise XiaolmError(f"vocabulary {reference.cfg.vocab_size} differs from the model's "
                              f"{model.cfg.vocab_size}", where=ref, hint="--ref is the policy's reference model")
    return {**result, **preference_accuracy(model, tokenizer, items, seq_len, batch_size, reference, beta)}, []


def preference_records(records: list[tuple[dict, str]]) -> list[tuple[dict, str]]:
    """(record, where) pairs with MedicalGPT's published reward layout (question, response_chosen/rejected) read
    as preference records."""
    return [({"prompt": r["question"], "chosen": r["response_chosen"], "rejected": r["response_rejected"]}
             if {"question", "response_chosen", "response_rejected"} <= set(r) else r, where) for r, where in records]


def exact_summary(by_kind: dict) -> dict:
    """exact_match's per-kind figures with the overall accuracy and chance (each kind's chance its own)."""
    n = sum(k["n"] for k in by_kind.values())
    return {"n": n, "accuracy": sum(k["correct"] for k in by_kind.values()) / max(1, n),
            "chance": sum(k["chance"] * k["n"] for k in by_kind.values()) / max(1, n), "by_kind": by_kind}
