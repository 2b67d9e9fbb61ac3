"""Chunking rules of the bpe backend and `tokenizer stats` per source against a plain byte-level BPE."""

import json
import random
import shutil
from pathlib import Path

import pytest
import regex
import yaml

from tests.test_tokenizer_train import MIXED_SCRIPT
from xiaolm.cli import main
from xiaolm.errors import XiaolmError
from xiaolm.tokenizer import tokenizer_stats, train_tokenizer
from xiaolm.tokenizer.pretokenize import ChunkRules, ChunkSplitter, build_pre_tokenizer
from xiaolm.tokenizer.stats import load_tokenizer_json, train_bytelevel_baseline

FIXTURES = Path(__file__).parent / "fixtures"
POEMS = FIXTURES / "corpus_zh.jsonl"  # 300 Song ci, source "songci", and one record without a source
MAN_PAGE = "描述\n       列出指定“文件”的信息。\n\n       -a, --all\n              不要忽略以点号起始的条目 12345\n"
OPTIONS = ["与 -{o} 同时使用时，列出每个文件的作者", "按照 --{w} 排序，最新的最前，默认块大小为 {n} 字节",
           "使用 -{o} 选项 时 不要 列出 以 {n} 结尾 的 项目", "如果 没有 指定 --{w}，则 按 字母 排序"]
NUMBERS = [512, 1024, 4096, 2026]
VOCAB = 800


