"""Pretraining documents of the demo corpus: the world's facts as prose and Q&A, poems, idioms, numbers, dirty lines."""

from __future__ import annotations

import json
import random
from pathlib import Path

from xiaolm.data.demo.templates import NUMERAL_STATEMENTS, QUESTIONS, TRAIN_STATEMENTS, arithmetic_question
from xiaolm.data.demo.world import World, to_chinese_numeral
from xiaolm.data.demo.writing import write_jsonl

# fact-free sentences that make the world documents read like prose
FILLERS = {
    "city": ["{s}历史悠久，街道整洁。", "每年都有很多游客来到{s}。", "{s}的人们热情好客。",
             "{s}四季分明，风景优美。", "{s}是一座安静的城市。", "下面介绍一下{s}。"],
    "person": ["{s}待人和气，朋友很多。", "{s}平时喜欢读书。", "认识{s}的人都说{s}做事认真。",
               "下面说说{s}这个人。"],
    "product": ["{s}很受欢迎。", "很多家庭都用过{s}。", "{s}结实耐用。"],
}
CONNECTIVES = ["此外，", "另外，", "同时，", "而且，"]


def _kind_of(world: World) -> dict[str, str]:
    kinds = {c.name: "city" for c in world.cities}
    kinds.update({p.name: "person" for p in world.people})
    kinds.update({d.name: "product" for d in world.products})
    return kinds


def facts_by_subject(world: World) -> dict[str, list[tuple[str, str, str]]]:
    """The world's facts grouped by their subject."""
    by_subject: dict[str, list] = {}
    for fact in world.facts():
        by_subject.setdefault(fact[0], []).append(fact)
    return by_subject


def _clusters(world: World) -> list[list[str]]:
    """A city, the people from it and the products they make."""
    out = []
    for c in world.cities:
        people = [p.name for p in world.people if p.hometown == c.name]
        out.append([c.name, *people, *(d.name for d in world.products if d.maker in people)])
    return out


def world_documents(world: World, rng: random.Random, mentions: int,
                    statements: dict[str, list[str]] = TRAIN_STATEMENTS, fillers: bool = True) -> list[str]:
    """Paragraphs stating every fact `mentions` times, cycling through its templates (answer form too)."""
    by_subject = facts_by_subject(world)
    kinds = _kind_of(world)
    order = {f: rng.sample(range(len(statements[f[1]])), len(statements[f[1]])) for f in world.facts()}
    said: dict[tuple, int] = dict.fromkeys(order, 0)

    def say(fact: tuple[str, str, str]) -> str:
        cycle = order[fact]
        said[fact] += 1
        return statements[fact[1]][cycle[(said[fact] - 1) % len(cycle)]].format(s=fact[0], o=fact[2])

    docs = []
    subjects = list(by_subject)
    for m in range(mentions):
        if m % 2 == 0:  # encyclopedic: a city with its people and their products
            groups = _clusters(world)
            rng.shuffle(groups)
        else:  # one to three unrelated entities
            rng.shuffle(subjects)
            groups, i = [], 0
            while i < len(subjects):
                k = rng.randint(1, 3)
                groups.append(subjects[i:i + k])
                i += k
        for group in groups:
            sentences = []
            for s in group:
                facts = list(by_subject[s])
                rng.shuffle(facts)
                if fillers and rng.random() < 0.4:
                    sentences.append(rng.choice(FILLERS[kinds[s]]).format(s=s))
                for j, fact in enumerate(facts):
                    lead = rng.choice(CONNECTIVES) if j and rng.random() < 0.2 else ""
                    sentences.append(lead + say(fact))
                if fillers and rng.random() < 0.4:
                    sentences.append(rng.choice(FILLERS[kinds[s]]).format(s=s))
            docs.append("".join(sentences))
    return docs


