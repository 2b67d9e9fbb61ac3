"""`xiaolm eval`: one model, one task, one data file; the model on the same device choice as training."""

from __future__ import annotations

from xiaolm.device import resolve_device
from xiaolm.errors import XiaolmError
from xiaolm.eval.extraction import extraction_f1
from xiaolm.eval.perplexity import perplexity_by_source
from xiaolm.eval.preference import preference_accuracy
from xiaolm.eval.qa import choice_accuracy, exact_match
from xiaolm.model.export import load_model
from xiaolm.records.read import read_items

TASKS = ("ppl", "exact", "choice", "extraction", "preference")


def evaluate(model_path: str, task: str, data: str, limit: int = 0, device: str = "auto",
             doc_mask: bool = True) -> dict:
    """Run one evaluation task on the records of `data` and return its result."""
    if task not in TASKS:
        raise XiaolmError(f"unknown task {task!r}", where="--task", hint=f"use one of {', '.join(TASKS)}")
    model, tokenizer = load_model(model_path, device=resolve_device(device))
    if tokenizer is None:
        raise XiaolmError("model has no tokenizer files", where=model_path, hint="export it with `xiaolm export`")
    items = read_items(data, limit)
    if not items:
        raise XiaolmError("no records to evaluate", where=data)
    if task == "ppl":
        missing = [i for i, r in enumerate(items) if not isinstance(r.get("text"), str)]
        if missing:
            raise XiaolmError(f"record {missing[0] + 1} has no 'text' field", where=data,
                              hint="ppl needs {\"text\": ...} records")
        return perplexity_by_source(model, tokenizer, items, doc_mask=doc_mask)
    if task == "exact":
        return exact_match(model, tokenizer, items)
    if task == "extraction":  # {"text", "triplets"} records: exact-triplet precision, recall, F1
        return extraction_f1(model, tokenizer, items)
    if task == "preference":  # {"prompt", "chosen", "rejected"}: the model's own preference, chance 50%
        return preference_accuracy(model, tokenizer, items)
    return choice_accuracy(model, tokenizer, items)