def man_like(n: int, seed: int) -> list[str]:
    """Option lists laid out like rendered man pages: indentation, options, numbers, Chinese between spaces."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        items = [f"       -{o}, --{w}\n              " + rng.choice(OPTIONS).format(o=o, w=w, n=rng.choice(NUMBERS))
                 for o, w in ((rng.choice("abcdlstx"), rng.choice(["all", "sort", "size", "time"])) for _ in range(6))]
        docs.append("选项\n" + "\n\n".join(items) + "\n")
    return docs


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """train.jsonl (the poems and man-like text, sources songci, man and none) and heldout.jsonl; ours trained."""
    tmp = tmp_path_factory.mktemp("compression")
    train = write(tmp / "train.jsonl", [json.loads(line) for line in POEMS.read_text(encoding="utf-8").splitlines()]
                  + [{"text": t, "source": "man"} for t in man_like(60, 0)])
    held = write(tmp / "heldout.jsonl", [{"text": t, "source": "man"} for t in man_like(5, 1)]
                 + [{"text": "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。", "source": "poems"}])
    return {"train": train, "held": held, "ours": train_tokenizer([train], tmp / "tok", vocab_size=VOCAB, workers=1)}


def texts_of(path: Path, source: str | None = None) -> list[str]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r["text"] for r in records if source is None or r.get("source", "-") == source]


RULES = [ChunkRules(), ChunkRules(cjk_chars=True), ChunkRules(max_cjk_run=8),
         ChunkRules(max_cjk_run=0, cjk_space=True, digits=3, newline_indent=True),
         ChunkRules(digits=0, cjk_chars=True, newline_indent=True)]


@pytest.mark.parametrize("rules", RULES, ids=repr)
def test_python_chunks_match_the_saved_pre_tokenizer(rules):
    from tokenizers import decoders

    splitter, hf = ChunkSplitter(rules), build_pre_tokenizer(rules)
    for text in MIXED_SCRIPT + [MAN_PAGE, " 中文 \n\n  中文\n \n\t中文  "] + texts_of(POEMS)[:50] + man_like(3, 2):
        chunks = list(splitter.chunks(text))
        assert "".join(chunks) == text
        assert chunks == [decoders.ByteLevel().decode([p]) for p, _ in hf.pre_tokenize_str(text)]


def test_chunk_rules_cut_cjk_runs_digits_spaces_and_indentation_as_set():
    def chunks(text: str, **rules) -> list[str]:
        return list(ChunkSplitter(ChunkRules(**rules)).chunks(text))

    def longest(text: str, **rules) -> int:
        return max(map(len, chunks(text, **rules)))

    assert [longest("中" * 50, **r) for r in ({}, {"max_cjk_run": 8}, {"max_cjk_run": 0}, {"cjk_chars": True})] == [
        16, 8, 50, 1]
    assert chunks("2024年") == ["2", "0", "2", "4", "年"] == chunks("2024年", cjk_chars=True)
    assert chunks("12345年", digits=3) == ["123", "45", "年"] and chunks("12345年", digits=0) == ["12345", "年"]
    assert chunks("使用 -l 选项") == ["使用", " -", "l", " ", "选项"]
    assert chunks("使用 -l 选项", cjk_space=True) == ["使用", " -", "l", " 选项"]
    assert chunks("条目\n\n       -a") == ["条目", "\n\n", "      ", " -", "a"]
    assert chunks("条目\n\n       -a", newline_indent=True) == ["条目", "\n\n      ", " -", "a"]
    assert chunks("条目\n\n       选项", newline_indent=True, cjk_space=True) == ["条目", "\n\n      ", " 选项"]


def test_character_level_chunking_keeps_the_pattern_tokenizers_were_trained_with():
    # with cjk_chars no CJK run reaches the split, so the run settings must not change the saved pattern:
    # tokenizers trained before they existed (the demo's) stay byte-identical
    old = (r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\p{Bopomofo}]{1,8}| ?[^\s\p{Han}\p{Hiragana}\p{Katakana}"
           r"\p{Hangul}\p{Bopomofo}\p{P}\p{S}\p{N}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    for run, space in ((16, True), (8, False), (0, True)):
        assert ChunkRules(cjk_chars=True, max_cjk_run=run, cjk_space=space).split_pattern() == old
    assert ChunkRules(max_cjk_run=8).split_pattern() == old


def test_chunk_settings_are_saved_and_shape_the_vocabulary(tmp_path, corpus):
    def vocabulary(out: Path) -> list[str]:
        tok = load_tokenizer_json(out)
        return [tok.decode([i]) for i in range(tok.get_vocab_size())]

    default = vocabulary(corpus["ours"])
    assert not any(regex.search(r"\d\d", t) or regex.match(r"\s+\p{Han}", t) for t in default)
    out = tmp_path / "tok"
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", str(corpus["train"]), "--out", str(out), f"vocab_size={VOCAB}", "--workers", "1",
              "max_cjk_run=2", "cjk_space=true", "digits=0", "newline_indent=true"])
    assert e.value.code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert {k: saved[k] for k in ("max_cjk_run", "cjk_space", "digits", "newline_indent")} == {
        "max_cjk_run": 2, "cjk_space": True, "digits": 0, "newline_indent": True}
    vocab = vocabulary(out)
    assert max(len(regex.findall(r"\p{Han}", t)) for t in vocab) == 2
    assert any(regex.fullmatch(r"\d{2,}", t) for t in vocab)
    assert any(regex.fullmatch(r" \p{Han}+", t) for t in vocab)  # " 同时" from "与 -l 同时使用时"
    assert any(regex.fullmatch(r"\n+ {6}", t) for t in vocab)  # newlines with the indentation of the next line
    tok = load_tokenizer_json(out)
    for text in MIXED_SCRIPT:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_chunk_settings_that_cannot_apply_are_refused_before_training(tmp_path):
    with pytest.raises(XiaolmError, match="max_cjk_run=-1 must be 0 .no limit. or more"):
        train_tokenizer([POEMS], tmp_path / "a", vocab_size=400, max_cjk_run=-1, workers=1)
    with pytest.raises(XiaolmError, match="work only with the bpe backend"):
        train_tokenizer([POEMS], tmp_path / "b", vocab_size=400, backend="sentencepiece", digits=3, workers=1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_stats_count_every_source_and_add_up_to_the_whole(corpus):
    stats = tokenizer_stats(corpus["ours"], [corpus["train"]])
    rows = stats["by_source"]
    assert list(rows) == ["-", "man", "songci"] and "baseline" not in stats
    for key in ("texts", "chars", "tokens"):
        assert sum(r[key] for r in rows.values()) == stats[key]
    tok = load_tokenizer_json(corpus["ours"])
    for source, row in rows.items():
        assert row["tokens"] == sum(len(tok.encode(t).ids) for t in texts_of(corpus["train"], source))
        assert row["chars_per_token"] == round(row["chars"] / row["tokens"], 4)


def test_baseline_is_a_plain_bytelevel_bpe_of_the_same_vocabulary_trained_on_the_tokenizers_inputs(corpus):
    stats = tokenizer_stats(corpus["ours"], [corpus["held"]], baseline="bytelevel")
    base = stats["baseline"]
    assert base["trained_on"] == [str(corpus["train"])] and base["vocab_size"] == VOCAB
    reference = train_bytelevel_baseline(texts_of(corpus["train"]), VOCAB)
    for source, row in stats["by_source"].items():
        assert row["baseline_tokens"] == sum(len(reference.encode(t).ids) for t in texts_of(corpus["held"], source))
        assert row["ratio"] == round(row["baseline_tokens"] / row["tokens"], 4)
    assert base["ratio"] == round(base["baseline_tokens"] / stats["tokens"], 4)
    on_held = tokenizer_stats(corpus["ours"], [corpus["held"]], baseline="bytelevel", baseline_train=[corpus["held"]])
    reference = train_bytelevel_baseline(texts_of(corpus["held"]), VOCAB)
    assert on_held["baseline"]["trained_on"] == [str(corpus["held"])]
    assert on_held["baseline"]["baseline_tokens"] == sum(len(reference.encode(t).ids) for t in texts_of(corpus["held"]))


def test_baseline_needs_the_training_inputs(tmp_path, corpus):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(corpus["ours"] / "tokenizer.json", bare)
    with pytest.raises(XiaolmError, match="trained on are unknown") as e:
        tokenizer_stats(bare, [corpus["held"]], baseline="bytelevel")
    assert "--baseline-train" in e.value.format()


def test_cli_stats_print_each_source_against_the_baseline(corpus, capsys):
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "stats", str(corpus["ours"]), str(corpus["held"]), "--baseline", "bytelevel"])
    printed = capsys.readouterr().out
    assert e.value.code == 0 and "ours/baseline" in printed
    assert {line.split()[0] for line in printed.splitlines() if line.startswith("  ")} >= {"man", "poems", "(all)"}
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "stats", str(corpus["ours"]), str(corpus["held"]), "--json"])
    assert e.value.code == 0 and set(json.loads(capsys.readouterr().out)["by_source"]) == {"man", "poems"}
