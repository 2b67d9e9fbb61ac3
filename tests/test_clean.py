"""Cleaning: each rule on a tiny example, report bookkeeping, chat records, rerun skip."""

import json
import logging
from pathlib import Path

import pytest

from xiaolm.config import load_config
from xiaolm.data.clean import CleanConfig, Cleaner, clean_files
from xiaolm.data.clean_rules import (
    cjk_ratio,
    collapse_space,
    nfkc,
    normalize_punct,
    split_long,
    strip_control,
    strip_emails,
    strip_markup,
    strip_urls,
    strip_wiki,
)
from xiaolm.errors import XiaolmError

MIXED = Path(__file__).parent / "fixtures" / "mixed"


def parts(out: Path) -> list[dict]:
    """Every record of a cleaned directory, shard by shard."""
    return [r for p in sorted(out.glob("part-*.jsonl")) for r in rows(p)]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_nfkc_makes_ascii_half_width_but_keeps_chinese_punctuation():
    assert nfkc("ＡＢＣ１２３ａｂｃ") == "ABC123abc"
    assert nfkc("你好，世界！真的？是；否：（注）～好…") == "你好，世界！真的？是；否：（注）～好…"
    assert nfkc("“引号”、《书名》「括号」。") == "“引号”、《书名》「括号」。"
    assert nfkc("全角　空格ﬁ①") == "全角 空格fi1"
    assert nfkc("Ｈｅｌｌｏ，ｗｏｒｌｄ！") == "Hello，world！"


def test_t2s_converts_traditional_to_simplified():
    cleaner = Cleaner(CleanConfig(nfkc=False, strip_markup=False, strip_control=False, collapse_space=False))
    assert cleaner.normalize("舉頭望明月，低頭思故鄉。") == "举头望明月，低头思故乡。"
    assert cleaner.normalize("简体字保持不变。") == "简体字保持不变。"
    assert cleaner.modified == {"t2s": 1}


def test_strip_markup_removes_tags_comments_scripts_and_entities():
    assert strip_markup("<p>网页<b>标签</b>&amp;实体&lt;x&gt;&#20013;</p>") == "\n网页标签&实体<x>中\n"
    assert strip_markup('前<br/>后<img src="a.png" alt=\'图\'>完<!-- 注释 -->') == "前\n后完"
    assert strip_markup("<script>var a = 1 < 2;</script><style>p {}</style>正文") == "正文"
    assert strip_markup("如果 x<y 且 y>z，AT&T 不变") == "如果 x<y 且 y>z，AT&T 不变"


def test_strip_control_and_collapse_space():
    assert strip_control("控制\x07字符\x1b[0m\u200b零宽\ufeff\r\n换行\r旧Mac\t制表") == \
        "控制字符[0m零宽\n换行\n旧Mac\t制表"
    assert collapse_space("  第一段  \n\n\n\n第二段\t\n    缩进保留\n") == "第一段\n\n第二段\n    缩进保留"


def test_cjk_ratio_counts_non_space_characters():
    assert cjk_ratio("中文 text") == pytest.approx(2 / 6)
    assert cjk_ratio("𠀀𪚥") == 1.0 and cjk_ratio("   ") == 0.0


def test_split_long_prefers_paragraphs_then_lines_then_sentences():
    paras = ["第一段" * 10, "第二段" * 10, "第三段" * 10]
    assert split_long("\n\n".join(paras), 70) == ["\n\n".join(paras[:2]), paras[2]]
    pieces = split_long("一句话。" * 100, 50)
    assert all(len(p) <= 50 for p in pieces) and "".join(pieces) == "一句话。" * 100
    assert all(p.endswith("。") for p in pieces)
    assert split_long("无" * 25, 10) == ["无" * 10, "无" * 10, "无" * 5]


