"""Preference pairs as a test: does the model give the chosen answer a higher log-probability than the rejected?"""

from __future__ import annotations

import torch
from torch import nn

from xiaolm.errors import Unusable, XiaolmError
from xiaolm.tokenizer.chat import collate, encode_pair


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the answer tokens' log-probs for each row of a collated batch [rows]."""
    return model(batch["x"], batch["y"], output="logprobs").sum(-1)


@torch.no_grad()
def preference_accuracy(model: nn.Module, tokenizer, records: list[dict], seq_len: int = 256,
                        batch_size: int = 16) -> dict:
    """Share of `{"prompt" or "messages", "chosen", "rejected"}` records whose chosen answer has the higher summed
    log-probability, and the mean margin (chosen − rejected, nats); chance is 50%. The model's own preference: no
    reference model, so it compares any two models, the one before DPO included. Records with a `kind` field are
    also scored per kind (`by_kind`)."""
    pairs = []
    for i, record in enumerate(records):
        try:
            pairs.append(encode_pair(tokenizer, record, seq_len))
        except Unusable as e:
            raise XiaolmError(f"record {i + 1}: {e.detail} ({e.reason})", where="eval preference",
                              hint='records must be {"prompt", "chosen", "rejected"} with different answers') from None
    was = model.training
    model.eval()
    margins = []
    device = next(model.parameters()).device
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = collate([c for c, _ in chunk] + [r for _, r in chunk], tokenizer.pad_token_id)
        logps = sequence_logps(model, {k: v.to(device) for k, v in batch.items()}).float().cpu()
        chosen, rejected = logps.chunk(2)
        margins += (chosen - rejected).tolist()
    model.train(was)
    result = _scores(margins)
    kinds = sorted({str(r["kind"]) for r in records if "kind" in r})
    if kinds:  # records that name their kind are also scored by kind
        result["by_kind"] = {k: _scores([m for m, r in zip(margins, records, strict=True) if r.get("kind") == k])
                             for k in kinds}
    return result


def _scores(margins: list[float]) -> dict:
    n = len(margins)
    return {"n": n, "accuracy": sum(m > 0 for m in margins) / max(1, n), "margin": sum(margins) / max(1, n),
            "chance": 0.5}
