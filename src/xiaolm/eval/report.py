"""The demo's report.md: what was trained, on how much, and the measured numbers beside chance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xiaolm.io import atomic_write_text


def pct(x: float) -> str:
    """A share as a percentage; tiny chance levels keep two significant digits instead of showing 0.0%."""
    return f"{100 * x:.1f}%" if x == 0 or x >= 0.001 else f"{100 * x:.2g}%"


def render_report(r: dict[str, Any]) -> str:
    """Markdown for a finished demo run; `r` is the dict run_demo collects."""
    lines = ["# xiaolm demo report", ""]
    lines += [f"Machine: {r['machine']}. Total time {r['seconds_total']:.0f} s.", ""]
    lines += ["## Data", ""]
    clean = r["clean"]
    lines += [(f"- raw records {clean['records_in']}, kept {clean['records_out']}, rejected "
              f"{sum(clean['rejected'].values())} ({', '.join(f'{k} {v}' for k, v in clean['rejected'].items())})")]
    pack = r["pack"]
    lines += [(f"- tokenizer vocab {r['vocab_size']}; packed {pack['train_tokens']:,} train / {pack['val_tokens']:,} "
              f"val tokens from {pack['train_docs']:,} documents")]
    world = r["world"]
    lines += ["- fictional world: " + ", ".join(f"{k} {v}" for k, v in world.items())]
    lines += [f"- SFT chats {r['sft_records']:,}", ""]
    lines += ["## Training", "", "| stage | params | steps | tokens seen | final val loss | seconds |",
              "|---|---|---|---|---|---|"]
    for name in ("pretrain", "sft"):
        s = r[name]
        lines.append(f"| {name} | {s['params'] / 1e6:.2f}M | {s['steps']} | {s['tokens_seen']:,} | "
                     f"{s['val_loss']:.4f} | {s['seconds']:.0f} |")
    lines += ["", "![pretrain loss](pretrain/loss.png) ![sft loss](sft/loss.png)", ""]
    lines += ["## Results", "", "| measure | value | chance / reference |", "|---|---|---|"]
    ppl = r["ppl"]
    lines.append(f"| val perplexity before pretraining | {ppl['before']:.1f} | {r['vocab_size']} (uniform) |")
    lines.append(f"| val perplexity after pretraining | {ppl['after_pretrain']:.1f} | |")
    lines.append(f"| val perplexity after SFT | {ppl['after_sft']:.1f} | |")
    for source, by_stage in sorted(r.get("ppl_by_source", {}).items()):
        lines.append(f"| val perplexity, {source} only: before → pretrain → SFT | "
                     f"{by_stage['before']:.1f} → {by_stage['after_pretrain']:.1f} → {by_stage['after_sft']:.1f} | |")
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
    lines += ["## Sample answers", ""]
    for kind, m in r["exact"].items():
        for ex in m["examples"]:
            mark = "✓" if ex["correct"] else "✗"
            lines.append(f"- [{kind}] {ex['question']} → {ex['reply']!r} (reference {ex['answer']!r}) {mark}")
    lines += ["", "## Chat", "", f"    xiaolm chat {r['model_dir']}", ""]
    for q, a in r.get("samples", []):
        lines += [f"> {q}", "", a, ""]
    return "\n".join(lines)


def write_report(path: str | Path, results: dict[str, Any]) -> None:
    """Render and write report.md atomically."""
    atomic_write_text(path, render_report(results))