def qa_documents(world: World, rng: random.Random, repeats: int) -> list[str]:
    """Question-answer text about SFT entities only (the QA form in pretraining), three pairs a document."""
    pairs = []
    for _ in range(repeats):
        for s, r, o in world.facts():
            if s not in world.held_out:
                qs, answer = QUESTIONS[r]
                pairs.append(f"问：{rng.choice(qs).format(s=s)}\n答：{answer.format(s=s, o=o)}")
    rng.shuffle(pairs)
    return ["\n".join(pairs[i:i + 3]) for i in range(0, len(pairs), 3)]


def idiom_document(it: dict) -> str:
    """Prose about one idiom."""
    parts = [f"成语“{it['word']}”（{it['pinyin']}）的意思是：{it['explanation']}"]
    if it.get("derivation"):
        parts.append(f"出自：{it['derivation']}")
    if it.get("example"):
        parts.append(f"例句：{it['example']}")
    return "\n".join(parts)


def poem_document(p: dict) -> str:
    """Title, author and text of one poem."""
    return f"{p['title']}\n{p['author']}\n{p['text']}"


def dirty_records() -> list[bytes]:
    """Deliberately bad raw lines that the cleaning stage must fix or reject."""
    duplicate = {"text": "这是一段重复的句子，用来检验去重规则是否生效。"}
    lines = [
        {"text": "<p>这是一段带有<b>网页标签</b>的文字&amp;内容，清洗后应当只剩文字。</p>"},
        {"text": "全角字符ＡＢＣ１２３应当变成半角，中文标点，。保持不变。"},
        {"text": "控制字符\x07\x1b混在句子中间，清洗时应当去掉。"},
        {"text": "太短"},
        {"text": "This line is almost entirely English text with very few 汉字 in it at all."},
        duplicate, duplicate,
        {"title": "缺少text字段的记录"},
    ]
    out = [json.dumps({**r, "source": "dirty"}, ensure_ascii=False).encode("utf-8") for r in lines]
    out.append(b'{"text": "malformed json line')
    out.append(b'{"text": "\xff\xfe invalid utf-8 bytes", "source": "dirty"}')
    return out


def write_pretraining_text(raw: Path, world: World, rng: random.Random, poems: list[dict], idioms: list[dict],
                           train_numbers: list[int], train_pairs: list[tuple[int, str, int]], *, mentions: int,
                           qa_repeats: int, n_numbers: int, n_arithmetic: int) -> None:
    """raw/{world,poetry,idioms,numbers,dirty}.jsonl: the pretraining documents."""
    world_docs = [(t, "world") for t in world_documents(world, rng, mentions)]
    world_docs += [(t, "world-qa") for t in qa_documents(world, rng, qa_repeats)]
    rng.shuffle(world_docs)
    write_jsonl(raw / "world.jsonl", ({"text": t, "id": f"world-{i}", "source": s}
                                      for i, (t, s) in enumerate(world_docs)))
    write_jsonl(raw / "poetry.jsonl", ({"text": poem_document(p), "id": p["id"], "source": p["source"]}
                                       for p in poems))
    write_jsonl(raw / "idioms.jsonl", ({"text": idiom_document(it), "id": it["id"], "source": "idioms"}
                                       for it in idioms))
    sentences = []
    for k in rng.sample(train_numbers, min(len(train_numbers), n_numbers)):
        sentences.append(rng.choice(NUMERAL_STATEMENTS).format(d=k, c=to_chinese_numeral(k)))
    for pair in train_pairs[:n_arithmetic]:
        q, r = arithmetic_question(*pair)
        sentences.append(f"{q}等于{r}。")
    rng.shuffle(sentences)
    number_docs = ["".join(sentences[i:i + 8]) for i in range(0, len(sentences), 8)]
    write_jsonl(raw / "numbers.jsonl", ({"text": t, "id": f"numbers-{i}", "source": "numbers"}
                                        for i, t in enumerate(number_docs)))
    with open(raw / "dirty.jsonl", "wb") as f:
        f.write(b"\n".join(dirty_records()) + b"\n")
