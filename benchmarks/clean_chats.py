"""Cleaning filters on real chat records: per-rule rejects with web-text limits vs. the chat defaults.

    PYTHONPATH=src python benchmarks/clean_chats.py FILE.jsonl... [--show 3]

FILE: chat records, `{"messages"}` or `{"prompt", "response"}` JSON lines. Every record is normalized as
`xiaolm data clean` does, then tested by each filter of `clean_rules.TEXT_FILTERS` and `CHAT_FILTERS` with the
default CleanConfig in two ways:
- web text: the contents joined, the text limits (`min_cjk_ratio`, `max_dup_line_ratio`, `max_dup_ngram_ratio`):
  how chats were judged before they had their own defaults;
- chat: the chat limits (`chat_min_cjk_ratio`, `chat_max_dup_*`), the repetition filters on each answer alone;
  what `xiaolm data clean` does now.
Per rule: how many records fail it on its own ("alone") and how many it rejects as the first failing filter
("first", the reason rejects.jsonl gives), plus `--show N` rejected examples per rule. Nothing here is a test: the
figures go to benchmarks/RESULTS.md and the README.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from xiaolm.data.clean import CleanConfig, Cleaner
from xiaolm.data.clean_rules import CHAT_FILTERS, TEXT_FILTERS, assistant_answers
from xiaolm.tokenizer.chat import normalize_chat


def judge(messages: list[dict], cleaner: Cleaner, cfg: CleanConfig) -> tuple[dict[str, bool], dict[str, bool]]:
    """rule → fails, for web-text limits and for the chat defaults."""
    joined = "\n".join(m["content"] for m in messages)
    answers = assistant_answers(messages)
    web = {f.reason: f.fails(messages, getattr(cfg, f.setting)) for f in CHAT_FILTERS}
    chat = dict(web)
    for f in TEXT_FILTERS:
        if f.prepare:  # block list, language ID: off by default
            continue
        value = getattr(cfg, f.setting)
        web[f.reason] = not f.off(value) and f.fails(joined, value)
        value = getattr(cfg, f.chat_setting or f.setting)
        targets = answers if f.per_answer else [joined]
        chat[f.reason] = not f.off(value) and any(f.fails(t, value) for t in targets)
    return web, chat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--show", type=int, default=0, help="rejected examples to print per rule and way")
    args = parser.parse_args()
    cfg = CleanConfig()
    cleaner = Cleaner(cfg)
    order = [f.reason for f in CHAT_FILTERS + TEXT_FILTERS if not f.prepare]
    for path in args.files:
        alone = {"web": Counter(), "chat": Counter()}
        first = {"web": Counter(), "chat": Counter()}
        shown: dict[tuple[str, str], int] = Counter()
        n = 0
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            messages = [{**m, "content": cleaner.normalize(m["content"])} for m in normalize_chat(json.loads(line))]
            n += 1
            for way, fails in zip(("web", "chat"), judge(messages, cleaner, cfg), strict=True):
                failed = [r for r in order if fails[r]]
                alone[way].update(failed)
                if failed:
                    first[way][failed[0]] += 1
                    if shown[way, failed[0]] < args.show:
                        shown[way, failed[0]] += 1
                        print(f"  [{way} {failed[0]}] {json.dumps(messages, ensure_ascii=False)[:300]}")
        print(f"\n{Path(path).name}: {n} records; kept {n - sum(first['web'].values())} with web-text limits, "
              f"{n - sum(first['chat'].values())} with the chat defaults")
        print("| rule | web text: alone | first | chat defaults: alone | first |\n|---|---|---|---|---|")
        for r in order:
            print(f"| {r} | {alone['web'][r]} | {first['web'][r]} | {alone['chat'][r]} | {first['chat'][r]} |")


if __name__ == "__main__":
    main()
