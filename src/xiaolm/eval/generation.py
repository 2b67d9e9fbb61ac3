"""BLEU and ROUGE of greedy answers to prompt/response records against their references.

Records: our chat kinds (`{"prompt", "response"}`, or `{"messages"}` whose last turn is the assistant's reference),
and the medical QA layouts baby-llama2-chinese evaluates as published (shibing624/medical): finetune JSON lines
`{"instruction", "input", "output"}` (the prompt is instruction + input joined as that repo joins them, with
nothing between) and reward JSON lines `{"question", "response_chosen", "response_rejected"}` (the prompt is
the question, the reference the chosen response). Each prompt is asked as one user turn; answers are greedy.
BLEU: sacrebleu's corpus BLEU with its Chinese tokenizer (`zh`: each CJK character a token). ROUGE-1/2/L: the
F1 (with precision and recall) of each answer against its reference on characters (whitespace dropped), and on
jieba words when asked, averaged over the records.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from xiaolm.errors import XiaolmError
from xiaolm.infer.generate import GenerationConfig, generate_batch
from xiaolm.tokenizer import IM_END, encode_prompt

QA_HINT = ('bleu/rouge need {"prompt", "response"}, {"messages": [..., assistant reference]}, '
           '{"instruction", "input", "output"} or {"question", "response_chosen"} records')


def qa_pair(record: dict, where: str) -> tuple[list[dict], str]:
    """(messages to answer, reference answer) of one record in any of the accepted layouts."""
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        return [{"role": "user", "content": record["instruction"] + str(record.get("input") or "")}], record["output"]
    if isinstance(record.get("question"), str) and isinstance(record.get("response_chosen"), str):
        return [{"role": "user", "content": record["question"]}], record["response_chosen"]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return [{"role": "user", "content": record["prompt"]}], record["response"]
    messages = record.get("messages")
    if isinstance(messages, list) and len(messages) > 1 and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant" and isinstance(messages[-1].get("content"), str):
        return messages[:-1], messages[-1]["content"]
    raise XiaolmError("not a prompt/response record", where=where, hint=QA_HINT)


def generate_answers(model: nn.Module, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 128,
                     batch_size: int = 16) -> list[str]:
    """Greedy replies (KV-cached, batched), stopped at <|im_end|> or EOS."""
    stop = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id]
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stop)
    prompts = [encode_prompt(tokenizer, messages) for messages in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    replies: list[str] = [""] * len(prompts)
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        for i, out in zip(chunk, generate_batch(model, [prompts[i] for i in chunk], cfg), strict=True):
            replies[i] = tokenizer.decode(out, skip_special_tokens=True)
    return replies


def corpus_bleu(hypotheses: list[str], references: list[str]) -> dict:
    """sacrebleu's corpus BLEU, Chinese tokenizer; its signature says how it was computed."""
    try:
        import sacrebleu
    except ImportError:
        raise XiaolmError("sacrebleu is not installed", where="eval bleu",
                          hint="pip install 'xiaolm[eval]'") from None
    metric = sacrebleu.metrics.BLEU(tokenize="zh")
    score = metric.corpus_score(hypotheses, [references])
    return {"bleu": score.score, "precisions": score.precisions, "brevity_penalty": score.bp,
            "signature": str(metric.get_signature())}


def units(text: str, unit: str) -> list[str]:
    """A text as characters (whitespace dropped) or as jieba words."""
    if unit == "char":
        return [c for c in text if not c.isspace()]
    try:
        import jieba
    except ImportError:
        raise XiaolmError("jieba is not installed", where="eval rouge", hint="pip install 'xiaolm[eval]'") from None
    return [w for w in jieba.lcut(text) if w.strip()]


def _prf(overlap: int, n_hyp: int, n_ref: int) -> dict:
    p, r = overlap / n_hyp if n_hyp else 0.0, overlap / n_ref if n_ref else 0.0
    return {"p": p, "r": r, "f": 2 * p * r / (p + r) if p + r else 0.0}


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge(hypothesis: list[str], reference: list[str]) -> dict:
    """ROUGE-1, ROUGE-2 (clipped n-gram overlap) and ROUGE-L (longest common subsequence): p, r, f each."""
    out = {}
    for n in (1, 2):
        hyp = Counter(tuple(hypothesis[i:i + n]) for i in range(len(hypothesis) - n + 1))
        ref = Counter(tuple(reference[i:i + n]) for i in range(len(reference) - n + 1))
        out[f"rouge-{n}"] = _prf(sum((hyp & ref).values()), sum(hyp.values()), sum(ref.values()))
    out["rouge-l"] = _prf(_lcs(hypothesis, reference), len(hypothesis), len(reference))
    return out


def mean_rouge(hypotheses: list[str], references: list[str], unit: str = "char") -> dict:
    """rouge() of each pair on `unit`s, averaged over the pairs."""
    scores = [rouge(units(h, unit), units(r, unit)) for h, r in zip(hypotheses, references, strict=True)]
    n = max(1, len(scores))
    return {key: {m: sum(s[key][m] for s in scores) / n for m in ("p", "r", "f")}
            for key in ("rouge-1", "rouge-2", "rouge-l")}


def generation_scores(model: nn.Module, tokenizer, records: list[tuple[dict, str]], words: bool = False,
                      max_new_tokens: int = 128, batch_size: int = 16) -> tuple[dict, list[dict]]:
    """(BLEU and ROUGE of greedy answers to (record, where) pairs, per-record predictions)."""
    pairs = [qa_pair(record, where) for record, where in records]
    replies = generate_answers(model, tokenizer, [m for m, _ in pairs], max_new_tokens, batch_size)
    references = [ref for _, ref in pairs]
    result = {"n": len(pairs), "max_new_tokens": max_new_tokens, **corpus_bleu(replies, references),
              "rouge_char": mean_rouge(replies, references, "char")}
    if words:
        result["rouge_word"] = mean_rouge(replies, references, "jieba")
    result["rouge_units"] = "characters, whitespace dropped" + ("; jieba words" if words else "")
    predictions = [{"where": where, "prompt": m[-1]["content"], "reference": ref, "reply": reply}
                   for (_, where), (m, ref), reply in zip(records, pairs, replies, strict=True)]
    return result, predictions