def test_clean_fixture_directory_normalizes_filters_and_reports(tmp_path, caplog):
    out = tmp_path / "clean"
    with caplog.at_level(logging.INFO, logger="xiaolm.data.clean"):
        report = clean_files([MIXED], out)
    kept = parts(out)
    assert [p.name for p in sorted(out.glob("part-*.jsonl"))] == [f"part-{i:05d}.jsonl" for i in range(5)]
    by_id = {r["id"]: r for r in kept}
    assert by_id["n1"] == {"id": "n1", "text": "北京时间2024年3月1日，科学家发布了新的研究成果&数据。",
                           "url": "https://example.com/1", "source": "news.jsonl"}
    assert by_id["n2"]["text"] == "举头望明月，低头思故乡。这是一首著名的唐诗。"
    assert by_id["n3"]["text"] == "控制字符和零宽字符都应该被删除掉。"
    assert {"n4", "n5", "n6", "c4"}.isdisjoint(by_id)
    assert by_id["c1"]["messages"][1] == {"role": "user", "content": "你好，请问你是谁？"}
    assert by_id["c3"]["messages"][0]["content"] == "把「ABC」翻译成中文"
    assert by_id["c2"] == {"id": "c2", "prompt": "一加一等于几？", "response": "一加一等于二。",
                           "source": "chat_zh.jsonl"}
    forum = [r for r in kept if r["source"] == "forum.json"]
    assert [r["text"] for r in forum] == ["今天天气很好，我们去公园散步吧！",
                                          "ABC全角字母和123全角数字需要转换成半角。"]
    assert forum[0]["author"] == "小明" and len(forum[0]["id"]) == 16  # extra fields kept, stable id added

    assert report["rejected"] == {"bad_chat": 1, "not_object": 1, "missing_field": 1, "too_short": 1,
                                  "low_cjk_ratio": 1, "exact_duplicate": 1}
    assert report["records_in"] == 18 and report["records_out"] == len(kept) == 12
    assert report["records_in"] == report["records_out"] + sum(report["rejected"].values())
    assert {"nfkc", "t2s", "strip_markup", "strip_control"} <= set(report["modified"])
    assert report["examples"]["t2s"][0]["after"] == "你好，请问你是谁？"
    assert report["examples"]["too_short"][0]["where"].endswith("news.jsonl:4")
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["records_out"] == 12
    rejected = rows(out / "rejects.jsonl")
    assert len(rejected) == 6 and all({"where", "reason", "record"} <= set(r) for r in rejected)
    assert {r["reason"]: r["where"].rsplit("/", 1)[1] for r in rejected}["exact_duplicate"] == "news.jsonl:6"
    assert (out / "_SUCCESS").is_file()
    assert load_config(CleanConfig, out / "config.yaml") == CleanConfig()
    assert "data/clean: 18 in, 12 out, 6 rejected (bad_chat 1," in caplog.text
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_rules_can_be_switched_off(tmp_path):
    src = write(tmp_path / "raw.jsonl", [{"text": "舉頭望明月<b>ＡＢＣ</b>"}, {"text": "短"}, {"text": "短"}])
    cfg = CleanConfig(t2s=False, nfkc=False, strip_markup=False, min_chars=1, min_cjk_ratio=0.0,
                      exact_dedup=False)
    report = clean_files([src], tmp_path / "out", cfg)
    kept = [r["text"] for r in rows(tmp_path / "out" / "part-00000.jsonl")]
    assert kept == ["舉頭望明月<b>ＡＢＣ</b>", "短", "短"]
    assert report["rejected"] == {} and report["modified"] == {}


@pytest.mark.parametrize(("rule", "text", "mark"), [
    ("strip_wiki", "数学是[[科学|一门科学]]的基础。", "[["),
    ("strip_markup", "数学是<b>科学</b>的基础。", "<b>"),
    ("strip_urls", "数学见https://example.org/math页面。", "https://"),
    ("strip_emails", "数学问题请写信到math@example.org询问。", "@"),
    ("strip_control", "数学是\x07科学的基础。", "\x07"),
    ("nfkc", "数学是ＡＢＣ的基础。", "ＡＢＣ"),
    ("t2s", "數學是科學的基礎。", "數"),
    ("normalize_punct", "数学是什么?科学的基础!", "?"),
    ("collapse_space", "数学是科学的基础。   \n\n\n\n下一段。", "   "),
])
def test_each_normalizer_is_counted_and_can_be_switched_off(rule, text, mark):
    on = Cleaner(CleanConfig())
    assert mark not in on.normalize(text)
    assert on.modified[rule] == 1 and on.examples[rule][0]["before"].startswith(text[:10])
    off = Cleaner(CleanConfig(**{rule: False}))
    assert mark in off.normalize(text) and rule not in off.modified


