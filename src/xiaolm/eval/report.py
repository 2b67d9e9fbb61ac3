"""The demo's report.md: what was trained, on how much, and the measured numbers beside chance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xiaolm.io import atomic_write_text


def num(x: Any) -> str:
    """The reports' one number format: integers with thousands separators, other numbers to 4 significant digits
    (report.md and the report card alike)."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1000):
        return f"{int(x):,}"
    if isinstance(x, float):
        return f"{x:,.4g}" if abs(x) < 1e6 else f"{x:,.0f}"
    return str(x)


def pct(x: float) -> str:
    """A share as a percentage, in the one number format (62%, 16.67%, 0.01%)."""
    return f"{num(100 * float(x))}%"


def render_report(r: dict[str, Any]) -> str:
    """Markdown for a finished demo run; `r` is the dict run_demo collects."""
    lines = ["# xiaolm demo report", ""]
    lines += [f"Machine: {r['machine']}. Total time {num(r['seconds_total'])} s.", ""]
    lines += ["## Data", ""]
    clean = r["clean"]
    lines += [(f"- raw records {clean['records_in']}, kept {clean['records_out']}, rejected "
              f"{sum(clean['rejected'].values())} ({', '.join(f'{k} {v}' for k, v in clean['rejected'].items())})")]
    pack = r["pack"]
    lines += [(f"- tokenizer vocab {r['vocab_size']}; packed {num(pack['train_tokens'])} train / "
              f"{num(pack['val_tokens'])} val tokens from {num(pack['train_docs'])} documents")]
    world = r["world"]
    lines += ["- fictional world: " + ", ".join(f"{k} {v}" for k, v in world.items())]
    lines += [f"- SFT chats {num(r['sft_records'])}", ""]
    arch = {"llama": "decoder-only (Llama)", "t5": "encoder-decoder (T5): the prompt goes to the encoder, the answer "
            "comes from the decoder; pretraining cuts each text window into a source and the continuation to "
            "predict; no reward model (xiaolm's are decoder-only)"}
    lines += ["## Training", "", f"Model: {arch.get(r.get('arch', 'llama'), r.get('arch'))}.", ""]
    lines += ["| stage | params | steps | tokens seen | final validation metric | seconds |",
              "|---|---|---|---|---|---|"]
    stages = [name for name in ("pretrain", "sft", "dpo", "reward", "grpo", "finetune", "finetune_scratch")
              if name in r]
    for name in stages:
        s = r[name]
        metric = next(k.removeprefix("best_") for k in s if k.startswith("best_"))
        lines.append(f"| {name} | {num(s['params'] / 1e6)}M | {num(s['steps'])} | {num(s['tokens_seen'])} | "
                     f"{metric} {num(s[metric])} | {num(s['seconds'])} |")
    lines += ["", " ".join(f"![{name} loss]({name}/loss.png)" for name in stages)
              + (" ![grpo mean reward](grpo/reward.png)" if "grpo" in r else ""), ""]
    lines += ["## Results", "", "| measure | value | chance / reference |", "|---|---|---|"]
    ppl = r["ppl"]
    lines.append(f"| val perplexity before pretraining | {num(ppl['before'])} | {num(r['vocab_size'])} (uniform) |")
    lines.append(f"| val perplexity after pretraining | {num(ppl['after_pretrain'])} | |")
    lines.append(f"| val perplexity after SFT | {num(ppl['after_sft'])} | |")
    for source, by_stage in sorted(r.get("ppl_by_source", {}).items()):
        lines.append(f"| val perplexity, {source} only: before → pretrain → SFT | "
                     + " → ".join(num(by_stage[k]) for k in ("before", "after_pretrain", "after_sft")) + " | |")
    for kind, m in r["exact"].items():
        lines.append(f"| exact match: {kind} ({m['n']} held-out questions) | {pct(m['accuracy'])} | "
                     f"{pct(m['chance'])} |")
    ch = r["choice"]
    lines.append(f"| multiple choice: idiom meaning ({ch['n']} items) | {pct(ch['accuracy'])} | "
                 f"{pct(ch['chance'])} |")
    lines += ["", ("Facts questions ask about entities whose attributes appear only in the pretraining documents, "
              "never in SFT data: they measure whether pretraining knowledge reaches the chat model. "
              "Numerals and arithmetic questions use numbers absent from all training data (a held-out sum's "
              "swapped twin too). The validation text's world sentences use phrasings the training text never "
              "uses, so its perplexity measures generalization, not recall. Perplexity after SFT "
              "is measured on the same raw-text validation set; it rises because SFT trains only on chat-formatted "
              "answers, so the chat model drifts away from plain prose."), ""]
    lines += _later_stages(r)
    lines += ["## Sample answers", ""]
    for kind, m in r["exact"].items():
        for ex in m["examples"]:
            mark = "✓" if ex["correct"] else "✗"
            lines.append(f"- [{kind}] {ex['question']} → {ex['reply']!r} (reference {ex['answer']!r}) {mark}")
    lines += ["", "## Chat", "", f"    xiaolm chat {r['model_dir']}", ""]
    for q, a in r.get("samples", []):
        lines += [f"> {q}", "", a, ""]
    return "\n".join(lines)


