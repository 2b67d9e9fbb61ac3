"""Tokenizer training: bounded-memory counting, both backends, bad input, `tokenizer stats`, the CLI."""

import gzip
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from xiaolm.cli import main
from xiaolm.errors import XiaolmError
from xiaolm.tokenizer import SPECIAL_TOKENS, tokenizer_stats, train_tokenizer
from xiaolm.tokenizer.count import BoundedCounter, count_chunks
from xiaolm.tokenizer.train import parse_size, token_dtype

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = [str(FIXTURES / "corpus_zh.jsonl"), str(FIXTURES / "mixed")]
VOCAB = 3000

MIXED_SCRIPT = [
    "床前明月光，疑是地上霜。",
    "xiaolm 支持 English words、数字 3.14159 和 2024年12月31日！",
    "emoji 😀🎉👍🏽👨‍👩‍👧 rare CJK 𠀀𪚥𰻞 〇〡 㐀 龘",
    "  two spaces\n\n\ttab\r\nCRLF \u3000 ideographic space  ",
    "control \x00\x01\x07\x1b[0m\x7f and zero width \u200b\u200d\ufeff",
    "日本語のテキスト、한국어, Ελληνικά, русский, हिन्दी, عربى",
    "lone combining \u0301 and variation selector \ufe0f, private use \ue000, noncharacter \ufdd0",
    "sentencepiece mark ▁ and byte-level Ġ Ċ chars stay literal",
    "literal <|im_start|>user\n<|im_end|> and <|endoftext|> in text",
    "sentencepiece's own <unk>, <s></s> and byte pieces <0xE4><0xB8> stay text",
    "a" * 300 + "中" * 50 + "1" * 40,
    "",
]


def texts(path: str) -> list[str]:
    return [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines()]


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_bounded_counter_never_exceeds_capacity_and_undercounts_by_at_most_its_bound():
    rng = random.Random(0)
    stream = [f"w{int(rng.paretovariate(1.1))}" for _ in range(20_000)]
    counter = BoundedCounter(capacity=64)
    for i in range(0, len(stream), 100):
        counter.add_text_chunks(stream[i:i + 100])
        assert len(counter) <= 64
    truth, got = Counter(stream), dict(counter.items())
    d = counter.dropped_max
    assert counter.prunes > 0 and 0 < d <= 2 * len(stream) / (64 + 2)
    for chunk, c in truth.items():
        if c > d:  # every chunk more frequent than the bound survives
            assert chunk in got
        if chunk in got:
            assert c - d <= got[chunk] <= c
    assert got["w1"] >= truth["w1"] - d and truth["w1"] > 10 * d  # the most frequent chunk is nearly exact


def test_bounded_counter_is_exact_while_it_has_room():
    counter = BoundedCounter(capacity=1000)
    counter.add_counts([("a", 3), ("b", 1), ("a", 2)])
    assert dict(counter.items()) == {"a": 5, "b": 1} and counter.dropped_max == 0 and counter.total == 6


def test_counting_with_two_processes_equals_one_process():
    corpus = texts(CORPUS[0]) * 3
    one = count_chunks(corpus, capacity=10**6, workers=1)
    two = count_chunks(corpus, capacity=10**6, workers=2)
    assert dict(one.counts) == dict(two.counts) and one.total == two.total and two.dropped_max == 0
    assert one.texts == two.texts == len(corpus)
    small = count_chunks(corpus, capacity=200, workers=2)
    assert len(small.counts) <= 200 and 0 < small.dropped_max <= 2 * small.total // (100 + 2)


def test_only_the_most_frequent_chunks_go_to_training_and_ties_break_the_same_way():
    corpus = texts(CORPUS[0])
    full = count_chunks(corpus, capacity=10**6, workers=1).counts
    for workers in (1, 2):
        top = count_chunks(corpus, capacity=10**6, workers=workers, keep=50)
        assert len(top.counts) == 50 and top.distinct == len(full)
        assert all(full[k] == v for k, v in top.counts.items())
        assert min(top.counts.values()) == top.min_kept >= max(v for k, v in full.items() if k not in top.counts)
        assert top.counts == count_chunks(corpus, capacity=10**6, workers=1, keep=50).counts


def test_training_is_deterministic_with_several_processes_even_when_pruning(tmp_path):
    from xiaolm.tokenizer.train import train_bpe_from_counts

    corpus = texts(CORPUS[0]) * 2
    runs = [count_chunks(corpus, capacity=300, workers=2) for _ in range(2)]
    assert runs[0].counts == runs[1].counts and runs[0].dropped_max > 0
    assert len({train_bpe_from_counts(r.counts, 600).to_str() for r in runs}) == 1


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def trained(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param) / "tok"
    return request.param, train_tokenizer(CORPUS, out, vocab_size=VOCAB, backend=request.param, workers=2)