def test_long_documents_are_split_and_counts_still_add_up(tmp_path):
    paras = [f"第{n}段的内容。" * 20 for n in "一二三"]  # 140 characters each
    src = write(tmp_path / "raw.jsonl", [{"id": "long", "text": "\n\n".join(paras)}, {"text": "短"}])
    report = clean_files([src], tmp_path / "out", CleanConfig(max_chars=150, max_dup_ngram_ratio=1.0))
    kept = rows(tmp_path / "out" / "part-00000.jsonl")
    assert [(r["id"], r["text"]) for r in kept] == [(f"long-{i}", p) for i, p in enumerate(paras)]
    assert report["added_by_split"] == 2 and report["modified"]["split_long"] == 1
    rejected = sum(report["rejected"].values())
    assert report["records_in"] + report["added_by_split"] == report["records_out"] + rejected


def test_rerun_skips_and_changes_rerun(tmp_path):
    src = write(tmp_path / "raw.jsonl", [{"text": "一段足够长的中文句子用于测试。"}])
    first = clean_files([src], tmp_path / "out")
    stamp = (tmp_path / "out" / "part-00000.jsonl").stat().st_mtime_ns
    assert clean_files([src], tmp_path / "out") == first
    assert (tmp_path / "out" / "part-00000.jsonl").stat().st_mtime_ns == stamp
    assert clean_files([src], tmp_path / "out", CleanConfig(min_chars=100))["rejected"] == {"too_short": 1}
    write(src, [{"text": "一段足够长的中文句子用于测试。"}, {"text": "再加一段新的中文句子进来。"}])
    assert clean_files([src], tmp_path / "out", CleanConfig(min_chars=100))["records_in"] == 2


def test_output_inside_an_input_directory_is_not_read_back(tmp_path):
    write(tmp_path / "raw.jsonl", [{"text": "一段足够长的中文句子用于测试。"}])
    clean_files([tmp_path], tmp_path / "clean")
    (tmp_path / "clean" / "_SUCCESS").unlink()
    assert clean_files([tmp_path], tmp_path / "clean")["records_in"] == 1


def test_bad_settings_fail_before_reading(tmp_path):
    with pytest.raises(XiaolmError, match="min_chars"):
        clean_files([tmp_path / "missing.jsonl"], tmp_path / "out", CleanConfig(min_chars=50, max_chars=10))
    with pytest.raises(XiaolmError, match="input not found"):
        clean_files([tmp_path / "missing.jsonl"], tmp_path / "out")
    with pytest.raises(XiaolmError, match="txt_docs"):
        clean_files([tmp_path / "missing.jsonl"], tmp_path / "out", CleanConfig(txt_docs="paragraph"))


def test_text_files_cut_at_blank_lines_when_asked(tmp_path):
    book = tmp_path / "raw" / "book.txt"
    book.parent.mkdir()
    book.write_text("春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。\n\n床前明月光，疑是地上霜。\n",
                    encoding="utf-8")
    by_line = clean_files([book.parent], tmp_path / "lines")
    assert by_line["records_in"] == 3
    by_blank = clean_files([book.parent], tmp_path / "blank", CleanConfig(txt_docs="blank"))
    assert by_blank["records_in"] == 2
    assert [r["text"] for r in parts(tmp_path / "blank")] == [
        "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。", "床前明月光，疑是地上霜。"]


def test_wiki_markup_urls_and_emails_are_scrubbed():
    wiki = ("== 历史 ==\n'''北京'''是[[中华人民共和国|中国]]的首都{{cite|年份=2020{{注}}}}，"
            "见[https://example.org 官网]。<ref name=a>注释</ref>")
    assert strip_wiki(wiki) == "历史\n北京是中国的首都，见官网。"
    assert strip_urls("详见https://example.org/a?b=1，或www.example.cn。") == "详见，或。"
    assert strip_emails("联系 someone.name+x@mail.example.com 即可") == "联系  即可"
    assert normalize_punct("你好,世界!真的吗?是的:对;好。。。。。") == "你好，世界！真的吗？是的：对；好。。。"
    assert normalize_punct("3,14 and a,b") == "3,14 and a,b"  # only after Chinese


@pytest.mark.parametrize("text,reason", [
    ("哈" * 25 + "，这个笑话太好笑了，大家都笑了起来。", "char_repetition"),
    ("欢迎光临本店\n欢迎光临本店\n欢迎光临本店\n今日特价商品", "line_repetition"),
    ("点击这里领取优惠券马上领取" * 6 + "结束。", "ngram_repetition"),
])
def test_repetition_filters_reject_with_their_reason(tmp_path, text, reason):
    src = write(tmp_path / "raw.jsonl", [{"text": text}, {"text": "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"}])
    report = clean_files([src], tmp_path / "out", CleanConfig())
    assert report["rejected"] == {reason: 1} and report["records_out"] == 1
    assert report["examples"][reason][0]["where"].endswith("raw.jsonl:1")
    off = ["max_char_run=0", "max_dup_line_ratio=1", "max_dup_ngram_ratio=1"]  # repeats trip several of them
    again = clean_files([src], tmp_path / "off", load_config(CleanConfig, None, off))
    assert again["rejected"] == {} and again["records_out"] == 2


