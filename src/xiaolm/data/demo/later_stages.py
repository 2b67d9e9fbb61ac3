"""Records of the demo for the later training stages: preference pairs and extraction records, SFT entities only."""

from __future__ import annotations

import random
import re

from xiaolm.data.demo.documents import facts_by_subject
from xiaolm.data.demo.templates import (
    ARITH_QUESTIONS,
    QUESTIONS,
    TO_ARABIC,
    TO_CHINESE,
    TRAIN_STATEMENTS,
    arithmetic_question,
)
from xiaolm.data.demo.world import World, to_chinese_numeral


def preference_pairs(world: World, rng: random.Random, train_pairs: list[tuple[int, str, int]], n: int,
                     n_val: int = 0) -> tuple[list[dict], list[dict]]:
    """(training, held-out) pairs: chosen = the reference answer, rejected = a plausible wrong one.

    Facts: the rejected answer names another value the relation takes (a wrong city, river, trade …). Every fifth
    pair is arithmetic: a near miss (±1 or ±10). Held-out pairs ask about entities, and sums of operand pairs, that
    no training pair mentions (a sum's pair unordered); all are SFT entities, never `World.held_out` ones.
    """
    facts = [f for f in world.facts() if f[0] not in world.held_out]
    subjects = sorted({s for s, _, _ in facts})
    rng.shuffle(subjects)
    val_subjects = set(subjects[:len(subjects) // 5]) if n_val else set()
    sums = list(train_pairs)
    rng.shuffle(sums)
    val_sums = sums[:max(1, n_val // 5)] if n_val else []
    hidden = {(b, op, a) for a, op, b in val_sums if op == "+"} | set(val_sums)

    def pairs(count: int, facts_of: list, arithmetic: list) -> list[dict]:
        out = []
        for i in range(count):
            if i % 5 == 3:  # arithmetic: a near miss
                a, op, b = arithmetic[(i // 5) % len(arithmetic)]
                q, r = arithmetic_question(a, op, b)
                result = a + b if op == "+" else a - b
                wrong = to_chinese_numeral(result + rng.choice([-10, -1, 1, 10]) if result >= 10 else result + 1)
                out.append({"prompt": ARITH_QUESTIONS[0].format(q=q), "chosen": r, "rejected": wrong,
                            "kind": "arithmetic"})
                continue
            s, r, o = facts_of[i % len(facts_of)]
            qs, answer = QUESTIONS[r]
            wrong = rng.choice([x for x in world.value_set(r) if x != o and x not in world.held_out])
            out.append({"prompt": rng.choice(qs).format(s=s), "chosen": answer.format(s=s, o=o),
                        "rejected": answer.format(s=s, o=wrong), "kind": "facts"})
        return out

    train = pairs(n, [f for f in facts if f[0] not in val_subjects], [p for p in sums if p not in hidden])
    val = pairs(n_val, [f for f in facts if f[0] in val_subjects], val_sums) if n_val else []
    return train, val


def extraction_records(world: World, rng: random.Random, n: int) -> list[dict]:
    """Sentences stating some facts of one SFT entity, with those facts as triplets."""
    by_subject = facts_by_subject(world)
    train_subjects = [s for s in by_subject if s not in world.held_out]
    extraction = []
    for i in range(n):
        facts = by_subject[train_subjects[i % len(train_subjects)]]
        picked = rng.sample(facts, rng.randint(1, len(facts)))
        text = "".join(rng.choice(TRAIN_STATEMENTS[r]).format(s=s, o=o) for s, r, o in picked)
        extraction.append({"text": text, "triplets": [list(f) for f in picked]})
    return extraction


def rl_prompts(rng: random.Random, sft: list[dict], train_numbers: list[int],
               unused_pairs: list[tuple[int, str, int]], n: int) -> list[dict]:
    """Prompts with verifiable answers for RL (GRPO), {"messages": [user], "answer", "kind"}: n/2 numeral
    conversions of training numbers that no SFT chat converts, n/2 sums or differences of operand pairs that no SFT
    chat asks (`unused_pairs`). Never held-out ones, and not memorized answers either: a model that has learned
    the skill answers them, one that has memorized SFT does not, which is what gives a group of samples a signal."""
    in_sft = {int(d) for c in sft if c.get("kind") == "numerals"
              for d in re.findall(r"\d+", " ".join(m["content"] for m in c["messages"]))}
    numbers = [k for k in train_numbers if k >= 10 and k not in in_sft]
    out = []
    for k in rng.sample(numbers, min(len(numbers), n // 2)):
        c = to_chinese_numeral(k)
        if rng.random() < 0.5:
            out.append({"messages": [{"role": "user", "content": rng.choice(TO_CHINESE).format(d=k)}], "answer": c,
                        "kind": "numerals"})
        else:
            out.append({"messages": [{"role": "user", "content": rng.choice(TO_ARABIC).format(c=c)}],
                        "answer": str(k), "kind": "numerals"})
    for pair in rng.sample(unused_pairs, min(len(unused_pairs), n - len(out))):
        q, r = arithmetic_question(*pair)
        out.append({"messages": [{"role": "user", "content": rng.choice(ARITH_QUESTIONS).format(q=q)}], "answer": r,
                    "kind": "arithmetic"})
    rng.shuffle(out)
    return out
