"""Build the demo corpus: pretraining text, SFT chats, preference and extraction records, held-out eval sets.

Held-out design: the facts of `World.held_out` entities appear only in declarative pretraining documents,
never as a question or in any SFT, preference or extraction record, so the facts score measures whether
pretraining knowledge reaches the chat model. Held-out numbers (their digits and their Chinese numeral) occur
nowhere in training data, not even inside another number; a held-out sum holds out both orders of its operands.
Held-out idioms (multiple choice) appear in pretraining text but in no SFT record. The world's validation
documents use phrasings that no training file uses, so none of their sentences is trained verbatim.

One module per kind of record (documents, chats, heldout, later_stages); this one splits the real data and
composes them. Each part draws from its own random generator, seeded by the seed and the part's name, so a seed
and scale give the same files, and changing one part leaves the others' files as they were.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from xiaolm.data.demo.chats import sft_chats
from xiaolm.data.demo.documents import idiom_document, poem_document, write_pretraining_text
from xiaolm.data.demo.heldout import (
    arithmetic_pairs,
    choice_questions,
    held_out_numbers,
    heldout_questions,
    validation_texts,
)
from xiaolm.data.demo.later_stages import extraction_records, preference_pairs, rl_prompts
from xiaolm.data.demo.world import generate_world
from xiaolm.data.demo.writing import load_vendored, write_jsonl


@dataclass
class RealSplit:
    """The vendored poems and idioms, split between training, validation and multiple choice."""

    poems: list[dict]  # pretraining, and SFT's next-line chats
    val_poems: list[dict]
    train_idioms: list[dict]  # pretraining and SFT
    choice_idioms: list[dict]  # pretraining only: the multiple-choice questions ask for them
    pretrain_idioms: list[dict]
    val_idioms: list[dict]


def split_real_data(rng: random.Random, n_val: int, n_poems: int, n_choice: int, n_idioms: int) -> RealSplit:
    """Shuffle the vendored poems and idioms and deal them out (see RealSplit)."""
    poems = load_vendored("poetry.jsonl.gz")
    idioms = load_vendored("idioms.jsonl.gz")
    rng.shuffle(poems)
    rng.shuffle(idioms)
    val_poems = [p for p in poems[:n_val] if p.get("script") != "traditional"]
    poems = poems[n_val:n_val + n_poems]
    val_idioms, idioms = idioms[:n_val], idioms[n_val:]
    short = [it for it in idioms if 6 <= len(it["explanation"]) <= 60]
    choice_idioms = short[:n_choice]
    choice_words = {it["word"] for it in choice_idioms}
    train_idioms = [it for it in idioms if it["word"] not in choice_words][:n_idioms]
    pretrain_idioms = train_idioms + choice_idioms
    rng.shuffle(pretrain_idioms)
    return RealSplit(poems, val_poems, train_idioms, choice_idioms, pretrain_idioms, val_idioms)


def build_demo_corpus(out_dir: str | Path, seed: int = 0, scale: float = 1.0, *, mentions: int = 40,
                      qa_repeats: int = 3, n_poems: int = 1500, n_idioms: int = 1500, n_numbers: int = 3000,
                      n_arithmetic: int = 6000, sft_fact_repeats: int = 6, sft_idioms: int = 600,
                      sft_poems: int = 400, sft_numerals: int = 2500, sft_arithmetic: int = 3500,
                      sft_greeting_repeats: int = 20, sft_multi_turn: int = 300, held_numbers: int = 300,
                      held_pairs: int = 300, n_choice: int = 300, n_val_world: int = 100,
                      n_val_real: int = 150, n_preference: int = 200, n_preference_val: int = 100,
                      n_extraction: int = 400, n_rl: int = 600) -> dict[str, Path]:
    """Write every demo data file under out_dir and return their paths by key (see module docstring)."""
    out = Path(out_dir)
    world = generate_world(seed)

    def rng(part: str) -> random.Random:  # the split keeps the plain seed it always had: same poems, same val
        return random.Random(seed if part == "split" else f"{seed}/{part}")

    def n(x: int, floor: int = 1) -> int:
        return max(floor, round(x * scale))

    real = split_real_data(rng("split"), n(n_val_real, 10), n(n_poems, 20), n(n_choice, 10), n(n_idioms, 40))
    real_text = "\n".join([poem_document(p) for p in real.poems] +
                          [idiom_document(it) for it in real.pretrain_idioms])
    held_number_set = held_out_numbers(rng("held numbers"), n(held_numbers, 10), real_text)
    train_numbers = [k for k in range(10000) if k not in held_number_set]
    held_pair_list, train_pairs = arithmetic_pairs(rng("held pairs"), n(held_pairs, 10))

    raw = out / "raw"
    write_pretraining_text(raw, world, rng("pretraining"), real.poems, real.pretrain_idioms, train_numbers,
                           train_pairs, mentions=n(mentions, 6), qa_repeats=n(qa_repeats, 1), n_numbers=n(n_numbers),
                           n_arithmetic=n(n_arithmetic))
    hidden = sorted(world.held_out) + [it["word"] for it in real.choice_idioms]
    sft = sft_chats(world, rng("sft"), real.poems, real.train_idioms, train_numbers, train_pairs, hidden,
                    fact_repeats=n(sft_fact_repeats), numerals=n(sft_numerals), arithmetic=n(sft_arithmetic),
                    n_idioms=n(sft_idioms), n_poems=n(sft_poems), greeting_repeats=n(sft_greeting_repeats),
                    multi_turn=n(sft_multi_turn))
    qa = heldout_questions(world, held_number_set, held_pair_list)
    choice = choice_questions(rng("choice"), real.choice_idioms)
    val_text = validation_texts(world, seed, n(n_val_world, 10), real.val_poems, real.val_idioms)
    pref, pref_val = preference_pairs(world, rng("preference"), train_pairs, n(n_preference, 10),
                                      n(n_preference_val, 10))
    extraction = extraction_records(world, rng("extraction"), n(n_extraction, 10))
    # sft_chats asks the last n(sft_arithmetic) training pairs; the RL prompts take from the others
    rl = rl_prompts(rng("rl"), sft, train_numbers, train_pairs[:-n(sft_arithmetic)], n(n_rl, 16))

    ev = out / "eval"
    paths = {
        "raw_text": raw,
        "sft": write_jsonl(out / "sft.jsonl", sft),
        "eval_qa": write_jsonl(ev / "heldout_qa.jsonl", qa),
        "eval_choice": write_jsonl(ev / "choice.jsonl", choice),
        "val_text": write_jsonl(ev / "val_text.jsonl", val_text),
        "preference": write_jsonl(out / "preference.jsonl", pref),
        "preference_val": write_jsonl(ev / "preference.jsonl", pref_val),
        "extraction": write_jsonl(out / "extraction.jsonl", extraction),
        "rl_prompts": write_jsonl(out / "rl_prompts.jsonl", rl),
    }
    (out / "world.json").write_text(json.dumps(world.size_summary(), ensure_ascii=False, indent=2) + "\n",
                                    encoding="utf-8")
    paths["world_summary"] = out / "world.json"
    return paths