def test_chat_filters_block_list_and_language(tmp_path):
    def chat(user, answer):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}

    chats = [chat("你好", " "), chat("问" * 50, "好的，明白了。"), chat("今天天气怎么样？", "晴天。")]
    texts = [{"text": "这是一段包含违禁词甲的中文句子，不能保留。"},
             {"text": "這是一個繁體中文的句子，用來測試語言識別。"},
             {"text": "これは日本語の文章です。中国語ではありません。"}]
    (tmp_path / "block.txt").write_text("# keywords\n违禁词甲\n", encoding="utf-8")
    src = write(tmp_path / "raw.jsonl", chats + texts)
    cfg = load_config(CleanConfig, None, ["max_prompt_chars=40", f"block_list={tmp_path / 'block.txt'}", "lang=zh",
                                          "min_cjk_ratio=0"])
    report = clean_files([src], tmp_path / "out", cfg)
    assert report["rejected"] == {"answer_too_short": 1, "prompt_too_long": 1, "blocked_keyword": 1,
                                  "wrong_language": 1}
    assert report["records_out"] == 2
    with pytest.raises(XiaolmError, match="block list"):
        clean_files([src], tmp_path / "x", CleanConfig(block_list=str(tmp_path / "missing.txt")))


def _shards(tmp_path: Path, n: int = 4) -> Path:
    """n input files with clean, rejected, split and duplicate records (the MIXED fixture plus generated ones)."""
    src = tmp_path / "raw"
    src.mkdir()
    for f in MIXED.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    for i in range(n):
        docs = [{"text": f"第{i}个文件的第{j}篇文章，内容是关于城市{j % 7}的介绍。" * (1 + j % 3)} for j in range(30)]
        docs += [{"text": "重复出现的句子在每个文件里都有一份。"}, {"text": "短"}, {"messages": "bad"}]
        write(src / f"gen-{i}.jsonl", docs)
    return src


def test_parallel_shards_give_the_same_output_as_one_process(tmp_path):
    src = _shards(tmp_path)
    one = clean_files([src], tmp_path / "one", workers=1)
    two = clean_files([src], tmp_path / "two", workers=2)
    assert one["shards"] == two["shards"] == 9 and two["workers"] == 2
    for key in ("records_in", "records_out", "rejected", "modified", "added_by_split", "examples"):
        assert one[key] == two[key], key
    for name in sorted(p.name for p in (tmp_path / "one").glob("part-*.jsonl")):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert (tmp_path / "one" / "rejects.jsonl").read_bytes() == (tmp_path / "two" / "rejects.jsonl").read_bytes()
    # each file keeps its own copy of the sentence repeated across files (data dedup removes those)
    assert sum(r.get("text") == "重复出现的句子在每个文件里都有一份。" for r in parts(tmp_path / "one")) == 4
    assert not (tmp_path / "two" / "_work").exists()


def test_a_rerun_after_a_crash_reuses_finished_shards(tmp_path, monkeypatch):
    import xiaolm.data.clean as clean

    src = _shards(tmp_path)
    whole = clean_files([src], tmp_path / "whole", workers=1)
    real, calls, crash = clean.clean_shard, [], [True]

    def crash_on_third(out, path, cfg):
        calls.append(Path(path).name)
        if crash[0] and len(calls) == 3:
            raise RuntimeError("crash in the third file")
        return real(out, path, cfg)

    monkeypatch.setattr(clean, "clean_shard", crash_on_third)
    with pytest.raises(RuntimeError, match="crash"):
        clean_files([src], tmp_path / "out", workers=1)
    assert not (tmp_path / "out" / "_SUCCESS").exists() and len(calls) == 3
    calls.clear()
    crash[0] = False
    again = clean_files([src], tmp_path / "out", workers=1)
    assert len(calls) == 9 - 2  # the two finished files are not cleaned again
    assert {k: again[k] for k in ("records_out", "rejected", "examples")} == \
        {k: whole[k] for k in ("records_out", "rejected", "examples")}
    assert parts(tmp_path / "out") == parts(tmp_path / "whole")


