"""Build the demo corpus: pretraining text, SFT chats, preference and extraction records, held-out eval sets.

Held-out design: the facts of `World.held_out` entities appear only in declarative pretraining documents,
never as a question or in any SFT, preference or extraction record, so the facts score measures whether
pretraining knowledge reaches the chat model. Held-out numbers and arithmetic pairs appear nowhere in training
data; held-out idioms (multiple choice) appear in pretraining text but in no SFT record.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

from xiaolm.data.demo.world import World, generate_world, to_chinese_numeral

HERE = Path(__file__).parent
_HANZI_LINE = re.compile(r"[\u4e00-\u9fff]{4,24}")

# declarative templates, {s} subject and {o} object; the first one is also the answer form of QUESTIONS
STATEMENTS = {
    "位于": ["{s}位于{o}。", "{s}是{o}的一座城市。", "在{o}，有一座城市叫{s}。", "{s}属于{o}管辖。",
           "从地图上看，{s}在{o}境内。", "{s}坐落于{o}。"],
    "特产": ["{s}的特产是{o}。", "{s}盛产{o}。", "说起{s}，人们会想到当地的{o}。", "{o}是{s}最有名的特产。",
           "{s}出产的{o}远近闻名。", "去{s}的人，大多会带些当地的{o}回家。"],
    "河流": ["{s}的河流是{o}。", "{o}流经{s}。", "{s}坐落在{o}边。", "{s}人喝着{o}的水长大。",
           "{o}缓缓流过{s}。"],
    "家乡": ["{s}的家乡是{o}。", "{s}来自{o}。", "{s}出生在{o}。", "{s}是{o}人。", "{s}从小在{o}长大。"],
    "职业": ["{s}的职业是{o}。", "{s}是一名{o}。", "{s}做{o}已经很多年了。", "{s}以{o}为业。",
           "大家都知道{s}是个{o}。"],
    "制造者": ["{s}的制造者是{o}。", "{s}由{o}制造。", "{o}做出了{s}。", "{s}是{o}亲手设计制造的。"],
    "颜色": ["{s}的颜色是{o}。", "{s}是{o}的。", "人们一眼就能认出{o}的{s}。", "{s}通体{o}。"],
}
# question phrasings and the one reference answer form
QUESTIONS = {
    "位于": (["{s}位于哪里？", "{s}在哪个州？", "请问{s}属于哪个州？"], "它位于{o}。"),
    "特产": (["{s}的特产是什么？", "{s}有什么特产？", "{s}盛产什么？"], "它的特产是{o}。"),
    "河流": (["{s}的河流是哪条？", "哪条河流经{s}？", "{s}坐落在哪条河边？"], "它的河流是{o}。"),
    "家乡": (["{s}的家乡是哪里？", "{s}是哪里人？", "{s}来自哪座城市？"], "家乡是{o}。"),
    "职业": (["{s}的职业是什么？", "{s}是做什么工作的？", "{s}从事什么职业？"], "职业是{o}。"),
    "制造者": (["{s}是谁制造的？", "{s}的制造者是谁？"], "它的制造者是{o}。"),
    "颜色": (["{s}是什么颜色的？", "{s}的颜色是什么？"], "它的颜色是{o}。"),
}
# answers name only the value, never the subject: a tiny model fails at copying a name it never saw in SFT,
# which would hide whether it knows the fact
# fact-free sentences that make the world documents read like prose
FILLERS = {
    "city": ["{s}历史悠久，街道整洁。", "每年都有很多游客来到{s}。", "{s}的人们热情好客。",
             "{s}四季分明，风景优美。", "{s}是一座安静的城市。", "下面介绍一下{s}。"],
    "person": ["{s}待人和气，朋友很多。", "{s}平时喜欢读书。", "认识{s}的人都说{s}做事认真。",
               "下面说说{s}这个人。"],
    "product": ["{s}很受欢迎。", "很多家庭都用过{s}。", "{s}结实耐用。"],
}
CONNECTIVES = ["此外，", "另外，", "同时，", "而且，"]
NUMERAL_STATEMENTS = ["{d}写作{c}。", "{c}写成阿拉伯数字是{d}。", "阿拉伯数字{d}读作{c}。"]
TO_CHINESE = ["把{d}写成中文数字。", "{d}用中文数字怎么写？", "请把{d}写成汉字。"]
TO_ARABIC = ["“{c}”用阿拉伯数字怎么写？", "把“{c}”写成阿拉伯数字。"]
ARITH_QUESTIONS = ["{q}等于多少？", "请计算：{q}。", "{q}是多少？"]
IDIOM_QUESTIONS = ["“{w}”是什么意思？", "成语“{w}”是什么意思？", "请解释成语“{w}”。"]
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
# chance of a blind guess: numerals answer with one of the 10,000 numbers 0..9999; every sum or difference of
# two two-digit numbers lies in 0..198, i.e. one of 199 values
NUMERAL_CHANCE = 1 / 10000
ARITHMETIC_CHANCE = 1 / 199


def _jsonl(path: Path, records: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def load_vendored(name: str) -> list[dict]:
    """Records of one vendored file (`poetry.jsonl.gz` or `idioms.jsonl.gz`)."""
    with gzip.open(HERE / name, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _chat(user: str, assistant: str, kind: str, rng: random.Random) -> dict:
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if rng.random() < 0.15:
        msgs.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": msgs, "kind": kind}


def _kind_of(world: World) -> dict[str, str]:
    kinds = {c.name: "city" for c in world.cities}
    kinds.update({p.name: "person" for p in world.people})
    kinds.update({d.name: "product" for d in world.products})
    return kinds


def _facts_by_subject(world: World) -> dict[str, list[tuple[str, str, str]]]:
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


def world_documents(world: World, rng: random.Random, mentions: int) -> list[str]:
    """Paragraphs stating every fact `mentions` times, cycling through its templates (answer form too)."""
    by_subject = _facts_by_subject(world)
    kinds = _kind_of(world)
    order = {f: rng.sample(range(len(STATEMENTS[f[1]])), len(STATEMENTS[f[1]])) for f in world.facts()}
    said: dict[tuple, int] = dict.fromkeys(order, 0)

    def say(fact: tuple[str, str, str]) -> str:
        cycle = order[fact]
        said[fact] += 1
        return STATEMENTS[fact[1]][cycle[(said[fact] - 1) % len(cycle)]].format(s=fact[0], o=fact[2])

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
                if rng.random() < 0.4:
                    sentences.append(rng.choice(FILLERS[kinds[s]]).format(s=s))
                for j, fact in enumerate(facts):
                    lead = rng.choice(CONNECTIVES) if j and rng.random() < 0.2 else ""
                    sentences.append(lead + say(fact))
                if rng.random() < 0.4:
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


def arithmetic_question(a: int, op: str, b: int) -> tuple[str, str]:
    """(“三十七加二十五”, “六十二”) for (37, "+", 25)."""
    word = "加" if op == "+" else "减"
    result = a + b if op == "+" else a - b
    return f"{to_chinese_numeral(a)}{word}{to_chinese_numeral(b)}", to_chinese_numeral(result)


def _held_out_numbers(rng: random.Random, n: int, real_text: str) -> set[int]:
    """Four-digit numbers not ending in 0 (so no other numeral contains theirs) that no real text mentions."""
    candidates = [k for k in range(1000, 10000) if k % 10]
    rng.shuffle(candidates)
    held: list[int] = []
    for k in candidates:
        if len(held) == n:
            break
        if str(k) not in real_text and to_chinese_numeral(k) not in real_text:
            held.append(k)
    return set(held)


Pair = tuple[int, str, int]


def _arithmetic_pairs(rng: random.Random, n: int) -> tuple[list[Pair], list[Pair]]:
    """(held out, training) pairs of two-digit numbers; differences are never negative."""
    pairs = [(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in "+-" if op == "+" or a >= b]
    rng.shuffle(pairs)
    held = []
    for pair in pairs:
        q, r = arithmetic_question(*pair)
        if r not in q:  # the answer must not be readable from the question (20-10: 十 inside 二十减十)
            held.append(pair)
        if len(held) == n:
            break
    chosen = set(held)
    return held, [p for p in pairs if p not in chosen]


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


def _mentions_any(record: dict, names: list[str]) -> bool:
    text = json.dumps(record, ensure_ascii=False)
    return any(name in text for name in names)


def build_demo_corpus(out_dir: str | Path, seed: int = 0, scale: float = 1.0, *, mentions: int = 40,
                      qa_repeats: int = 3, n_poems: int = 1500, n_idioms: int = 1500, n_numbers: int = 3000,
                      n_arithmetic: int = 6000, sft_fact_repeats: int = 6, sft_idioms: int = 600,
                      sft_poems: int = 400, sft_numerals: int = 2500, sft_arithmetic: int = 3500,
                      sft_greeting_repeats: int = 20, sft_multi_turn: int = 300, held_numbers: int = 60,
                      held_pairs: int = 60, n_choice: int = 100, n_val_world: int = 100,
                      n_val_real: int = 150, n_preference: int = 200,
                      n_extraction: int = 200) -> dict[str, Path]:
    """Write every demo data file under out_dir and return their paths by key (see module docstring)."""
    out = Path(out_dir)
    rng = random.Random(seed)
    world = generate_world(seed)
    held_names = sorted(world.held_out)

    def n(x: int, floor: int = 1) -> int:
        return max(floor, round(x * scale))

    # ---- split real data: pretraining (+ SFT) / held-out validation text / held-out multiple choice
    poems = load_vendored("poetry.jsonl.gz")
    idioms = load_vendored("idioms.jsonl.gz")
    rng.shuffle(poems)
    rng.shuffle(idioms)
    n_val = n(n_val_real, 10)
    val_poems = [p for p in poems[:n_val] if p.get("script") != "traditional"]
    poems = poems[n_val:n_val + n(n_poems, 20)]
    val_idioms, idioms = idioms[:n_val], idioms[n_val:]
    short = [it for it in idioms if 6 <= len(it["explanation"]) <= 60]
    choice_idioms = short[:n(n_choice, 10)]
    choice_words = [it["word"] for it in choice_idioms]
    # wrong options are the explanations of other choice idioms: like the right one, each appears in pretraining
    # text only, so picking it needs the idiom-explanation association, not familiarity from SFT
    distractors = sorted({it["explanation"] for it in choice_idioms})
    train_idioms = [it for it in idioms if it["word"] not in set(choice_words)][:n(n_idioms, 40)]
    pretrain_idioms = train_idioms + choice_idioms  # the choice idioms are knowledge from pretraining only
    rng.shuffle(pretrain_idioms)
    real_text = "\n".join([poem_document(p) for p in poems] + [idiom_document(it) for it in pretrain_idioms])

    held_number_set = _held_out_numbers(rng, n(held_numbers, 10), real_text)
    train_numbers = [k for k in range(10000) if k not in held_number_set]
    held_pair_list, train_pairs = _arithmetic_pairs(rng, n(held_pairs, 10))

    # ---- pretraining text
    raw = out / "raw"
    world_docs = [(t, "world") for t in world_documents(world, rng, n(mentions, 6))]
    world_docs += [(t, "world-qa") for t in qa_documents(world, rng, n(qa_repeats, 1))]
    rng.shuffle(world_docs)
    _jsonl(raw / "world.jsonl", ({"text": t, "id": f"world-{i}", "source": s}
                                 for i, (t, s) in enumerate(world_docs)))
    _jsonl(raw / "poetry.jsonl", ({"text": poem_document(p), "id": p["id"], "source": p["source"]}
                                  for p in poems))
    _jsonl(raw / "idioms.jsonl", ({"text": idiom_document(it), "id": it["id"], "source": "idioms"}
                                  for it in pretrain_idioms))
    sentences = []
    for k in rng.sample(train_numbers, min(len(train_numbers), n(n_numbers))):
        sentences.append(rng.choice(NUMERAL_STATEMENTS).format(d=k, c=to_chinese_numeral(k)))
    for pair in train_pairs[:n(n_arithmetic)]:
        q, r = arithmetic_question(*pair)
        sentences.append(f"{q}等于{r}。")
    rng.shuffle(sentences)
    number_docs = ["".join(sentences[i:i + 8]) for i in range(0, len(sentences), 8)]
    _jsonl(raw / "numbers.jsonl", ({"text": t, "id": f"numbers-{i}", "source": "numbers"}
                                   for i, t in enumerate(number_docs)))
    with open(raw / "dirty.jsonl", "wb") as f:
        f.write(b"\n".join(dirty_records()) + b"\n")

    # ---- SFT chats: SFT entities, training numbers and pairs, training idioms and poems only
    sft: list[dict] = []
    for _ in range(n(sft_fact_repeats)):
        for s, r, o in world.facts():
            if s not in world.held_out:
                qs, answer = QUESTIONS[r]
                sft.append(_chat(rng.choice(qs).format(s=s), answer.format(s=s, o=o), "facts", rng))
    for k in rng.sample(train_numbers, min(len(train_numbers), n(sft_numerals))):
        c = to_chinese_numeral(k)
        if rng.random() < 0.6:
            sft.append(_chat(rng.choice(TO_CHINESE).format(d=k), c, "numerals", rng))
        else:
            sft.append(_chat(rng.choice(TO_ARABIC).format(c=c), str(k), "numerals", rng))
    for pair in train_pairs[-n(sft_arithmetic):]:
        q, r = arithmetic_question(*pair)
        sft.append(_chat(rng.choice(ARITH_QUESTIONS).format(q=q), r, "arithmetic", rng))
    for it in train_idioms[:n(sft_idioms)]:
        sft.append(_chat(rng.choice(IDIOM_QUESTIONS).format(w=it["word"]), it["explanation"], "idioms", rng))
    count = 0
    for p in poems:
        lines = poem_lines(p["text"])
        # consecutive clauses of plain hanzi only (Yuan qu carry stage directions such as （正旦唱）)
        starts = [i for i in range(len(lines) - 1) if _HANZI_LINE.fullmatch(lines[i] + lines[i + 1])]
        if p.get("script") == "traditional" or not starts or count >= n(sft_poems):
            continue
        i = rng.choice(starts)
        sft.append(_chat(f"“{lines[i]}”的下一句是什么？", lines[i + 1], "poetry", rng))
        count += 1
    for _ in range(n(sft_greeting_repeats)):
        for q, a in GREETINGS:
            sft.append(_chat(q, a, "greeting", rng))
    # held-out names and choice idioms may also hide inside real text: drop such records
    sft = [r for r in sft if not _mentions_any(r, held_names + choice_words)]
    singles = list(sft)
    for _ in range(n(sft_multi_turn)):
        picked = rng.sample(singles, rng.randint(2, 3))
        turns = [m for r in picked for m in r["messages"] if m["role"] != "system"]
        if rng.random() < 0.3:
            turns.insert(0, {"role": "system", "content": SYSTEM})
        sft.append({"messages": turns, "kind": "multi_turn"})
    rng.shuffle(sft)

    # ---- held-out evaluation
    qa = []
    facts_qa = [(s, r, o) for s, r, o in world.facts() if s in world.held_out]
    # facts chance = mean over the questions of 1 / (size of the relation's value set), a blind guess;
    # one value per kind because the report states one chance per kind
    facts_chance = sum(1 / len(world.value_set(r)) for _, r, _ in facts_qa) / max(1, len(facts_qa))
    for s, r, o in facts_qa:
        qs, answer = QUESTIONS[r]
        qa.append({"kind": "facts", "relation": r,
                   "messages": [{"role": "user", "content": qs[0].format(s=s)}],
                   "answer": answer.format(s=s, o=o), "chance": facts_chance})
    for k in sorted(held_number_set):
        c = to_chinese_numeral(k)
        question, answer = (TO_CHINESE[0].format(d=k), c) if k % 2 else (TO_ARABIC[0].format(c=c), str(k))
        qa.append({"kind": "numerals", "messages": [{"role": "user", "content": question}], "answer": answer,
                   "chance": NUMERAL_CHANCE})
    for pair in held_pair_list:
        q, r = arithmetic_question(*pair)
        qa.append({"kind": "arithmetic",
                   "messages": [{"role": "user", "content": ARITH_QUESTIONS[0].format(q=q)}],
                   "answer": r, "chance": ARITHMETIC_CHANCE})

    choice = []
    letters = "ABCD"
    for i, it in enumerate(choice_idioms):
        others = rng.sample([d for d in distractors if d != it["explanation"]], 3)
        options = [*others, it["explanation"]]
        rng.shuffle(options)
        choice.append({"id": f"choice-{i}", "question": f"“{it['word']}”是什么意思？",
                       **dict(zip(letters, options, strict=True)),
                       "answer": letters[options.index(it["explanation"])]})

    val_rng = random.Random(seed + 1)
    val_world = world_documents(world, val_rng, 4)[:n(n_val_world, 10)]
    val_text = [{"text": t, "source": "world"} for t in val_world]
    val_text += [{"text": poem_document(p), "source": p["source"]} for p in val_poems]
    val_text += [{"text": idiom_document(it), "source": "idioms"} for it in val_idioms]

    # ---- preference pairs and extraction records (for later stages), SFT entities only
    train_facts = [f for f in world.facts() if f[0] not in world.held_out]
    pref = []
    for i in range(n(n_preference, 10)):
        if i % 5 == 3:  # arithmetic: a near miss
            a, op, b = rng.choice(train_pairs)
            q, r = arithmetic_question(a, op, b)
            result = a + b if op == "+" else a - b
            wrong = to_chinese_numeral(result + rng.choice([-10, -1, 1, 10]) if result >= 10 else result + 1)
            pref.append({"prompt": ARITH_QUESTIONS[0].format(q=q), "chosen": r, "rejected": wrong})
            continue
        s, r, o = train_facts[i % len(train_facts)]
        qs, answer = QUESTIONS[r]
        wrong = rng.choice([x for x in world.value_set(r) if x != o and x not in world.held_out])
        pref.append({"prompt": rng.choice(qs).format(s=s), "chosen": answer.format(s=s, o=o),
                     "rejected": answer.format(s=s, o=wrong)})
    by_subject = _facts_by_subject(world)
    train_subjects = [s for s in by_subject if s not in world.held_out]
    extraction = []
    for i in range(n(n_extraction, 10)):
        facts = by_subject[train_subjects[i % len(train_subjects)]]
        picked = rng.sample(facts, rng.randint(1, len(facts)))
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
    (out / "world.json").write_text(json.dumps(world.size_summary(), ensure_ascii=False, indent=2) + "\n",
                                    encoding="utf-8")
    paths["world_summary"] = out / "world.json"
    return paths
