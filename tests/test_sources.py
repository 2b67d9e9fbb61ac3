"""Each public-dataset recipe turns a small fixture in the dataset's real layout into our record kinds."""

import json
from pathlib import Path

import pytest

from xiaolm.data.sources import RECIPES, import_records
from xiaolm.errors import XiaolmError

FIXTURES = Path(__file__).parent / "fixtures" / "sources"


def imported(recipe: str, tmp_path: Path, **kw) -> tuple[dict, list[dict], list[dict]]:
    report = import_records(recipe, [FIXTURES / recipe], tmp_path / recipe, **kw)
    records = [json.loads(line) for shard in report["shards"]
               for line in (tmp_path / recipe / shard).read_text(encoding="utf-8").splitlines()]
    rejects = [json.loads(line) for line in (tmp_path / recipe / "rejects.jsonl").read_text().splitlines()]
    return report, records, rejects


def test_every_recipe_has_a_fixture_and_writes_records_of_its_kind(tmp_path):
    assert sorted(RECIPES) == sorted(p.name for p in FIXTURES.iterdir())
    for name, recipe in RECIPES.items():
        report, records, _ = imported(name, tmp_path)
        assert report["records_written"] == len(records) >= 1, name
        for r in records:
            assert r["source"] == name and r["id"]
            if recipe.kind == "chat":
                roles = [m["role"] for m in r["messages"]]
                assert roles[0] == "user" and roles[-1] == "assistant" and all(m["content"] for m in r["messages"])
            elif recipe.kind == "preference":
                assert r["chosen"] and r["rejected"] and (r.get("prompt") or r["messages"][-1]["role"] == "user")
            elif recipe.kind == "extraction":
                assert r["text"].strip() and r["triplets"] and all(len(t) == 3 and all(t) for t in r["triplets"])
            else:
                assert r["text"].strip()


def test_forum_questions_join_title_and_description(tmp_path):
    _, records, rejects = imported("webtext2019zh", tmp_path)
    question = "AlphaGo只会下围棋吗？阿法狗能写小说吗？\n那么现在会不会有能写小说的AI呢"
    assert records[0]["messages"][0]["content"] == question
    assert records[1]["messages"][0]["content"] == "怎样才能坚持早起？"  # desc repeating the title is dropped
    assert records[0]["id"] == "545576062" and records[0]["star"] == 3
    assert [r["reason"] for r in rejects] == ["bad_json"]  # the cut-off last line


def test_empty_answers_are_rejected_with_the_missing_field(tmp_path):
    report, records, rejects = imported("baike_qa2019", tmp_path)
    assert len(records) == 2 and report["rejected"] == {"missing_field": 1}
    assert rejects[0]["detail"] == "needs answer (absent, empty or not text)"
    assert rejects[0]["where"].endswith("baike_qa_valid.json:3")


def test_medical_csv_is_read_as_gb18030(tmp_path):
    _, records, _ = imported("medical-dialogue", tmp_path)
    assert records[0]["department"] == "心血管科"
    assert records[0]["messages"][0]["content"].startswith("我有高血压")


def test_parquet_and_alpaca_layouts(tmp_path):
    _, zhihu, _ = imported("zhihu-kol", tmp_path)
    assert zhihu[1]["messages"][1]["content"].startswith("先选一门") and zhihu[0]["origin"] == "Zhihu"
    assert zhihu[0]["id"].endswith(":row 1")
    _, alpaca, _ = imported("alpaca-gpt4-zh", tmp_path)
    assert alpaca[1]["messages"][0]["content"] == "解释为什么以下分数等同于1/4\n4/16"


def test_belle_multiturn_keeps_turns_and_rejects_unknown_speakers(tmp_path):
    _, records, rejects = imported("belle-multiturn", tmp_path)
    assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert records[0]["id"] == "77771"
    assert rejects[0]["reason"] == "bad_record" and "robot" in rejects[0]["detail"]