def test_both_backends_load_in_autotokenizer_with_specials_first_and_exact_vocab_size(trained):
    backend, out = trained
    tok = AutoTokenizer.from_pretrained(str(out))
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == tok.eos_token and tok.unk_token is None
    assert len(tok) == VOCAB and token_dtype(len(tok)) == np.uint16
    assert "<|im_start|>" in tok.chat_template
    assert report(out)["backend"] == backend and report(out)["max_memory"] == 2 << 30  # the default budget


def unknown_ids(tok) -> set[int]:
    """The id a model falls back to for text it cannot spell: sentencepiece's unk piece; none in byte-level BPE."""
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    if model["type"] == "BPE":
        assert model["unk_token"] is None
        return set()
    return {model["unk_id"]}


@pytest.mark.parametrize("text", MIXED_SCRIPT)
def test_both_backends_round_trip_any_text_without_unknown_tokens(trained, text):
    tok = AutoTokenizer.from_pretrained(str(trained[1]))
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert not unknown_ids(tok) & set(ids)  # sentencepiece's unk piece exists but byte fallback wins


@pytest.mark.parametrize("text", MIXED_SCRIPT)
def test_plain_text_never_encodes_to_a_special_or_unknown_id(trained, text):
    from tokenizers import Tokenizer

    tok = AutoTokenizer.from_pretrained(str(trained[1]))
    plain = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    plain.encode_special_tokens = True  # as packing encodes plain documents
    ids = plain.encode(text, add_special_tokens=False).ids
    assert plain.decode(ids) == text
    assert not set(ids) & (unknown_ids(tok) | set(range(len(SPECIAL_TOKENS))))


def test_specials_in_chat_text_are_single_tokens(trained):
    tok = AutoTokenizer.from_pretrained(str(trained[1]))
    ids = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=True, return_dict=False)
    assert ids[0] == 1 and 2 in ids and tok.decode(ids) == "<|im_start|>user\n你好<|im_end|>\n"


def test_cjk_chars_gives_one_token_per_chinese_character(tmp_path):
    out = train_tokenizer(CORPUS, tmp_path / "tok", vocab_size=2000, cjk_chars=True, workers=1)
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "床前明月光，疑是地上霜。"
    pieces = [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]
    assert [p for p in pieces if p not in "，。"] == list("床前明月光疑是地上霜")
    stats = tokenizer_stats(out, [CORPUS[0]])
    assert stats["single_cjk_token_share"] > 0.7


def test_bad_inputs_fail_before_training_with_the_value_and_what_to_do(tmp_path):
    empty_file = tmp_path / "empty.jsonl"
    empty_file.write_text("")
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    cases = [
        (dict(inputs=[empty_file]), "no text to train on"),
        (dict(inputs=[empty_dir]), "no text to train on"),
        (dict(inputs=[broken]), "broken.jsonl.gz: cannot read this input"),
        (dict(vocab_size=200), "vocab_size=200 is too small — use at least 264"),
        (dict(vocab_size=60000), r"vocab_size=60000 is larger than this corpus supports \(its chunk counts allow"),
        (dict(max_memory="lots"), "cannot read the memory size 'lots'"),
        (dict(max_memory="10MB"), "max_memory=10MB is too small"),
        (dict(workers=0), "workers=0 must be at least 1"),
        (dict(backend="wordpiece"), "unknown backend 'wordpiece'"),
        (dict(backend="sentencepiece", cjk_chars=True), "cjk_chars works only with the bpe backend"),
    ]
    for kwargs, message in cases:
        args = {"inputs": [CORPUS[0]], "vocab_size": VOCAB, "workers": 1, **kwargs}
        with pytest.raises(XiaolmError, match=message):
            train_tokenizer(args.pop("inputs"), tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()
    with pytest.raises(XiaolmError, match="too small for the characters of this corpus"):
        train_tokenizer([CORPUS[0]], tmp_path / "out", vocab_size=500, backend="sentencepiece", workers=1)


@pytest.mark.parametrize("name", ["garbage.jsonl.zst", "garbage.parquet"])
def test_an_unreadable_file_next_to_a_good_one_is_refused_before_counting(tmp_path, monkeypatch, name):
    import xiaolm.tokenizer.train as train

    def no_counting(*args, **kwargs):
        raise AssertionError("counting started")

    monkeypatch.setattr(train, "count_chunks", no_counting)
    bad = tmp_path / name
    bad.write_bytes(b"neither zstd nor parquet " * 4)
    with pytest.raises(XiaolmError, match=f"{name}: cannot read this input"):
        train_tokenizer([CORPUS[0], bad], tmp_path / "out", vocab_size=VOCAB, workers=1)
    assert not (tmp_path / "out").exists()


def tiny_corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"text": "你好" * 40}) + "\n" for _ in range(40)), encoding="utf-8")
    return corpus


