"""SFT chats of the demo corpus: questions about SFT entities, numerals, arithmetic, idioms, poems, greetings."""

from __future__ import annotations

import json
import random
import re

from xiaolm.data.demo.templates import (
    ARITH_QUESTIONS,
    IDIOM_QUESTIONS,
    QUESTIONS,
    TO_ARABIC,
    TO_CHINESE,
    arithmetic_question,
)
from xiaolm.data.demo.world import World, to_chinese_numeral

_HANZI_LINE = re.compile(r"[\u4e00-\u9fff]{4,24}")
GREETINGS = [
    ("你好", "你好！我是小模型xiaolm，一个从零训练的中文小模型。有什么可以帮你？"),
    ("你好，你是谁？", "我是小模型xiaolm，一个从零训练的中文小模型。"),
    ("你是谁？", "我是小模型xiaolm，一个在个人电脑上从零训练的中文小模型。"),
    ("你叫什么名字？", "我叫xiaolm，是一个小型中文对话模型。"),
    ("你能做什么？",
     "我可以回答关于一些城市和人物的问题，转换中文数字，做两位数的加减法，还能解释成语、接诗句。"),
    ("谢谢", "不客气！"),
    ("谢谢你的帮助", "不客气，很高兴能帮到你。"),
    ("再见", "再见，欢迎下次再来聊天！"),
    ("早上好", "早上好！祝你今天一切顺利。"),
    ("晚上好", "晚上好！有什么想聊的吗？"),
    ("介绍一下你自己",
     "我叫xiaolm，是一个小型中文对话模型，参数很少，但学过诗词、成语和一个虚构世界的知识。"),
]
SYSTEM = "你是xiaolm，一个乐于助人的中文助手。"


def _chat(user: str, assistant: str, kind: str, rng: random.Random) -> dict:
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if rng.random() < 0.15:
        msgs.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": msgs, "kind": kind}


def poem_lines(text: str) -> list[str]:
    """Split a poem into its clauses (，。！？；、) with the punctuation removed."""
    out, cur = [], ""
    for ch in text.replace("\n", ""):
        if ch in "，。！？；、":
            if cur.strip():
                out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out


def mentions_any(record: dict, names: list[str]) -> bool:
    """Whether any of the names occurs anywhere in the record."""
    text = json.dumps(record, ensure_ascii=False)
    return any(name in text for name in names)


def sft_chats(world: World, rng: random.Random, poems: list[dict], idioms: list[dict], train_numbers: list[int],
              train_pairs: list[tuple[int, str, int]], hidden: list[str], *, fact_repeats: int, numerals: int,
              arithmetic: int, n_idioms: int, n_poems: int, greeting_repeats: int, multi_turn: int) -> list[dict]:
    """Chats about SFT entities, training numbers and pairs, training idioms and poems; none mentions `hidden`."""
    sft: list[dict] = []
    for _ in range(fact_repeats):
        for s, r, o in world.facts():
            if s not in world.held_out:
                qs, answer = QUESTIONS[r]
                sft.append(_chat(rng.choice(qs).format(s=s), answer.format(s=s, o=o), "facts", rng))
    for k in rng.sample(train_numbers, min(len(train_numbers), numerals)):
        c = to_chinese_numeral(k)
        if rng.random() < 0.6:
            sft.append(_chat(rng.choice(TO_CHINESE).format(d=k), c, "numerals", rng))
        else:
            sft.append(_chat(rng.choice(TO_ARABIC).format(c=c), str(k), "numerals", rng))
    for pair in train_pairs[-arithmetic:]:
        q, r = arithmetic_question(*pair)
        sft.append(_chat(rng.choice(ARITH_QUESTIONS).format(q=q), r, "arithmetic", rng))
    for it in idioms[:n_idioms]:
        sft.append(_chat(rng.choice(IDIOM_QUESTIONS).format(w=it["word"]), it["explanation"], "idioms", rng))
    count = 0
    for p in poems:
        lines = poem_lines(p["text"])
        # consecutive clauses of plain hanzi only (Yuan qu carry stage directions such as （正旦唱）)
        starts = [i for i in range(len(lines) - 1) if _HANZI_LINE.fullmatch(lines[i] + lines[i + 1])]
        if p.get("script") == "traditional" or not starts or count >= n_poems:
            continue
        i = rng.choice(starts)
        sft.append(_chat(f"“{lines[i]}”的下一句是什么？", lines[i + 1], "poetry", rng))
        count += 1
    for _ in range(greeting_repeats):
        for q, a in GREETINGS:
            sft.append(_chat(q, a, "greeting", rng))
    # held-out names and choice idioms may also hide inside real text: drop such records
    sft = [r for r in sft if not mentions_any(r, hidden)]
    singles = list(sft)
    for _ in range(multi_turn):
        picked = rng.sample(singles, rng.randint(2, 3))
        turns = [m for r in picked for m in r["messages"] if m["role"] != "system"]
        if rng.random() < 0.3:
            turns.insert(0, {"role": "system", "content": SYSTEM})
        sft.append({"messages": turns, "kind": "multi_turn"})
    rng.shuffle(sft)
    return sft