def test_preference_layouts_become_prompt_or_messages_with_chosen_and_rejected(tmp_path):
    _, plain, rejects = imported("prompt-chosen-rejected", tmp_path)
    assert plain[0] == {"prompt": "中国的首都是哪座城市？", "chosen": "中国的首都是北京。",
                        "rejected": "中国的首都是上海。", "id": "p1", "source": "prompt-chosen-rejected"}
    assert [r["reason"] for r in rejects] == ["missing_field"]
    _, sharegpt, rejects = imported("llamafactory-dpo", tmp_path)
    assert [m["role"] for m in sharegpt[1]["messages"]] == ["user", "assistant", "user"]
    assert sharegpt[1]["chosen"].startswith("西红柿") and sharegpt[1]["rejected"] == "自己想。"
    assert rejects[0]["reason"] == "bad_record" and "chosen" in rejects[0]["detail"]
    _, medical, rejects = imported("medicalgpt-reward", tmp_path)
    assert [m["role"] for m in medical[0]["messages"]] == ["system", "user", "assistant", "user"]
    assert medical[0]["messages"][-1]["content"] == "大概一周了，该怎么办？"
    assert medical[1]["messages"] == [{"role": "user", "content": "感冒了可以喝冷饮吗？"}]
    assert [r["reason"] for r in rejects] == ["missing_field"]


def test_duie_spo_lists_become_triplets_with_complex_objects_split_by_key(tmp_path):
    report, records, rejects = imported("duie", tmp_path)
    assert records[0]["triplets"] == [["山间小路", "作者", "青禾"], ["山间小路", "出版社", "南川出版社"]]
    assert records[1]["triplets"] == [["北州往事", "上映时间", "2019年"], ["北州往事", "上映时间_inArea", "东州"],
                                      ["北州往事", "主演", "林远"]]  # the repeated spo is kept once
    assert records[0]["text"].startswith("《山间小路》") and records[0]["id"] == "duie:duie_train.json:1"
    assert report["rejected"] == {"missing_field": 1, "bad_record": 1}
    assert [(r["where"].rsplit(":", 1)[1], r["reason"]) for r in rejects] == [("3", "missing_field"),
                                                                                ("5", "bad_record")]


def test_wikiextractor_doc_blocks_and_json_lines(tmp_path):
    _, records, _ = imported("zhwiki", tmp_path)
    assert [r["title"] for r in records] == ["數學", "哲學", "文學"]
    assert records[0]["text"] == "數學是研究數量、結構以及空間等概念的一門學科。\n\n它從計數、計算和測量中產生。"
    assert "<例如>" in records[1]["text"]  # entities unescaped; the title line is not repeated in the text


def test_wikiextractor_files_cut_short_or_not_utf8_are_rejected_by_line(tmp_path):
    import gzip

    block = (FIXTURES / "zhwiki" / "extracted" / "AA" / "wiki_00").read_bytes()
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    (extracted / "wiki_00").write_bytes(block.replace("研究".encode(), b"\xff\xfe", 1))
    (extracted / "wiki_01.gz").write_bytes(gzip.compress(block)[:-30])  # the download stopped early
    report = import_records("zhwiki", [extracted], tmp_path / "out")
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["reason"]: r["where"] for r in rejects}
    assert reasons["invalid_utf8"].startswith(f"{extracted / 'wiki_00'}:")
    assert reasons["unreadable_file"].startswith(f"{extracted / 'wiki_01.gz'}:")
    assert report["rejected"]["invalid_utf8"] == 1 and report["rejected"]["unreadable_file"] == 1
    assert report["records_written"] >= 1


def test_wrong_recipe_stops_early_naming_the_expected_fields(tmp_path):
    with pytest.raises(XiaolmError, match=r"lack the fields recipe 'firefly' needs \(input, target\)") as e:
        import_records("firefly", [FIXTURES / "belle"], tmp_path / "out")
    assert "instruction" in str(e.value) and "JSON lines: kind, input, target" in e.value.hint
    assert not list((tmp_path / "out").glob("part-*.jsonl"))
    with pytest.raises(XiaolmError, match="unknown recipe"):
        import_records("nope", [FIXTURES / "belle"], tmp_path / "out")