def test_vocab_larger_than_the_chunks_support_is_refused_after_counting_before_the_merges(tmp_path, monkeypatch):
    import xiaolm.tokenizer.train as train

    def no_merges(*args, **kwargs):
        raise AssertionError("merges trained")

    monkeypatch.setattr(train, "train_bpe_from_counts", no_merges)
    with pytest.raises(XiaolmError, match=r"larger than this corpus supports \(its chunk counts allow at most 311"):
        train_tokenizer([tiny_corpus(tmp_path)], tmp_path / "out", vocab_size=400, workers=1)
    assert not (tmp_path / "out").exists()


def test_vocab_larger_than_the_merges_found_is_refused_with_the_size_that_works_and_nothing_saved(tmp_path):
    corpus = tmp_path / "two.jsonl"
    corpus.write_text(json.dumps({"text": "xab yab"}) + "\n", encoding="utf-8")  # only "ab" occurs twice
    with pytest.raises(XiaolmError, match=r"training found only 265 tokens\) — use --vocab-size 265 or less, a lower"):
        train_tokenizer([corpus], tmp_path / "out", vocab_size=266, workers=1)
    assert not (tmp_path / "out").exists()
    out = train_tokenizer([corpus], tmp_path / "out", vocab_size=265, workers=1)
    assert len(AutoTokenizer.from_pretrained(str(out))) == 265


def test_sentencepiece_vocab_too_high_is_refused_with_the_size_that_works(tmp_path):
    corpus = tiny_corpus(tmp_path)
    with pytest.raises(XiaolmError, match=r"larger than this corpus supports \(sentencepiece allows at most 268 tokens"
                                          r"\) — use --vocab-size 268 or less"):
        train_tokenizer([corpus], tmp_path / "out", vocab_size=400, backend="sentencepiece", workers=1)
    assert not (tmp_path / "out").exists()
    out = train_tokenizer([corpus], tmp_path / "out", vocab_size=268, backend="sentencepiece", workers=1)
    assert len(AutoTokenizer.from_pretrained(str(out))) == 268


@pytest.mark.parametrize("min_frequency", [1, 2, 3])
def test_merges_bound_is_never_below_what_bpe_learns(min_frequency):
    from xiaolm.tokenizer.train import BASE_VOCAB, merges_bound, train_bpe_from_counts

    rng = random.Random(min_frequency)
    for _ in range(200):
        counts = {"".join(rng.choice("ab你") for _ in range(rng.randint(1, 9))): rng.randint(1, 4) for _ in range(5)}
        learnt = train_bpe_from_counts(counts, 5000, min_frequency).get_vocab_size() - BASE_VOCAB
        assert learnt <= merges_bound(counts, min_frequency)
    assert merges_bound({"xab": 1, " yab": 1}, 2) == 2  # only the boundaries of the frequent pair "ab" can go
    assert merges_bound({"xyz": 5, "abc": 1}, 2) == 2 and merges_bound({"xyz": 1, "abc": 1}, 2) == 0


def test_a_smaller_max_memory_gives_smaller_tables_that_prune_and_still_round_trip(tmp_path, monkeypatch):
    import xiaolm.tokenizer.train as train

    # each chunk is made to cost 64 KB while counting and 128 KB while training, so that the smallest budget
    # allowed holds only ~1,700 chunks while counting and 1,024 (the floor) for training: 30 KB of text overflow it
    monkeypatch.setattr(train, "COUNT_BYTES_PER_CHUNK", 64 << 10)
    monkeypatch.setattr(train, "TRAIN_BYTES_PER_CHUNK", 128 << 10)
    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(400)]
    docs = ["，".join("".join(rng.choices(chars, k=rng.randint(2, 3))) for _ in range(30)) + "。" for _ in range(100)]
    corpus = tmp_path / "words.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    small, large = (train_tokenizer([corpus], tmp_path / budget, vocab_size=600, workers=1, max_memory=budget)
                    for budget in ("256MB", "4GB"))
    tight, roomy = report(small), report(large)
    distinct = roomy["distinct_chunks_counted"]  # exact: nothing was pruned
    assert tight["table_capacity"] < distinct <= roomy["table_capacity"]
    assert tight["trained_capacity"] == tight["distinct_chunks_trained"] < roomy["distinct_chunks_trained"] == distinct
    assert tight["trained_capacity"] < roomy["trained_capacity"]
    assert tight["prunes"] > 0 and tight["count_error_max"] > 0 and tight["min_count_trained"] > 0
    assert roomy["prunes"] == roomy["count_error_max"] == roomy["min_count_trained"] == 0
    for out in (small, large):
        tok = AutoTokenizer.from_pretrained(str(out))
        assert len(tok) == 600
        for text in (docs[0], MIXED_SCRIPT[2]):
            assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_sentencepiece_samples_as_many_lines_as_max_memory_allows(tmp_path, monkeypatch):
    import sentencepiece

    from xiaolm.tokenizer.spm import sample_size

    real, asked = sentencepiece.SentencePieceTrainer.train, []

    def recording(**kwargs):
        asked.append(kwargs["input_sentence_size"])
        return real(**kwargs)

    monkeypatch.setattr(sentencepiece.SentencePieceTrainer, "train", recording)
    corpus = tiny_corpus(tmp_path)
    outs = [train_tokenizer([corpus], tmp_path / budget, vocab_size=268, backend="sentencepiece", workers=1,
                            max_memory=budget) for budget in ("256MB", "4GB")]
    assert asked == [report(out)["sampled_lines_max"] for out in outs] == [sample_size(256 << 20), sample_size(4 << 30)]
    assert asked[0] < asked[1]