def _later_stages(r: dict[str, Any]) -> list[str]:
    """DPO's held-out preference, the triplet fine-tune against its untrained ablation, chat ability per stage."""
    if "preference" not in r:
        return []
    before, after = r["preference"]["before"], r["preference"]["after"]
    lines = ["## Preference tuning and fine-tuning", "", "| measure | value | chance / reference |", "|---|---|---|",
             f"| held-out preference pairs ({after['n']}): chosen more likely, SFT → DPO | {pct(before['accuracy'])} → "
             f"{pct(after['accuracy'])} | {pct(after['chance'])} |",
             f"| mean log-prob margin chosen − rejected (nats), SFT → DPO | {num(before['margin'])} → "
             f"{num(after['margin'])} | 0 |"]
    for name, label in (("finetune", "pretrain → SFT → DPO → fine-tune"),
                        ("finetune_scratch", "untrained → fine-tune")):
        ret = r[name]["retention"]
        a = ret["after"]
        lines.append(f"| triplet F1 / precision / recall ({ret['extraction_records']} held-out records), {label} | "
                     f"{num(a['triplet_f1'])} / {num(a['triplet_precision'])} / {num(a['triplet_recall'])} | "
                     f"{num(ret['before']['triplet_f1'])} before |")
    if "reward" in r:
        rm = r["reward"]["heldout"]
        lines.append(f"| reward model: held-out preference pairs ({rm['n']}) scored chosen > rejected | "
                     f"{pct(rm['accuracy'])} | {pct(rm['chance'])}; Zero-Chatgpt reports 92% on its own data |")
    stages = list(r["chat_exact"])
    for kind in r["chat_exact"][stages[0]]:
        chance = r["exact"][kind]["chance"]
        lines.append(f"| chat exact match, {kind}: {' → '.join(stages)} | "
                     f"{' → '.join(pct(r['chat_exact'][s][kind]) for s in stages)} | {pct(chance)} |")
    lines += ["", ("The held-out preference pairs ask about entities and sums that no training pair mentions; the "
                   "rejected answer is a plausible wrong one (another city, river or trade of the same kind, a sum "
                   "off by 1 or 10). A pair counts when the model gives the chosen answer the higher summed "
                   "log-probability. The fine-tune mixes SFT chats into a quarter of its rows to keep the chat "
                   "ability; its ablation runs the same fine-tune from an untrained model of the same shape. "
                   "Chat exact match is the held-out question set above, asked of each stage's model; reward, GRPO "
                   "and the fine-tune each start from the DPO model. GRPO samples 8 answers to each of its numeral "
                   "and arithmetic prompts (training numbers and sums that no SFT chat asks; never held-out ones) "
                   "and rewards the exact answer; grpo/reward.png is its mean reward per step."), ""]
    return lines


def write_report(path: str | Path, results: dict[str, Any]) -> None:
    """Render and write report.md atomically."""
    atomic_write_text(path, render_report(results))
