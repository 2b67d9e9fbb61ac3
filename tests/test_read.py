"""Readers: formats, provenance, globs and directories, rejects that never stop the reading."""

import gzip
import json
from pathlib import Path

import pytest

from xiaolm.errors import XiaolmError
from xiaolm.records import compression, read
from xiaolm.records.inputs import expand_inputs
from xiaolm.records.read import read_records
from xiaolm.records.rejects import RejectLog

MIXED = Path(__file__).parent / "fixtures" / "mixed"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_reads_every_format_in_a_directory_sorted_with_file_and_line():
    with RejectLog() as rejects:
        got = list(read_records([MIXED], rejects))
    wheres = [w.replace(str(MIXED) + "/", "") for _, w in got]
    assert wheres == ["chat_zh.jsonl:1", "chat_zh.jsonl:2", "chat_zh.jsonl:3", "chat_zh.jsonl:4",
                      "forum.json:2", "forum.json:3", "forum.json:5",
                      "lines.txt:1", "lines.txt:3",
                      *[f"news.jsonl:{i}" for i in range(1, 7)],
                      "poems.jsonl.gz:1", "poems.jsonl.gz:2"]
    records = dict(zip(wheres, (r for r, _ in got), strict=True))
    assert records["forum.json:2"] == {"text": "今天天气很好，我们去公园散步吧！", "author": "小明"}
    assert records["lines.txt:3"] == {"text": "夜来风雨声，花落知多少。"}
    assert records["poems.jsonl.gz:2"]["id"] == "p2"
    assert records["news.jsonl:3"]["text"] == "控制\x07字符和\u200b零宽字符都应该被删除掉。"
    assert rejects.counts == {"not_object": 1}
    assert rejects.examples["not_object"][0]["where"].endswith("forum.json:4")


