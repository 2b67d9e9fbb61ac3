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
def pair_logps(model: nn.Module, pad_id: int, pairs: list, batch_size: int = 16) -> list[tuple[float, float]]:
    """(chosen, rejected) summed answer log-probs of each encoded pair."""
    was = model.training
    model.eval()
    out: list[tuple[float, float]] = []
    device = next(model.parameters()).device
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = collate([c for c, _ in chunk] + [r for _, r in chunk], pad_id)
        chosen, rejected = sequence_logps(model, {k: v.to(device) for k, v in batch.items()}).float().cpu().chunk(2)
        out += zip(chosen.tolist(), rejected.tolist(), strict=True)
    model.train(was)
    return out


def preference_accuracy(model: nn.Module, tokenizer, records: list[dict], seq_len: int = 256,
                        batch_size: int = 16, reference: nn.Module | None = None, beta: float = 0.1) -> dict:
    """Share of `{"prompt" or "messages", "chosen", "rejected"}` records the model prefers the right way; chance 50%.

    Without `reference`: the model's own preference, the chosen answer's summed log-probability above the
    rejected's; the margin is chosen − rejected in nats. So it compares any two models, the one before DPO
    included. With `reference` (the policy's reference model): DPO's implicit reward, beta·(log π − log π_ref),
    of the chosen answer above the rejected's; the margin is that reward difference. Records with a `kind` field
    are also scored per kind (`by_kind`).
    """
    pairs = encode_pairs(tokenizer, records, seq_len)
    logps = pair_logps(model, tokenizer.pad_token_id, pairs, batch_size)
    if reference is None:
        margins = [c - r for c, r in logps]
    else:
        ref = pair_logps(reference, tokenizer.pad_token_id, pairs, batch_size)
        margins = [beta * ((c - rc) - (r - rr)) for (c, r), (rc, rr) in zip(logps, ref, strict=True)]
    return _by_kind(margins, records, "own log-prob margin (nats)" if reference is None else
                    f"implicit DPO reward margin, beta {beta}: beta·(log π − log π_ref), chosen − rejected")


@torch.no_grad()
def reward_accuracy(reward_model: nn.Module, tokenizer, records: list[dict], seq_len: int = 256,
                    batch_size: int = 16) -> dict:
    """Share of preference records a reward model scores chosen above rejected (chance 50%), by kind too."""
    from xiaolm.model.reward import reward_batch

    pairs = encode_pairs(tokenizer, records, seq_len)
    device = next(reward_model.parameters()).device
    margins: list[float] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = reward_batch([c for c, _ in chunk] + [r for _, r in chunk], tokenizer.pad_token_id)
        chosen, rejected = reward_model(batch["x"].to(device), batch["last"].to(device)).cpu().chunk(2)
        margins += (chosen - rejected).tolist()
    return _by_kind(margins, records, "reward model margin, chosen − rejected")


def encode_pairs(tokenizer, records: list[dict], seq_len: int) -> list:
    """Encoded (chosen, rejected) examples of preference records; a bad record is an error naming it."""
    pairs = []
    for i, record in enumerate(records):
        try:
            pairs.append(encode_pair(tokenizer, record, seq_len))
        except Unusable as e:
            where = record.get("_where", f"record {i + 1}") if isinstance(record, dict) else f"record {i + 1}"
            raise XiaolmError(f"record {i + 1}: {e.detail} ({e.reason})", where=f"eval preference: {where}",
                              hint='records must be {"prompt", "chosen", "rejected"} with different answers') from None
    return pairs


def _by_kind(margins: list[float], records: list[dict], score: str) -> dict:
    """Accuracy and mean margin overall and, for records that name their `kind`, per kind."""
    result = {**_scores(margins), "score": score}
    kinds = sorted({str(r["kind"]) for r in records if "kind" in r})
    if kinds:
        result["by_kind"] = {k: _scores([m for m, r in zip(margins, records, strict=True) if r.get("kind") == k])
                             for k in kinds}
    return result


def _scores(margins: list[float]) -> dict:
    n = len(margins)
    return {"n": n, "accuracy": sum(m > 0 for m in margins) / max(1, n), "margin": sum(margins) / max(1, n),
            "chance": 0.5}
