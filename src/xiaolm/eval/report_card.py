"""`xiaolm report RUN_DIR…`: one report card for a pipeline, in Markdown and as a self-contained HTML page.

It reads what the stages left behind, never reruns anything: data stage reports (`report.json` of clean and dedup,
`meta.json` of pack: records in and out, rejected by reason), the tokenizer's `report.json`, every training run
(`done.json`, `log.jsonl`: parameters, steps, tokens, seconds, best validation metric, peak memory; its curves
`loss.png` and, for RL, `reward.png`), and a demo's `results.json` (every evaluation number with its n and chance
level, as report.md gives it). A RUN_DIR may be one of those dirs or a dir holding them (a demo's `--out`, searched
two levels down). The HTML page inlines the plots (base64), so it is one file to send. Numbers go through one
formatter (`num`).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import platform
import re
from pathlib import Path

from xiaolm.errors import XiaolmError
from xiaolm.eval.report import num
from xiaolm.io import atomic_write_text

CURVES = ("loss.png", "reward.png")
ORDER = ("pretrain", "sft", "dpo", "reward", "grpo", "ppo", "finetune", "finetune_scratch")  # the pipeline's order


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def find_dirs(roots: list[Path]) -> list[Path]:
    """The roots and their sub-dirs two levels down, in order, each once."""
    seen: list[Path] = []
    for root in roots:
        if not root.is_dir():
            raise XiaolmError("no such directory", where=str(root), hint="pass run dirs or a demo's --out dir")
        for d in [root, *sorted(p for p in root.iterdir() if p.is_dir()),
                  *sorted(p for p in root.glob("*/*") if p.is_dir() and p.parent.name == "data")]:
            if d not in seen and d.name not in ("checkpoints", "best", "tb"):
                seen.append(d)
    return seen


def _data_rows(dirs: list[Path]) -> list[str]:
    rows = []
    for d in dirs:
        if (d / "meta.json").is_file() and "train_tokens" in (meta := _json(d / "meta.json")):
            rejected = meta.get("rejected") or {}
            rows.append(f"| {d.name} (pack) | {num(meta.get('records_in'))} | {num(meta['train_docs'])} docs, "
                        f"{num(meta['train_tokens'])} train / {num(meta['val_tokens'])} val tokens | "
                        f"{num(sum(rejected.values()))} | {_reasons(rejected)} |")
        elif (d / "report.json").is_file() and "records_in" in (rep := _json(d / "report.json")):
            rejected = rep.get("rejected") or {}
            rows.append(f"| {d.name} | {num(rep['records_in'])} | {num(rep.get('records_out'))} | "
                        f"{num(sum(rejected.values()))} | {_reasons(rejected)} |")
        elif (d / "tokenizer.json").is_file() and (d / "report.json").is_file():
            rep = _json(d / "report.json")
            rows.append(f"| {d.name} ({rep.get('backend', 'bpe')}, vocabulary {num(rep.get('vocab_size'))}) | "
                        f"{num(rep.get('texts'))} texts | {num(rep.get('vocab_size'))} tokens | "
                        f"{num(sum((rep.get('rejected') or {}).values()))} | {_reasons(rep.get('rejected') or {})} |")
    if not rows:
        return []
    return ["## Data", "", "| stage | in | out | rejected | rejected by reason |", "|---|---|---|---|---|", *rows, ""]


def _reasons(rejected: dict) -> str:
    return ", ".join(f"{k} {num(v)}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1])) or "none"


def _training_rows(dirs: list[Path]) -> tuple[list[str], list[tuple[str, Path]]]:
    rows, curves = [], []
    runs = [d for d in dirs if (d / "done.json").is_file() and (d / "log.jsonl").is_file()]
    for d in sorted(runs, key=lambda d: ORDER.index(d.name) if d.name in ORDER else len(ORDER)):
        done = _json(d / "done.json")
        metric = next((k.removeprefix("best_") for k in done if k.startswith("best_")), "")
        best = f"{metric} {num(done[f'best_{metric}'])}" if metric else ""
        stopped = f" (stopped: {done['stopped']})" if done.get("stopped") else ""
        rows.append(f"| {d.name} | {num(done.get('params'))} | {num(done.get('trainable_params'))} | "
                    f"{num(done.get('steps'))} | {num(done.get('tokens_seen'))} | {num(done.get('seconds', ''))} | "
                    f"{best}{stopped} | {num(done.get('peak_mem_mb'))} |")
        curves += [(f"{d.name} {png.removesuffix('.png')}", d / png) for png in CURVES if (d / png).is_file()]
    if not rows:
        return [], []
    head = ["## Training", "", "| run | parameters | trained | steps | tokens seen | seconds | best validation | "
            "peak memory MB |", "|---|---|---|---|---|---|---|---|", *rows, ""]
    return head, curves


def render_card(roots: list[Path]) -> tuple[str, list[tuple[str, Path]]]:
    """(Markdown of the card, the images it shows: (alt text, file))."""
    import torch
    import transformers

    dirs = find_dirs(roots)
    lines = ["# xiaolm report card", "", f"Runs: {', '.join(str(r) for r in roots)}.", "",
             f"Machine: {platform.machine()}, {platform.system()}; Python {platform.python_version()}, torch "
             f"{torch.__version__}, transformers {transformers.__version__} (this report's environment).", ""]
    lines += _data_rows(dirs)
    training, curves = _training_rows(dirs)
    lines += training
    lines += [" ".join(f"![{alt}]({i})" for i, (alt, _) in enumerate(curves)), ""] if curves else []
    for d in dirs:
        if (d / "results.json").is_file() and "exact" in (results := _json(d / "results.json")):
            from xiaolm.eval.report import render_report

            body = render_report(results).splitlines()
            body = body[body.index("## Results"):]  # its data and training parts are the tables above
            body = [f"#{line}" if line.startswith("#") else line for line in body]  # one level down
            lines += [f"## Evaluation ({d.name})", *body, ""]
    if len(lines) <= 6:
        raise XiaolmError("found no stage output to report", where=", ".join(map(str, roots)),
                          hint="pass a demo's --out dir, a training run dir, or data stage output dirs")
    return "\n".join(lines), curves


def to_html(markdown: str, images: list[tuple[str, Path]]) -> str:
    """A self-contained HTML page for the card's Markdown (headings, tables, paragraphs, images inlined)."""
    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)

        def image(m: re.Match) -> str:
            alt, ref = m.group(1), m.group(2)
            if not ref.isdigit():
                return ""
            data = base64.b64encode(images[int(ref)][1].read_bytes()).decode("ascii")
            return (f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{alt}</figcaption></figure>")

        return re.sub(r"!\[(.*?)\]\((.*?)\)", image, text)

    out, table = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if table:
            head, body = table[0], [r for r in table[1:] if not set("".join(r)) <= set("-: ")]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            table = []
        if m := re.match(r"(#{1,6}) (.*)", line):
            out.append(f"<h{len(m.group(1))}>{inline(m.group(2))}</h{len(m.group(1))}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.5}table{border-collapse:"
             "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
             "figure{display:inline-block;margin:.5em}img{max-width:520px}code{background:#f3f3f3}")
    return (f'<!doctype html><html lang="zh"><head><meta charset="utf-8"><title>xiaolm report card</title>'
            f"<style>{style}</style></head><body>{''.join(out)}</body></html>\n")


def write_report_card(roots: list[str | Path], out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write report_card.md (images linked) and report_card.html (images inline) into out_dir (default: the first
    root); returns their paths."""
    roots = [Path(r) for r in roots]
    markdown, images = render_card(roots)  # before making out_dir: a missing root is an error, not a new dir
    out = Path(out_dir or roots[0])
    out.mkdir(parents=True, exist_ok=True)
    linked = re.sub(r"!\[(.*?)\]\((\d+)\)", lambda m: f"![{m.group(1)}]({_relative(images[int(m.group(2))][1], out)})",
                    markdown)
    md, page = out / "report_card.md", out / "report_card.html"
    atomic_write_text(md, linked + "\n")
    atomic_write_text(page, to_html(markdown, images))
    return md, page


def _relative(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def report_arguments(p: argparse.ArgumentParser) -> None:
    """`xiaolm report`'s arguments."""
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a demo's --out dir, training run dirs, stage dirs")
    p.add_argument("--out", help="where report_card.md and report_card.html go (default: the first RUN_DIR)")


def cmd_report(args: argparse.Namespace) -> None:
    """Write the report card and say where."""
    md, page = write_report_card(args.runs, args.out)
    print(f"report card: {md}\n             {page} (self-contained: plots inline)")