def test_globs_files_and_directories_expand_sorted_and_once(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("a.jsonl", "b/c.txt", "b/d.json.gz", "b/.hidden.jsonl", "b/_SUCCESS", "b/rejects.jsonl",
                 "b/report.json", "b/notes.md"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "x.jsonl").write_bytes(b"")
    names = lambda paths: [str(p.relative_to(tmp_path)) for p in paths]  # noqa: E731
    assert names(expand_inputs([tmp_path])) == ["a.jsonl", "b/c.txt", "b/d.json.gz"]
    recursive = str(tmp_path / "**" / "*.txt")
    assert names(expand_inputs([recursive, tmp_path / "a.jsonl"])) == ["b/c.txt", "a.jsonl"]
    assert names(expand_inputs([tmp_path / "a.jsonl", str(tmp_path / "*.jsonl"), tmp_path])) == [
        "a.jsonl", "b/c.txt", "b/d.json.gz"]
    assert names(expand_inputs(str(tmp_path / "b"))) == ["b/c.txt", "b/d.json.gz"]


def test_bad_lines_go_to_rejects_with_reason_and_file_line_and_reading_goes_on(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\r\n{broken\n"a string"\n{"text": "\xff\xfe"}\n[1, 2]\n\n'
                  b'{"text": "fine"}')
    with RejectLog(tmp_path / "rejects.jsonl") as rejects:
        got = [(r["text"], w) for r, w in read_records([str(f)], rejects)]
    assert got == [("ok", f"{f}:1"), ("fine", f"{f}:7")]
    logged = rows(tmp_path / "rejects.jsonl")
    assert [(r["reason"], r["where"]) for r in logged] == [
        ("bad_json", f"{f}:2"), ("not_object", f"{f}:3"), ("invalid_utf8", f"{f}:4"),
        ("not_object", f"{f}:5")]
    assert logged[0]["record"] == "{broken" and "detail" in logged[0]
    assert logged[1]["record"] == "a string" and logged[3]["record"] == [1, 2]
    assert logged[2]["record"] == '{"text": "\\xff\\xfe"}\n'
    assert rejects.counts == {"bad_json": 1, "not_object": 2, "invalid_utf8": 1} and rejects.total == 4
    assert rejects.summary() == "not_object 2, bad_json 1, invalid_utf8 1"


def test_json_array_streams_across_buffer_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(read, "CHUNK", 7)  # every element and multi-byte character straddles a read
    items = [{"text": f"第{i}条：春风又绿江南岸，“明月”何时照我还？", "n": i,
              "nested": {"list": [i, 3.25, None]}} for i in range(30)]
    f = tmp_path / "big.json"
    f.write_text(json.dumps(items, ensure_ascii=False, indent=1), encoding="utf-8")
    got = list(read_records([f]))
    assert [r for r, _ in got] == items
    lines = f.read_text(encoding="utf-8").splitlines()
    for _, where in got:  # each where points at the line that opens the element
        assert lines[int(where.rsplit(":", 1)[1]) - 1].strip() == "{"


def test_json_file_variants(tmp_path):
    (tmp_path / "one.json").write_text('{"text": "单个对象"}', encoding="utf-8")
    (tmp_path / "seq.json").write_text('{"text": "甲"}\n{"text": "乙"}\n', encoding="utf-8")
    (tmp_path / "empty.json").write_text("", encoding="utf-8")
    (tmp_path / "empty_array.json").write_text("[ ]", encoding="utf-8")
    (tmp_path / "broken.json").write_text('[{"text": "好"},\n{"text": \n', encoding="utf-8")
    (tmp_path / "nocomma.json").write_text('[{"text": "一"} {"text": "二"}]', encoding="utf-8")
    with RejectLog() as rejects:
        got = {Path(w).name: r["text"] for r, w in read_records([tmp_path], rejects)}
    assert got == {"broken.json:1": "好", "nocomma.json:1": "一", "one.json:1": "单个对象",
                   "seq.json:1": "甲", "seq.json:2": "乙"}
    assert rejects.counts == {"bad_json": 2, "empty_file": 2}
    assert [e["where"].rsplit("/", 1)[1] for e in rejects.examples["bad_json"]] == ["broken.json:2",
                                                                                  "nocomma.json:1"]
    assert [e["where"].rsplit("/", 1)[1] for e in rejects.examples["empty_file"]] == ["empty.json:1",
                                                                                    "empty_array.json:1"]


def test_gzip_and_empty_and_truncated_files(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as g:
        g.writelines(json.dumps({"text": f"第{i}行"}, ensure_ascii=False) + "\n" for i in range(2000))
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress("一\n二\n".encode()))
    (tmp_path / "c.jsonl").write_bytes(b"")
    (tmp_path / "e.txt.gz").write_bytes(gzip.compress(b"\n  \n"))
    data = (tmp_path / "a.jsonl.gz").read_bytes()
    (tmp_path / "d.jsonl.gz").write_bytes(data[: len(data) // 2])
    with RejectLog() as rejects:
        got = list(read_records([tmp_path], rejects))
    by_file: dict[str, int] = {}
    for _, where in got:
        name = Path(where.rsplit(":", 1)[0]).name
        by_file[name] = by_file.get(name, 0) + 1
    assert by_file["a.jsonl.gz"] == 2000 and by_file["b.txt.gz"] == 2 and "c.jsonl" not in by_file
    assert 0 < by_file["d.jsonl.gz"] < 2000  # what decompresses before the cut is kept
    assert rejects.counts == {"unreadable_file": 1, "empty_file": 2}  # empty files are counted, not records
    assert sorted(Path(e["where"]).name for e in rejects.examples["empty_file"]) == ["c.jsonl:1", "e.txt.gz:1"]


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(XiaolmError, match="input not found") as e:
        list(read_records([str(tmp_path / "nope.jsonl")]))
    assert e.value.where == str(tmp_path / "nope.jsonl") and e.value.hint
    with pytest.raises(XiaolmError, match="input not found"):
        expand_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "table.xlsx").write_text("a,b\n")
    with pytest.raises(XiaolmError, match="unsupported file type"):
        expand_inputs([tmp_path / "table.xlsx"])


def test_reject_log_without_a_file_only_counts(tmp_path):
    log = RejectLog(None)
    log.add("too_short", "x.jsonl:3", {"text": "短"})
    assert log.total == 1
    assert log.examples["too_short"] == [{"where": "x.jsonl:3", "record": '{"text": "短"}'}]
    assert not list(tmp_path.iterdir())


def test_csv_and_tsv_rows_are_records_and_ragged_rows_are_rejected(tmp_path):
    (tmp_path / "a.csv").write_text('\ufeffask,answer\n"头疼,怎么办","多休息"\nonly-one-field\n\n问,答\n',
                                    encoding="utf-8")
    (tmp_path / "b.tsv").write_text("title\tcontent\n标题\t正文\n", encoding="utf-8")
    with RejectLog(None) as rejects:
        got = list(read_records([tmp_path / "a.csv", tmp_path / "b.tsv"], rejects))
    assert [r for r, _ in got] == [{"ask": "头疼,怎么办", "answer": "多休息"}, {"ask": "问", "answer": "答"},
                                   {"title": "标题", "content": "正文"}]
    assert [w.rsplit("/", 1)[1] for _, w in got] == ["a.csv:2", "a.csv:5", "b.tsv:2"]
    assert rejects.counts == {"bad_csv_row": 1} and rejects.examples["bad_csv_row"][0]["where"].endswith("a.csv:3")


def test_csv_in_another_encoding_is_read_when_named_and_rejected_otherwise(tmp_path):
    (tmp_path / "med.csv").write_bytes("department,ask\n内科,头疼\n".encode("gb18030"))
    assert [r for r, _ in read_records([tmp_path / "med.csv"], encoding="gb18030")] == [
        {"department": "内科", "ask": "头疼"}]
    with RejectLog(None) as rejects:
        assert list(read_records([tmp_path / "med.csv"], rejects)) == []
    assert rejects.counts == {"invalid_utf8": 1}


@pytest.mark.parametrize("compress", ["", ".gz", ".zst"])
def test_a_bad_byte_rejects_only_its_record_in_json_csv_and_tsv(tmp_path, compress):
    import zstandard

    pack = {"": bytes, ".gz": gzip.compress, ".zst": zstandard.ZstdCompressor().compress}[compress]
    files = {
        "a.json": '[{"text": "第一"},\n{"text": "坏\xff"},\n{"text": "第三"}]',
        "b.csv": "ask,answer\n问一,答一\n问二,坏\xff\n问三,答三\n",
        "c.tsv": "ask\tanswer\n问一\t答一\n问二\t坏\xff\n问三\t答三\n",
    }
    for name, text in files.items():
        raw = text.encode("utf-8").replace("\xff".encode(), b"\xff")
        (tmp_path / (name + compress)).write_bytes(pack(raw))
    with RejectLog(tmp_path / "rejects.jsonl") as rejects:
        got = [(Path(w).name, r) for r, w in read_records(sorted(tmp_path.glob("[abc].*")), rejects)]
    assert [w for w, _ in got] == [f"a.json{compress}:1", f"a.json{compress}:3", f"b.csv{compress}:2",
                                   f"b.csv{compress}:4", f"c.tsv{compress}:2", f"c.tsv{compress}:4"]
    assert got[1][1] == {"text": "第三"} and got[3][1] == {"ask": "问三", "answer": "答三"}
    assert rejects.counts == {"invalid_utf8": 3}
    logged = rows(tmp_path / "rejects.jsonl")  # valid UTF-8 JSON, the bad byte shown escaped
    assert [Path(r["where"]).name for r in logged] == [f"a.json{compress}:2", f"b.csv{compress}:3",
                                                       f"c.tsv{compress}:3"]
    assert logged[0]["record"] == {"text": "坏\\xff"} and logged[1]["record"] == "问二,坏\\xff"


def test_zstd_compressed_jsonl_streams_and_a_truncated_one_is_rejected(tmp_path):
    import zstandard

    lines = "".join(json.dumps({"text": f"第{i}行"}, ensure_ascii=False) + "\n" for i in range(20000))
    blob = zstandard.ZstdCompressor().compress(lines.encode("utf-8"))
    (tmp_path / "a.jsonl.zst").write_bytes(blob)
    got = list(read_records([tmp_path / "a.jsonl.zst"]))
    assert len(got) == 20000 and got[-1] == ({"text": "第19999行"}, f"{tmp_path / 'a.jsonl.zst'}:20000")
    (tmp_path / "cut.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    with RejectLog(None) as rejects:
        partial = list(read_records([tmp_path / "cut.jsonl.zst"], rejects))
    assert 0 < len(partial) < 20000 and rejects.counts == {"unreadable_file": 1}


def test_parquet_rows_stream_in_batches_with_row_provenance(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"INSTRUCTION": [f"问题{i}" for i in range(2500)], "RESPONSE": ["回答"] * 2500})
    pq.write_table(table, tmp_path / "z.parquet", row_group_size=700)
    got = list(read_records([tmp_path]))
    assert len(got) == 2500
    assert got[1234] == ({"INSTRUCTION": "问题1234", "RESPONSE": "回答"}, f"{tmp_path / 'z.parquet'}:row 1235")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with RejectLog(None) as rejects:
        assert list(read_records([tmp_path / "bad.parquet"], rejects)) == []
    assert rejects.counts == {"unreadable_file": 1}


def test_blank_line_separated_text_gives_one_document_per_paragraph(tmp_path, monkeypatch):
    text = "\ufeff第一段第一行。\n第一段第二行。\n\n\n第二段。\r\n   \n第三段\xff行。\n"
    raw = text.encode("utf-8").replace("\xff".encode(), b"\xff")
    (tmp_path / "book.txt").write_bytes(raw)
    (tmp_path / "book2.txt.gz").write_bytes(gzip.compress(raw))
    for name in ("book.txt", "book2.txt.gz"):
        with RejectLog() as rejects:
            got = [(r["text"], w.rsplit(":", 1)[1])
                   for r, w in read_records([tmp_path / name], rejects, txt_docs="blank")]
        assert got == [("第一段第一行。\n第一段第二行。", "1"), ("第二段。", "5")]
        assert rejects.counts == {"invalid_utf8": 1}  # the undecodable line is a reject, not part of a document
    # line mode, the default, keeps one document a line
    assert len(list(read_records([tmp_path / "book.txt"]))) == 3
    # a file without blank lines is handed on in bounded pieces
    monkeypatch.setattr(read, "MAX_PARAGRAPH_CHARS", 10)
    (tmp_path / "long.txt").write_text("一二三四五\n六七八九十\n甲乙\n\n丙\n", encoding="utf-8")
    got = [(r["text"], w.rsplit(":", 1)[1]) for r, w in read_records([tmp_path / "long.txt"], txt_docs="blank")]
    assert got == [("一二三四五\n六七八九十", "1"), ("甲乙", "3"), ("丙", "5")]
    with pytest.raises(XiaolmError, match="txt_docs"):
        list(read_records([tmp_path / "book.txt"], txt_docs="para"))


def test_lone_surrogate_escapes_are_rejected_and_pairs_kept(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "好\\udc80"}\n{"text": "笑\\ud83d\\ude00"}\n', encoding="utf-8")
    (tmp_path / "b.json").write_text('[{"t": ["x", {"k\\ud800": 1}]},\n{"t": "\\uD83D\\uDE00"}]', encoding="utf-8")
    with RejectLog(tmp_path / "rejects.jsonl") as rejects:
        got = [(r, Path(w).name) for r, w in read_records([tmp_path / "a.jsonl", tmp_path / "b.json"], rejects)]
    assert got == [({"text": "笑😀"}, "a.jsonl:2"), ({"t": "😀"}, "b.json:2")]
    assert rejects.counts == {"lone_surrogate": 2}
    assert [Path(r["where"]).name for r in rows(tmp_path / "rejects.jsonl")] == ["a.jsonl:1", "b.json:1"]


@pytest.mark.parametrize("name", ["big.json", "big.jsonl.gz", "big.csv", "big.txt"])
def test_memory_stays_flat_whatever_the_file_size(tmp_path, name):
    import tracemalloc

    line = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。" * 4  # 96 characters, 288 bytes
    n = 60_000  # ~17 MB of text
    path = tmp_path / name
    if name == "big.json":
        path.write_text("[\n" + ",\n".join(json.dumps({"text": line}, ensure_ascii=False) for _ in range(n)) + "\n]",
                        encoding="utf-8")
    elif name == "big.jsonl.gz":
        path.write_bytes(gzip.compress(("\n".join(json.dumps({"text": line}, ensure_ascii=False)
                                                  for _ in range(n)) + "\n").encode("utf-8"), 1))
    elif name == "big.csv":
        path.write_text("text\n" + "\n".join(line for _ in range(n)) + "\n", encoding="utf-8")
    else:
        path.write_text("\n\n".join(line for _ in range(n)) + "\n", encoding="utf-8")
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_records([path], RejectLog(), txt_docs="blank"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MB held while reading a {path.stat().st_size / 2**20:.0f} MB file"


def test_a_file_that_cannot_be_opened_stops_the_stage_naming_it(tmp_path, monkeypatch):
    from xiaolm.data.clean import clean_files

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "床前明月光，疑是地上霜。"}\n', encoding="utf-8")
    locked = folder / "b.jsonl"
    locked.write_text('{"text": "举头望明月，低头思故乡。"}\n', encoding="utf-8")
    real_open = open

    def no_permission(path, *args, **kwargs):  # as root, chmod 000 would not stop the reading
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(compression, "open", no_permission, raising=False)
    with RejectLog() as rejects, pytest.raises(XiaolmError, match="Permission denied") as e:
        list(read_records([folder], rejects))
    assert e.value.where == str(locked) and "unreadable_file" not in rejects.counts
    with pytest.raises(XiaolmError, match="b.jsonl"):
        clean_files([folder], tmp_path / "out", workers=1)
    assert not (tmp_path / "out" / "_SUCCESS").exists()

