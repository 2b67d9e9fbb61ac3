"""Build the demo corpus: pretraining text, SFT chats, preference and extraction records, held-out eval sets.

Held-out design: the facts of `World.held_out` entities appear only in declarative pretraining documents, never
as a question or in any SFT record, so the facts score measures whether pretraining knowledge reaches the chat
model. Held-out numbers and arithmetic pairs appear nowhere in training data.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from pathlib import Path

from xiaolm.data.demo.world import (
    COLOURS,
    PROFESSIONS,
    REGIONS,
    RIVERS,
    SPECIALTIES,
    World,
    generate_world,
    to_chinese_numeral,
)

HERE = Path(__file__).parent

# declarative templates: {s} subject, {o} object
STATEMENTS = {
    "位于": ["{s}位于{o}。", "{s}是{o}的一座城市。", "在{o}，有一座城市叫{s}。", "{s}属于{o}。"],
    "特产": ["{s}的特产是{o}。", "{s}盛产{o}。", "说起{s}，人们会想到当地的{o}。", "{o}是{s}最有名的特产。"],
    "河流": ["{s}的河流是{o}。", "{o}流经{s}。", "{s}坐落在{o}边。", "{s}人喝着{o}的水长大。"],
    "家乡": ["{s}的家乡是{o}。", "{s}来自{o}。", "{s}出生在{o}。", "{s}是{o}人。"],
    "职业": ["{s}的职业是{o}。", "{s}是一名{o}。", "{s}做{o}已经很多年了。", "{s}以{o}为业。"],
    "制造者": ["{s}的制造者是{o}。", "{s}由{o}制造。", "{o}做出了{s}。"],
    "颜色": ["{s}的颜色是{o}。", "{s}是{o}的。", "人们一眼就能认出{o}的{s}。"],
}
# questions and the one reference answer form
QUESTIONS = {
    "位于": (["{s}位于哪里？", "{s}在哪个州？", "请问{s}属于哪个州？"], "{s}位于{o}。"),
    "特产": (["{s}的特产是什么？", "{s}有什么特产？", "{s}盛产什么？"], "{s}的特产是{o}。"),
    "河流": (["{s}的河流是哪条？", "哪条河流经{s}？", "{s}坐落在哪条河边？"], "{s}的河流是{o}。"),
    "家乡": (["{s}的家乡是哪里？", "{s}是哪里人？", "{s}来自哪座城市？"], "{s}的家乡是{o}。"),
    "职业": (["{s}的职业是什么？", "{s}是做什么工作的？", "{s}从事什么职业？"], "{s}的职业是{o}。"),
    "制造者": (["{s}是谁制造的？", "{s}的制造者是谁？"], "{s}的制造者是{o}。"),
    "颜色": (["{s}是什么颜色的？", "{s}的颜色是什么？"], "{s}的颜色是{o}。"),
}
GREETINGS = [
    ("你好", "你好！我是xiaolm，一个从零训练的中文小模型。有什么可以帮你？"),
    ("你好，你是谁？", "我是xiaolm，一个从零训练的中文小模型。"),
    ("你是谁？", "我是xiaolm，一个在个人电脑上从零训练的中文小模型。"),
    ("你能做什么？", "我可以回答关于一些城市和人物的问题，转换中文数字，做两位数的加减法，还能解释成语。"),
    ("谢谢", "不客气！"),
    ("谢谢你的帮助", "不客气，很高兴能帮到你。"),
    ("再见", "再见，欢迎下次再来聊天！"),
    ("早上好", "早上好！祝你今天一切顺利。"),
    ("晚上好", "晚上好！有什么想聊的吗？"),
    ("介绍一下你自己", "我叫xiaolm，是一个小型中文对话模型，参数很少，但学过诗词、成语和一个虚构世界的知识。"),
]
SYSTEM = "你是xiaolm，一个乐于助人的中文助手。"


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _vendored(name: str) -> list[dict]:
    with gzip.open(HERE / name, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _chat(user: str, assistant: str, kind: str, rng: random.Random) -> dict:
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if rng.random() < 0.15:
        msgs.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": msgs, "kind": kind}


def _entity_facts(world: World) -> dict[str, list[tuple[str, str, str]]]:
    by_subject: dict[str, list] = {}
    for fact in world.facts():
        by_subject.setdefault(fact[0], []).append(fact)
    return by_subject


def world_documents(world: World, rng: random.Random, mentions: int) -> Iterator[str]:
    """Paragraphs describing one or two entities with randomly chosen templates, `mentions` per fact."""
    by_subject = _entity_facts(world)
    subjects = list(by_subject)
    for _ in range(mentions):
        rng.shuffle(subjects)
        for i in range(0, len(subjects), 2):
            sentences = []
            for s in subjects[i:i + 2]:
                facts = list(by_subject[s])
                rng.shuffle(facts)
                sentences += [rng.choice(STATEMENTS[r]).format(s=s, o=o) for s, r, o in facts]
            yield "".join(sentences)


def qa_text(world: World, rng: random.Random, repeats: int) -> Iterator[str]:
    """Question-answer text about non-held-out entities only (teaches the QA skill during pretraining)."""
    for _ in range(repeats):
        for s, r, o in world.facts():
            if s not in world.held_out:
                qs, answer = QUESTIONS[r]
                yield f"问：{rng.choice(qs).format(s=s)}\n答：{answer.format(s=s, o=o)}"


def idiom_document(it: dict) -> str:
    """Prose about one idiom."""
    parts = [f"成语“{it['word']}”（{it['pinyin']}）的意思是：{it['explanation']}"]
    if it.get("derivation"):
        parts.append(f"出处：{it['derivation']}")
    if it.get("example"):
        parts.append(f"例句：{it['example']}")
    return "\n".join(parts)


def poem_lines(text: str) -> list[str]:
    """Split a poem into its clauses (，。！？；) with the punctuation removed."""
    out, cur = [], ""
    for ch in text.replace("\n", ""):
        if ch in "，。！？；、":
            if cur.strip():
                out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out


def _number_split(rng: random.Random, held: int) -> tuple[set[int], list[int]]:
    held_out = set(rng.sample(range(200, 10000), held))
    return held_out, [n for n in range(10000) if n not in held_out]


def _arith_pairs(rng: random.Random, held: int) -> tuple[list[tuple[int, str, int]], list[tuple[int, str, int]]]:
    pairs = [(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in "+-" if op == "+" or a >= b]
    rng.shuffle(pairs)
    return pairs[:held], pairs[held:]


def _arith(a: int, op: str, b: int) -> tuple[str, str]:
    word = "加" if op == "+" else "减"
    result = a + b if op == "+" else a - b
    return f"{to_chinese_numeral(a)}{word}{to_chinese_numeral(b)}", to_chinese_numeral(result)


def dirty_records() -> list[bytes]:
    """Deliberately bad raw lines that the cleaning stage must fix or reject."""
    good = {"text": "这是一段重复的句子，用来检验去重规则是否生效。"}
    lines = [
        {"text": "<p>这是一段带有<b>网页标签</b>的文字&amp;内容，清洗后应当只剩文字。</p>"},
        {"text": "全角字符ＡＢＣ１２３应当变成半角，中文标点，。保持不变。"},
        {"text": "控制字符\x07\x1b混在句子中间，清洗时应当去掉。"},
        {"text": "太短"},
        {"text": "This line is almost entirely English text with very few 汉字 in it at all."},
        good, good,
        {"title": "缺少text字段的记录"},
    ]
    out = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in lines]
    out.append(b'{"text": "malformed json line')
    out.append(b'{"text": "\xff\xfe invalid utf-8 bytes"}')
    return out


def build_demo_corpus(out_dir: str | Path, seed: int = 0, scale: float = 1.0, mentions: int = 40,
                      n_poems: int = 2500, n_idioms: int = 4000, sft_idioms: int = 1200, sft_poems: int = 800,
                      sft_numerals: int = 2000, sft_arithmetic: int = 2500, fact_repeats: int = 4,
                      held_numbers: int = 60, held_pairs: int = 60) -> dict[str, Path]:
    """Write every demo data file under out_dir and return their paths by key (see module docstring)."""
    out = Path(out_dir)
    rng = random.Random(seed)
    world = generate_world(seed)

    def n(x: int, floor: int = 1) -> int:
        return max(floor, round(x * scale))

    # ---- split real data: poems and idioms for pretraining / SFT / held-out evaluation
    poems = _vendored("poetry.jsonl.gz")
    idioms = _vendored("idioms.jsonl.gz")
    rng.shuffle(poems)
    rng.shuffle(idioms)
    val_poems, poems = poems[:100], poems[100:100 + n(n_poems, 20)]
    choice_idioms = [it for it in idioms[:400] if 6 <= len(it["explanation"]) <= 60][:max(10, n(100))]
    val_idioms, train_idioms = idioms[400:500], idioms[500:500 + n(n_idioms, 40)]
    pretrain_idioms = train_idioms + choice_idioms  # choice items are knowledge from pretraining only

    held_numbers_set, train_numbers = _number_split(rng, max(10, n(held_numbers)))
    held_pairs_list, train_pairs = _arith_pairs(rng, max(10, n(held_pairs)))

    # ---- pretraining text
    raw = out / "raw"
    world_docs = [{"text": t, "source": "world"} for t in world_documents(world, rng, n(mentions, 4))]
    world_docs += [{"text": t, "source": "world-qa"} for t in qa_text(world, rng, n(fact_repeats, 1))]
    rng.shuffle(world_docs)
    _jsonl(raw / "world.jsonl", [{**d, "id": f"world-{i}"} for i, d in enumerate(world_docs)])
    _jsonl(raw / "poetry.jsonl", [{"text": f"{p['title']}\n{p['author']}\n{p['text']}", **{k: p[k] for k in (
        "id", "source")}} for p in poems])
    _jsonl(raw / "idioms.jsonl", [{"text": idiom_document(it), "id": it["id"], "source": "idioms"}
                                  for it in pretrain_idioms])
    number_docs = []
    for k in rng.sample(train_numbers, min(len(train_numbers), n(3000))):
        number_docs.append(f"{k}写作{to_chinese_numeral(k)}。")
    for a, op, b in train_pairs[:n(4000)]:
        q, r = _arith(a, op, b)
        number_docs.append(f"{q}等于{r}。")
    docs = ["".join(number_docs[i:i + 8]) for i in range(0, len(number_docs), 8)]
    _jsonl(raw / "numbers.jsonl", [{"text": t, "id": f"numbers-{i}", "source": "numbers"} for i, t in enumerate(docs)])
    with open(raw / "dirty.jsonl", "wb") as f:
        f.write(b"\n".join(dirty_records()) + b"\n")

    # ---- SFT chats (never mention held-out entities, numbers or pairs)
    sft: list[dict] = []
    for _ in range(n(fact_repeats, 1)):
        for s, r, o in world.facts():
            if s in world.held_out:
                continue
            qs, answer = QUESTIONS[r]
            sft.append(_chat(rng.choice(qs).format(s=s), answer.format(s=s, o=o), "facts", rng))
    for k in rng.sample(train_numbers, min(len(train_numbers), n(sft_numerals))):
        if rng.random() < 0.6:
            sft.append(_chat(f"把{k}写成中文数字。", to_chinese_numeral(k), "numerals", rng))
        else:
            sft.append(_chat(f"“{to_chinese_numeral(k)}”用阿拉伯数字怎么写？", str(k), "numerals", rng))
    for a, op, b in train_pairs[-n(sft_arithmetic):]:
        q, r = _arith(a, op, b)
        sft.append(_chat(f"{q}等于多少？", r, "arithmetic", rng))
    for it in train_idioms[:n(sft_idioms)]:
        sft.append(_chat(f"“{it['word']}”是什么意思？", it["explanation"], "idioms", rng))
    count = 0
    for p in poems:
        lines = poem_lines(p["text"])
        if len(lines) >= 2 and count < n(sft_poems):
            i = rng.randrange(len(lines) - 1)
            sft.append(_chat(f"“{lines[i]}”的下一句是什么？", lines[i + 1], "poetry", rng))
            count += 1
    for _ in range(n(20, 2)):
        for q, a in GREETINGS:
            sft.append(_chat(q, a, "greeting", rng))
    first = sft[0]["messages"]
    sft.append({"messages": first[-2:] + [{"role": "user", "content": "再说一遍。"},
                                          {"role": "assistant", "content": first[-1]["content"]}], "kind": "multi"})
    rng.shuffle(sft)

    # ---- held-out evaluation
    chance = {"位于": 1 / len(REGIONS), "特产": 1 / len(SPECIALTIES), "河流": 1 / len(RIVERS),
              "家乡": 1 / len(world.cities), "职业": 1 / len(PROFESSIONS)}
    qa = []
    for s, r, o in world.facts():
        if s in world.held_out:
            qs, answer = QUESTIONS[r]
            qa.append({"kind": "facts", "relation": r, "messages": [{"role": "user", "content": qs[0].format(s=s)}],
                       "answer": answer.format(s=s, o=o), "chance": chance[r]})
    mean_chance = sum(q["chance"] for q in qa) / max(1, len(qa))
    for q in qa:
        q["chance"] = mean_chance  # per-kind chance = mean over its questions' value-set sizes
    # a guess among 0..9999 (numerals) or among the 179 possible sums/differences (arithmetic)
    for k in sorted(held_numbers_set):
        if k % 2:
            qa.append({"kind": "numerals", "messages": [{"role": "user", "content": f"把{k}写成中文数字。"}],
                       "answer": to_chinese_numeral(k), "chance": 1 / 10000})
        else:
            qa.append({"kind": "numerals", "messages": [{"role": "user", "content":
                       f"“{to_chinese_numeral(k)}”用阿拉伯数字怎么写？"}], "answer": str(k), "chance": 1 / 10000})
    for a, op, b in held_pairs_list:
        q, r = _arith(a, op, b)
        qa.append({"kind": "arithmetic", "messages": [{"role": "user", "content": f"{q}等于多少？"}],
                   "answer": r, "chance": 1 / 179})
    choice = []
    for i, it in enumerate(choice_idioms):
        others = rng.sample([x["explanation"] for x in val_idioms + train_idioms[:500]
                             if 6 <= len(x["explanation"]) <= 60], 3)
        options = others + [it["explanation"]]
        rng.shuffle(options)
        letters = "ABCD"
        choice.append({"id": f"choice-{i}", "question": f"“{it['word']}”是什么意思？",
                       **dict(zip(letters, options)), "answer": letters[options.index(it["explanation"])]})
    val_rng = random.Random(seed + 1)
    val_text = [{"text": t} for t in list(world_documents(world, val_rng, 1))[:100]]
    val_text += [{"text": f"{p['title']}\n{p['author']}\n{p['text']}"} for p in val_poems if "script" not in p]
    val_text += [{"text": idiom_document(it)} for it in val_idioms]

    # ---- preference pairs and extraction records (for later stages)
    pref = []
    for s, r, o in world.facts():
        if s in world.held_out:
            continue
        qs, answer = QUESTIONS[r]
        pool = {"位于": REGIONS, "特产": SPECIALTIES, "河流": RIVERS, "职业": PROFESSIONS, "颜色": COLOURS,
                "家乡": [c.name for c in world.cities], "制造者": [p.name for p in world.people]}[r]
        wrong = rng.choice([x for x in pool if x != o])
        pref.append({"prompt": rng.choice(qs).format(s=s), "chosen": answer.format(s=s, o=o),
                     "rejected": answer.format(s=s, o=wrong)})
    extraction = []
    by_subject = _entity_facts(world)
    for s, facts in by_subject.items():
        if s in world.held_out:
            continue
        for _ in range(3):
            picked = rng.sample(facts, min(2, len(facts)))
            text = "".join(rng.choice(STATEMENTS[r]).format(s=s, o=o) for s, r, o in picked)
            extraction.append({"text": text, "triplets": [list(f) for f in picked]})

    ev = out / "eval"
    paths = {
        "raw_text": raw,
        "sft": _jsonl(out / "sft.jsonl", sft),
        "eval_qa": _jsonl(ev / "heldout_qa.jsonl", qa),
        "eval_choice": _jsonl(ev / "choice.jsonl", choice),
        "val_text": _jsonl(ev / "val_text.jsonl", val_text),
        "preference": _jsonl(out / "preference.jsonl", pref),
        "extraction": _jsonl(out / "extraction.jsonl", extraction),
    }
    summary = world.size_summary()
    (out / "world.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    paths["world_summary"] = out / "world.json"
    return paths
