"""Held-out evaluation of the demo: what training never shows (numbers, arithmetic pairs) and the eval sets."""

from __future__ import annotations

import random

from xiaolm.data.demo.documents import idiom_document, poem_document, world_documents
from xiaolm.data.demo.templates import (
    ARITH_QUESTIONS,
    QUESTIONS,
    TO_ARABIC,
    TO_CHINESE,
    VALIDATION_STATEMENTS,
    arithmetic_question,
)
from xiaolm.data.demo.world import World, to_chinese_numeral

# chance of a blind guess: numerals answer with one of the 10,000 numbers 0..9999; every sum or difference of
# two two-digit numbers lies in 0..198, i.e. one of 199 values
NUMERAL_CHANCE = 1 / 10000
ARITHMETIC_CHANCE = 1 / 199
Pair = tuple[int, str, int]


def _inside_other_numbers() -> set[str]:
    """Every string that is a proper substring of some number 0..9999, in digits or in Chinese numerals."""
    inside = set()
    for k in range(10000):
        for text in (str(k), to_chinese_numeral(k)):
            inside.update(text[i:j] for i in range(len(text)) for j in range(i + 1, len(text) + 1)
                          if (i, j) != (0, len(text)))
    return inside


def held_out_numbers(rng: random.Random, n: int, real_text: str) -> set[int]:
    """Four-digit numbers whose digits and numeral occur in no other number and in no real text.

    The rule that keeps them out of every training text: neither str(k) nor to_chinese_numeral(k) is a substring
    of another number 0..9999 (so 3007, 三千零七 inside 三千零七十二, is never held out; nor is anything ending in 0),
    and neither occurs in the real text; training then uses only the other numbers.
    """
    inside = _inside_other_numbers()
    candidates = [k for k in range(1000, 10000) if str(k) not in inside and to_chinese_numeral(k) not in inside]
    rng.shuffle(candidates)
    held: list[int] = []
    for k in candidates:
        if len(held) == n:
            break
        if str(k) not in real_text and to_chinese_numeral(k) not in real_text:
            held.append(k)
    return set(held)


def arithmetic_pairs(rng: random.Random, n: int) -> tuple[list[Pair], list[Pair]]:
    """(held out, training) pairs of two-digit numbers; differences are never negative.

    A held-out sum holds out the unordered pair: b+a, which states the same answer, is not trained either.
    """
    pairs = [(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in "+-" if op == "+" or a >= b]
    rng.shuffle(pairs)
    held: list[Pair] = []
    hidden: set[Pair] = set()
    for pair in pairs:
        if len(held) == n:
            break
        q, r = arithmetic_question(*pair)
        # the answer must not be readable from the question (20-10: 十 inside 二十减十)
        if r not in q and pair not in hidden:
            held.append(pair)
            a, op, b = pair
            hidden |= {pair, (b, op, a)} if op == "+" else {pair}
    return held, [p for p in pairs if p not in hidden]


def heldout_questions(world: World, numbers: set[int], pairs: list[Pair]) -> list[dict]:
    """Exact-match questions, with chances: held-out entities' facts (every phrasing), numerals, arithmetic pairs."""
    qa = []
    facts_qa = [(s, r, o) for s, r, o in world.facts() if s in world.held_out]
    # facts chance = mean over the questions of 1 / (size of the relation's value set), a blind guess;
    # one value per kind because the report states one chance per kind
    asked = [r for _, r, _ in facts_qa for _ in QUESTIONS[r][0]]
    facts_chance = sum(1 / len(world.value_set(r)) for r in asked) / max(1, len(asked))
    for s, r, o in facts_qa:
        qs, answer = QUESTIONS[r]
        qa += [{"kind": "facts", "relation": r, "messages": [{"role": "user", "content": question.format(s=s)}],
                "answer": answer.format(s=s, o=o), "chance": facts_chance} for question in qs]
    for k in sorted(numbers):
        c = to_chinese_numeral(k)
        question, answer = (TO_CHINESE[0].format(d=k), c) if k % 2 else (TO_ARABIC[0].format(c=c), str(k))
        qa.append({"kind": "numerals", "messages": [{"role": "user", "content": question}], "answer": answer,
                   "chance": NUMERAL_CHANCE})
    for pair in pairs:
        q, r = arithmetic_question(*pair)
        qa.append({"kind": "arithmetic",
                   "messages": [{"role": "user", "content": ARITH_QUESTIONS[0].format(q=q)}],
                   "answer": r, "chance": ARITHMETIC_CHANCE})
    return qa


def choice_questions(rng: random.Random, idioms: list[dict]) -> list[dict]:
    """4-way multiple choice on idiom meanings; the wrong options are the other idioms' explanations."""
    # like the right one, each wrong option appears in pretraining text only, so picking it needs the
    # idiom-explanation association, not familiarity from SFT
    distractors = sorted({it["explanation"] for it in idioms})
    choice = []
    letters = "ABCD"
    for i, it in enumerate(idioms):
        others = rng.sample([d for d in distractors if d != it["explanation"]], 3)
        options = [*others, it["explanation"]]
        rng.shuffle(options)
        choice.append({"id": f"choice-{i}", "question": f"“{it['word']}”是什么意思？",
                       **dict(zip(letters, options, strict=True)),
                       "answer": letters[options.index(it["explanation"])]})
    return choice


def validation_texts(world: World, seed: int, n_world: int, poems: list[dict], idioms: list[dict]) -> list[dict]:
    """Validation documents for perplexity, by `source`: world paragraphs in phrasings training never uses (own
    RNG, no filler sentences, which training does use), held-out poems and idioms."""
    val_rng = random.Random(seed + 1)
    val_world = world_documents(world, val_rng, 4, VALIDATION_STATEMENTS, fillers=False)[:n_world]
    val_text = [{"text": t, "source": "world"} for t in val_world]
    val_text += [{"text": poem_document(p), "source": "poetry", "collection": p["source"]} for p in poems]
    val_text += [{"text": idiom_document(it), "source": "idioms"} for it in idioms]
    return val_text