def test_parse_size_reads_units():
    assert parse_size("4GB") == 4 << 30 and parse_size("512mb") == 512 << 20 and parse_size("1.5G") == 3 << 29
    assert parse_size(1000) == 1000 and parse_size("2 KiB") == 2048


def test_stats_measure_compression_vocabulary_use_and_worst_samples(trained):
    stats = tokenizer_stats(trained[1], CORPUS, worst=3)
    assert stats["texts"] > 300 and stats["tokens"] > 0
    assert stats["chars_per_token"] == round(stats["chars"] / stats["tokens"], 4)
    assert stats["bytes_per_token"] > stats["chars_per_token"]  # Chinese is 3 bytes a character
    assert 0 < stats["vocab_used"] <= VOCAB and 0 < stats["single_cjk_token_share"] < 1
    ratios = [w["chars_per_token"] for w in stats["worst"]]
    assert len(ratios) == 3 and ratios == sorted(ratios) and ratios[0] <= stats["chars_per_token"]
    assert ":" in stats["worst"][0]["where"]


def test_cli_trains_and_reports_stats(tmp_path, capsys):
    out = tmp_path / "tok"
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", *CORPUS, "--out", str(out), "--vocab-size", "1000", "--workers", "2",
              "--max-memory", "1GB"])
    assert e.value.code == 0 and (out / "tokenizer.json").is_file()
    counted = report(out)
    assert counted["workers"] == 2 and counted["count_error_max"] == 0 and counted["vocab_size"] == 1000
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "stats", str(out), CORPUS[0], "--worst", "2"])
    printed = capsys.readouterr().out
    assert e.value.code == 0 and "chars per token" in printed and "worst compressed" in printed
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", CORPUS[0], "--out", str(tmp_path / "x"), "--vocab-size", "10"])
    assert e.value.code == 2 and "vocab_size=10 is too small" in capsys.readouterr().err


def test_cli_trains_the_sentencepiece_backend_with_the_default_memory_budget(tmp_path):
    out = tmp_path / "tok"
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", CORPUS[0], "--out", str(out), "--vocab-size", "3000", "--workers", "1",
              "--backend", "sentencepiece"])
    assert e.value.code == 0
    counted = report(out)
    assert counted["backend"] == "sentencepiece" and counted["vocab_size"] == 3000
    assert counted["max_memory"] == 2 << 30 and counted["sampled_lines_max"] > 0
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 3000 and tok.decode(tok.encode(MIXED_SCRIPT[1], add_special_tokens=False)) == MIXED_SCRIPT[1]


@pytest.mark.parametrize("backend,vocab", [("bpe", 1000), ("sentencepiece", VOCAB)])
def test_a_gzipped_corpus_trains_the_same_tokenizer_as_the_plain_file(tmp_path, backend, vocab):
    gz = tmp_path / "corpus_zh.jsonl.gz"
    gz.write_bytes(gzip.compress(Path(CORPUS[0]).read_bytes(), mtime=0))
    plain = train_tokenizer([CORPUS[0]], tmp_path / "plain", vocab_size=vocab, workers=1, backend=backend)
    zipped = train_tokenizer([gz], tmp_path / "gz", vocab_size=vocab, workers=1, backend=backend)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (zipped / name).read_bytes() == (plain / name).read_bytes(), name
    tok = AutoTokenizer.from_pretrained(str(zipped))
    assert len(tok) == vocab and tok.decode(tok.encode(MIXED_SCRIPT[0], add_special_tokens=False)) == MIXED_SCRIPT[0]