def test_shards_split_and_a_rerun_skips_finished_work(tmp_path, caplog):
    report = import_records("firefly", [FIXTURES / "firefly"], tmp_path / "ff", shard_records=1)
    assert report["shards"] == ["part-00000.jsonl", "part-00001.jsonl"]
    caplog.set_level("INFO")
    again = import_records("firefly", [FIXTURES / "firefly"], tmp_path / "ff", shard_records=1)
    assert again == report and "up to date" in caplog.text


def test_cli_import(tmp_path):
    from xiaolm.cli import main

    for recipe, source, code in [("skypile", "skypile", 0), ("firefly", "belle", 2)]:
        with pytest.raises(SystemExit) as e:
            main(["data", "import", recipe, str(FIXTURES / source), "--out", str(tmp_path / recipe)])
        assert e.value.code == code
    assert json.loads((tmp_path / "skypile" / "report.json").read_text())["records_written"] == 2


def _firefly_files(tmp_path: Path) -> Path:
    """Four input files in the firefly layout, one of them with a bad line."""
    lines = (FIXTURES / "firefly" / "firefly-train-1.1M.jsonl").read_text(encoding="utf-8").splitlines()
    folder = tmp_path / "raw"
    folder.mkdir()
    for i in range(4):
        extra = ["{not json"] if i == 2 else []
        (folder / f"firefly-{i}.jsonl").write_text("\n".join(lines + extra) + "\n", encoding="utf-8")
    return folder


def test_files_convert_in_parallel_to_the_same_output_as_one_process(tmp_path, caplog):
    caplog.set_level("INFO")
    folder = _firefly_files(tmp_path)
    one = import_records("firefly", [folder], tmp_path / "one", workers=1)
    two = import_records("firefly", [folder], tmp_path / "two", workers=2)
    assert one["shards"] == two["shards"] == [f"part-{i:05d}.jsonl" for i in range(4)] and two["workers"] == 2
    for key in ("records_read", "records_written", "rejected", "examples_rejected"):
        assert one[key] == two[key], key
    assert one["rejected"] == {"bad_json": 1}
    assert "data/import firefly: 8 records read, 8 written to 4 shard(s), 1 rejected (bad_json 1)" in caplog.text
    for name in [*one["shards"], "rejects.jsonl"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert not (tmp_path / "two" / "_work").exists()


def test_a_rerun_after_a_crash_converts_only_the_unfinished_files(tmp_path, monkeypatch):
    import xiaolm.data.sources as sources

    folder = _firefly_files(tmp_path)
    whole = import_records("firefly", [folder], tmp_path / "whole", workers=1)
    real, calls, crash = sources.import_file, [], [True]

    def crash_on_third(out, recipe, path, shard_records):
        calls.append(Path(path).name)
        if crash[0] and len(calls) == 3:
            raise RuntimeError("crash in the third file")
        return real(out, recipe, path, shard_records)

    monkeypatch.setattr(sources, "import_file", crash_on_third)
    with pytest.raises(RuntimeError, match="crash"):
        import_records("firefly", [folder], tmp_path / "out", workers=1)
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    calls.clear()
    crash[0] = False
    again = import_records("firefly", [folder], tmp_path / "out", workers=1)
    assert calls == ["firefly-2.jsonl", "firefly-3.jsonl"]  # the two finished files are not converted again
    assert {k: again[k] for k in ("records_written", "rejected", "shards")} == \
        {k: whole[k] for k in ("records_written", "rejected", "shards")}
    for name in [*whole["shards"], "rejects.jsonl"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_an_import_that_converts_no_record_fails_naming_the_reasons(tmp_path):
    lines = [json.dumps({"id": i, "conversations": [{"from": "robot", "value": "你好"}]}) for i in range(12)]
    (tmp_path / "turns.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(XiaolmError, match=r"0 of 12 records converted: bad_record 12") as e:
        import_records("belle-multiturn", [tmp_path / "turns.json"], out, workers=1)
    assert str(out / "rejects.jsonl") in str(e.value)
    assert len((out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()) == 12
    assert not (out / "_SUCCESS").exists() and not (out / "report.json").exists()
