"""Records of the demo for the later training stages: preference pairs and extraction records, SFT entities only."""

from __future__ import annotations

import random

from xiaolm.data.demo.documents import facts_by_subject
from xiaolm.data.demo.templates import ARITH_QUESTIONS, QUESTIONS, TRAIN_STATEMENTS, arithmetic_question
from xiaolm.data.demo.world import World, to_chinese_numeral


def preference_pairs(world: World, rng: random.Random, train_pairs: list[tuple[int, str, int]], n: int
                     ) -> list[dict]:
    """Chosen = the reference answer, rejected = a wrong value (facts) or a near miss (every fifth: arithmetic)."""
    train_facts = [f for f in world.facts() if f[0] not in world.held_out]
    pref = []
    for i in range(n):
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
    return pref


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