def test_records_with_lone_surrogates_are_rejected_by_the_reader(tmp_path):
    src = tmp_path / "raw.jsonl"  # "\udc80" alone is valid JSON but not Unicode text; "\ud83d\ude00" is 😀
    src.write_text('{"text": "今天天气很好我们去公园散步\\udc80吧"}\n{"text": "短\\ud800"}\n'
                   '{"text": "今天天气很好我们去公园散步\\ud83d\\ude00"}\n', encoding="utf-8")
    report = clean_files([src], tmp_path / "out")
    assert [r["text"] for r in parts(tmp_path / "out")] == ["今天天气很好我们去公园散步😀"]
    assert report["rejected"] == {"lone_surrogate": 2}
    assert rows(tmp_path / "out" / "rejects.jsonl")[1]["record"] == {"text": "短\ud800"}  # written escaped


def test_every_rule_in_the_tables_has_a_config_setting():
    from dataclasses import fields

    from xiaolm.data.clean_rules import CHAT_FILTERS, NORMALIZERS, TEXT_FILTERS

    settings = {f.name for f in fields(CleanConfig)}
    assert {name for name, _ in NORMALIZERS} <= settings
    assert {f.setting for f in TEXT_FILTERS + CHAT_FILTERS} <= settings
    assert {f.chat_setting for f in TEXT_FILTERS if f.chat_setting} <= settings
    reasons = [f.reason for f in TEXT_FILTERS + CHAT_FILTERS]
    assert len(set(reasons)) == len(reasons)


def _chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


STEP_BY_STEP = _chat("小华有15支铅笔，他送给同桌4支铅笔，又买了6支铅笔，小华现在有多少支铅笔？",
                     "小华有15支铅笔，他送给同桌4支铅笔，又买了6支铅笔，小华现在有多少支铅笔？\n"
                     "1. 小华送给同桌4支铅笔后，小华还有15 - 4 = 11支铅笔。\n"
                     "2. 小华又买了6支铅笔后，小华现在有11 + 6 = 17支铅笔。\n"
                     "答案：小华现在有17支铅笔。")
TRANSLATION = _chat("把下面的句子翻译成中文。\nThe library opens at eight in the morning and closes at nine in the "
                    "evening, except on public holidays.", "图书馆早上八点开门，晚上九点关门，法定节假日除外。")


def test_chats_that_restate_the_question_or_translate_english_are_kept(tmp_path):
    src = write(tmp_path / "chats.jsonl", [STEP_BY_STEP, TRANSLATION])
    report = clean_files([src], tmp_path / "out")
    assert report["rejected"] == {} and report["records_out"] == 2
    # the same words as web text fail the web-text limits: the answer repeats the question, English dominates
    joined = [{"text": "\n".join(m["content"] for m in c["messages"])} for c in (STEP_BY_STEP, TRANSLATION)]
    as_text = clean_files([write(tmp_path / "text.jsonl", joined)], tmp_path / "text")
    assert as_text["rejected"] == {"ngram_repetition": 1, "low_cjk_ratio": 1}


@pytest.mark.parametrize(("answer", "reason"), [
    ("好的，我来回答这个问题。" * 12, "ngram_repetition"),  # a degenerate loop
    ("\n".join(["请点击下方链接领取奖励"] * 8 + ["谢谢"]), "line_repetition"),
    ("哈" * 30, "char_repetition"),
])
def test_repetitive_junk_answers_are_still_rejected(tmp_path, answer, reason):
    src = write(tmp_path / "chats.jsonl", [_chat("你好，请介绍一下你自己。", answer), STEP_BY_STEP])
    report = clean_files([src], tmp_path / "out")
    assert report["rejected"] == {reason: 1} and report["records_out"] == 1


def test_chats_with_no_chinese_are_rejected_and_the_chat_limit_is_a_setting(tmp_path):
    english = _chat("What is the capital of France?", "The capital of France is Paris, a city on the Seine.")
    src = write(tmp_path / "chats.jsonl", [english, STEP_BY_STEP, TRANSLATION])
    assert clean_files([src], tmp_path / "out")["rejected"] == {"low_cjk_ratio": 1}
    strict = clean_files([src], tmp_path / "strict", CleanConfig(chat_min_cjk_ratio=0.3))
    assert strict["rejected"] == {"low_cjk_ratio": 2} and strict["records_out"] == 1
