"""Deduplication: MinHash accuracy, planted duplicates, clusters, exact hashes, memory settings, parallel and
interrupted runs, CLI, rejects."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xiaolm.cli import main
from xiaolm.data import buckets, dedup
from xiaolm.data.buckets import ROW
from xiaolm.data.dedup import REMOVED, DedupConfig, dedup_files, sign_shard
from xiaolm.data.minhash import (
    candidate_probability,
    choose_bands,
    connected_first,
    estimate_jaccard,
    minhash,
    permutations,
)
from xiaolm.errors import XiaolmError

SRC = Path(__file__).resolve().parents[1] / "src"
ALPHABET = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def random_text(rng: random.Random, n: int = 100) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def substitute(text: str, rng: random.Random, k: int) -> str:
    out = list(text)
    for pos in rng.sample(range(len(out)), k):
        out[pos] = rng.choice(ALPHABET)
    return "".join(out)


def jaccard(a: str, b: str, n: int = 5) -> float:
    x, y = ({t[i:i + n] for i in range(len(t) - n + 1)} for t in (a, b))
    return len(x & y) / len(x | y)


def write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def outputs(out: Path) -> dict[str, str]:
    """Every output file's text, the report without its timings."""
    files = {p.name: p.read_text(encoding="utf-8") for p in sorted(out.iterdir()) if p.is_file()}
    report = json.loads(files.pop("report.json"))
    report.pop("seconds")
    files["report.json"] = json.dumps(report, sort_keys=True)
    return files


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, dict]:
    """Three files: 90 distinct documents, 12 near copies (Jaccard ≈ 0.9), 10 copies at ≈ 0.5, 3 verbatim."""
    rng = random.Random(0)
    base = [random_text(rng) for _ in range(90)]
    records = [{"id": f"d{i}", "text": t} for i, t in enumerate(base)]
    near = {f"n{i}": f"d{i}" for i in range(12)}
    records += [{"id": f"n{i}", "text": substitute(base[i], rng, 1)} for i in range(12)]
    records += [{"id": f"f{i}", "text": substitute(base[20 + i], rng, 8)} for i in range(10)]
    records += [{"id": f"e{i}", "text": "  " + base[40 + i][:50] + "\n" + base[40 + i][50:]} for i in range(3)]
    exact = {f"e{i}": f"d{40 + i}" for i in range(3)}
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        write(folder / f"part{k}.jsonl", records[k::3])
    return folder, {"near": near, "exact": exact}


def test_minhash_estimates_the_true_jaccard():
    rng = random.Random(1)
    a, b = permutations(128, seed=1)
    base = [random_text(rng) for _ in range(300)]
    for k in (1, 3, 8):
        copies = [substitute(t, rng, k) for t in base]
        est = estimate_jaccard(minhash(base, 5, a, b), minhash(copies, 5, a, b))
        true = np.array([jaccard(x, y) for x, y in zip(base, copies, strict=True)])
        sd = np.sqrt(true * (1 - true) / 128)  # a binomial estimate's standard deviation
        assert abs((est - true).mean()) < 0.01
        assert np.abs(est - true).max() < 5 * sd.max() and (est - true).std() < 1.3 * sd.mean()
    assert estimate_jaccard(minhash(["同一段文字"], 5, a, b), minhash(["同一段文字"], 5, a, b))[0] == 1.0
    assert minhash(["短", ""], 5, a, b).shape == (2, 128)  # shorter than n: one padded shingle


def test_bands_and_rows_are_chosen_to_catch_pairs_at_the_threshold():
    bands, rows = choose_bands(0.8, 128)
    assert (bands, rows) == (21, 6) and bands * rows <= 128
    assert candidate_probability(0.8, bands, rows) >= 0.99
    assert candidate_probability(0.3, bands, rows) < 0.02


def test_planted_duplicates_are_removed_and_distinct_documents_kept(corpus, tmp_path, caplog):
    folder, truth = corpus
    with caplog.at_level(logging.INFO, logger="xiaolm.data.dedup"):
        report = dedup_files([folder], tmp_path / "out", workers=1)
    out = tmp_path / "out"
    removed = {r["id"]: r for r in rows(out / REMOVED)}
    assert {k: r["kept_id"] for k, r in removed.items()} == {**truth["near"], **truth["exact"]}
    assert all(r["exact"] for k, r in removed.items() if k.startswith("e"))
    assert all(0.8 <= r["jaccard"] < 1 and not r["exact"] for k, r in removed.items() if k.startswith("n"))
    assert removed["n0"]["where"].endswith("part0.jsonl:31") and removed["n0"]["record"]["id"] == "n0"
    kept = [r for k in range(3) for r in rows(out / f"part-{k:05d}.jsonl")]
    assert len(kept) == 90 + 10 and {r["id"] for r in kept}.isdisjoint(removed)
    assert kept[0] == {"id": "d0", "text": kept[0]["text"], "source": "part0.jsonl"}
    assert report["records_in"] == 115 and report["records_out"] == 100
    assert report["removed"] == {"exact": 3, "near": 12} and report["rejected"] == {}
    assert report["clusters"]["count"] == 15 and report["clusters"]["sizes"] == {"2": 15}
    example = report["clusters"]["examples"][0]
    assert example["size"] == 2 and example["kept"]["id"] == "d0" and example["removed"][0]["id"] == "n0"
    assert example["kept"]["where"].endswith("part0.jsonl:1") and len(example["kept"]["text"]) > 50
    assert any(e["kind"] == "borderline" for e in report["clusters"]["examples"])
    assert report["lsh"]["bands"] == 21 and (out / "_SUCCESS").is_file() and not (out / "_work").exists()
    assert "data/dedup: 115 in, 100 out, 15 removed (3 exact, 12 near) in 15 clusters, 0 rejected" in caplog.text


def test_clusters_are_transitive_and_keep_the_first_document():
    keys, roots = connected_first(np.array([9, 5, 3, 20], np.uint64), np.array([5, 3, 7, 21], np.uint64))
    assert dict(zip(keys.tolist(), roots.tolist(), strict=True)) == {3: 3, 5: 3, 7: 3, 9: 3, 20: 20, 21: 20}
    keys, roots = connected_first(np.arange(1, 200, dtype=np.uint64), np.arange(0, 199, dtype=np.uint64))
    assert set(roots.tolist()) == {0}  # a long chain collapses to its first element


def test_a_chain_of_near_duplicates_is_one_cluster(tmp_path):
    rng = random.Random(2)
    a = random_text(rng, 200)
    b = a[:100] + substitute(a[100:], rng, 3)
    c = substitute(b[:100], rng, 3) + b[100:]
    assert jaccard(a, b) >= 0.8 and jaccard(b, c) >= 0.8 and jaccard(a, c) < 0.8
    src = write(tmp_path / "chain.jsonl", [{"id": "c", "text": c}, {"id": "a", "text": a}, {"id": "b", "text": b}])
    report = dedup_files([src], tmp_path / "out", workers=1)
    assert {r["id"]: r["kept_id"] for r in rows(tmp_path / "out" / REMOVED)} == {"a": "c", "b": "c"}
    assert report["clusters"]["sizes"] == {"3": 1}


def test_clusters_are_handed_on_as_spanning_forests_of_the_verified_pairs(tmp_path):
    rng = random.Random(3)
    base = random_text(rng, 300)
    copies = [{"id": f"c{i}", "text": substitute(base, rng, 2)} for i in range(30)]
    src = write(tmp_path / "copies.jsonl", [{"id": "base", "text": base}, *copies])
    report = dedup_files([src], tmp_path / "out", DedupConfig(partitions=3), workers=1)
    assert report["clusters"]["sizes"] == {"31": 1} and report["records_out"] == 1
    work = report["work"]
    # 31 mutual near copies: hundreds of verified pairs, but at most 30 edges per partition reach the cluster stage
    assert work["verified_pairs"] > 100 and work["cluster_edges"] <= 3 * 30


def test_exact_duplicates_ignore_whitespace_and_chats_compare_their_contents(tmp_path):
    src = write(tmp_path / "mixed.jsonl", [
        {"text": "今天 天气很好，我们去公园。"},
        {"text": "今天天气很好，\n我们去公园。"},
        {"messages": [{"role": "user", "content": "今天天气很好，"}, {"role": "assistant", "content": "我们去公园。"}]},
        {"prompt": "今天天气很好，", "response": "我们去公园。"},
        {"text": "完全不同的一句话在这里。"},
    ])
    report = dedup_files([src], tmp_path / "out", workers=1)
    assert report["removed"] == {"exact": 3, "near": 0} and report["records_out"] == 2
    removed = rows(tmp_path / "out" / REMOVED)
    kept_id = rows(tmp_path / "out" / "part-00000.jsonl")[0]["id"]
    assert len(kept_id) == 16 and all(r["kept_id"] == kept_id and r["exact"] for r in removed)
    assert removed[1]["record"]["messages"][0]["role"] == "user"


def test_parquet_input_keeps_row_provenance_in_removed_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["今天天气很好，我们去公园散步。", "完全不同的一句话在这里出现。", "今天天气很好，我们去公园散步。"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet")
    report = dedup_files([tmp_path / "a.parquet"], tmp_path / "out", workers=1)
    assert report["records_out"] == 2
    (removed,) = rows(tmp_path / "out" / REMOVED)
    assert removed["where"] == f"{tmp_path / 'a.parquet'}:row 3" and removed["exact"]


def test_memory_settings_bound_the_batch_and_split_buckets_into_partitions(tmp_path, corpus, monkeypatch):
    folder, _ = corpus
    cfg = DedupConfig(batch_chars=1000, partitions=3)
    shard = tmp_path / "sign"
    shard.mkdir()
    result = sign_shard(shard, 0, str(folder / "part0.jsonl"), cfg, 3)
    assert result["docs"] == 39 and result["max_batch_chars"] <= 1000 and result["batches"] >= 4
    parts = [np.fromfile(shard / f"buckets-{p:05d}.bin", dtype=ROW) for p in range(3)]
    assert sum(map(len, parts)) == 39 * (21 + 1) and all(len(p) for p in parts)
    for p, part in enumerate(parts):  # each row is in the partition its bucket hashes to
        assert ((part["bucket"] >> np.uint64(32)) % np.uint64(3) == p).all()
    report = dedup_files([folder], tmp_path / "out", cfg, workers=1)
    assert report["work"]["partitions"] == 3 and report["work"]["max_batch_chars"] <= 1000
    assert report["removed"] == {"exact": 3, "near": 12}  # same result in small pieces
    monkeypatch.setattr(buckets, "SIMILARITY_CHUNK", 2)  # signatures of two pairs at a time
    dedup_files([folder], tmp_path / "chunked", cfg, workers=1)
    assert outputs(tmp_path / "chunked") == outputs(tmp_path / "out")


def test_auto_partitions_follow_partition_mb(corpus):
    folder, _ = corpus
    files = sorted(folder.iterdir())
    assert dedup._auto_partitions(files, DedupConfig()) == 1
    size = sum(f.stat().st_size for f in files)
    expected = -(-size // 64 * 22 * 16 // (1 << 20))  # ceil(rows × 16 bytes / 1 MB)
    assert abs(dedup._auto_partitions(files, DedupConfig(partition_mb=1)) - expected) <= 1


def test_shard_parallel_result_equals_single_process(corpus, tmp_path):
    folder, _ = corpus
    cfg = DedupConfig(partitions=4)
    dedup_files([folder], tmp_path / "one", cfg, workers=1)
    dedup_files([folder], tmp_path / "two", cfg, workers=2)
    assert outputs(tmp_path / "one") == outputs(tmp_path / "two")


def test_rerun_skips_finished_shards_and_finished_runs(corpus, tmp_path, monkeypatch, caplog):
    folder, _ = corpus
    out = tmp_path / "out"
    real = dedup.filter_shard

    def broken(task_out, shard, *args):
        if shard == 2:
            raise RuntimeError("disk full")
        return real(task_out, shard, *args)

    monkeypatch.setattr(dedup, "filter_shard", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        dedup_files([folder], out, workers=1)
    signed = {p: p.stat().st_mtime_ns for p in (out / "_work" / "sign").glob("*/_DONE")}
    assert len(signed) == 3 and not (out / "_SUCCESS").exists()
    assert sorted(p.name for p in (out / "_work" / "filter").iterdir()) == ["00000", "00001"]
    monkeypatch.setattr(dedup, "filter_shard", real)
    with caplog.at_level(logging.INFO, logger="xiaolm.data.executor"):
        report = dedup_files([folder], out, workers=1)
    assert "data/dedup sign: 3 of 3 shards already finished" in caplog.text
    assert "data/dedup filter: 2 of 3 shards already finished" in caplog.text
    assert not (out / "_work").exists()  # removed after success
    assert report["records_out"] == 100
    stamp = (out / "part-00000.jsonl").stat().st_mtime_ns
    assert dedup_files([folder], out, workers=1) == report
    assert (out / "part-00000.jsonl").stat().st_mtime_ns == stamp
    assert dedup_files([folder], out, DedupConfig(threshold=0.99), workers=1)["removed"] == {"exact": 3, "near": 0}


def test_sigkill_mid_stage_then_rerun_equals_an_uninterrupted_run(tmp_path, caplog):
    rng = random.Random(3)
    folder = tmp_path / "in"
    folder.mkdir()
    base = [random_text(rng, 80) for _ in range(1500)]
    for k in range(8):
        docs = base[k::8]
        copies = [{"text": substitute(t, rng, 1)} for t in docs[:20]]
        write(folder / f"f{k}.jsonl", [{"text": t} for t in docs] + copies)
    dedup_files([folder], tmp_path / "whole", DedupConfig(batch_chars=5000), workers=1)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(SRC), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "xiaolm", "data", "dedup", str(folder), "batch_chars=5000",
                             "--out", str(out), "--workers", "1"], env=env, stderr=subprocess.DEVNULL)
    while not list((out / "_work" / "sign").glob("*/_DONE")) and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    finished = len(list((out / "_work" / "sign").glob("*/_DONE")))
    assert finished >= 1 and not (out / "_SUCCESS").exists()  # killed after some shards, before the end
    with caplog.at_level(logging.INFO, logger="xiaolm.data.executor"):
        report = dedup_files([folder], out, DedupConfig(batch_chars=5000), workers=1)
    assert f"data/dedup sign: {finished} of 8 shards already finished" in caplog.text
    assert report["removed"] == {"exact": 0, "near": 160}
    assert outputs(out) == outputs(tmp_path / "whole")


def test_cli_data_dedup(corpus, tmp_path, capsys):
    folder, _ = corpus
    with pytest.raises(SystemExit) as e:
        main(["data", "dedup", "--help"])
    assert e.value.code == 0 and "example" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["data", "dedup", str(folder), "--out", str(tmp_path / "out"), "--threshold", "0.95", "--workers", "1"])
    assert e.value.code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["lsh"]["threshold"] == 0.95 and report["removed"]["exact"] == 3
    assert "threshold: 0.95" in (tmp_path / "out" / "config.yaml").read_text(encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["data", "dedup", str(folder), "bands=3", "--out", str(tmp_path / "o2")])
    assert e.value.code == 2 and "bands=3 rows=0" in capsys.readouterr().err


def test_bad_records_are_counted_and_written_to_rejects(tmp_path):
    src = write(tmp_path / "bad.jsonl", [
        {"text": "第一条正常的中文记录。"},
        "{not json",
        "[1, 2]",
        {"text": 5},
        {"title": "没有正文"},
        {"messages": [{"role": "robot", "content": "坏角色"}]},
        {"text": "第一条正常的中文记录。"},
        '{"text": "孤立的代理项\\ud800不是文字。"}',
    ])
    report = dedup_files([src], tmp_path / "out", workers=1)
    assert report["rejected"] == {"bad_json": 1, "not_object": 1, "missing_field": 2, "bad_chat": 1,
                                  "lone_surrogate": 1}
    assert report["records_in"] == 8 and report["records_out"] == 1 and report["removed"]["exact"] == 1
    rejected = rows(tmp_path / "out" / "rejects.jsonl")
    assert [(r["reason"], r["where"].rsplit("/", 1)[1]) for r in rejected] == [
        ("bad_json", "bad.jsonl:2"), ("not_object", "bad.jsonl:3"), ("missing_field", "bad.jsonl:4"),
        ("missing_field", "bad.jsonl:5"), ("bad_chat", "bad.jsonl:6"), ("lone_surrogate", "bad.jsonl:8")]
    assert rejected[2]["detail"] == "'text' is a int, not a string"
    assert report["reject_examples"]["bad_json"][0]["record"] == "{not json"


def test_bad_settings_and_missing_inputs_fail_before_work(tmp_path):
    with pytest.raises(XiaolmError, match="threshold=1.5"):
        dedup_files([tmp_path], tmp_path / "out", DedupConfig(threshold=1.5))
    with pytest.raises(XiaolmError, match="input not found"):
        dedup_files([tmp_path / "missing.jsonl"], tmp_path / "out")
    with pytest.raises(XiaolmError, match="no input records"):
        dedup_files([tmp_path], tmp_path / "out")


def test_many_partitions_stay_within_a_low_open_files_limit(corpus, tmp_path):
    folder, _ = corpus
    dedup_files([folder], tmp_path / "free", DedupConfig(partitions=300), workers=1)
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
              "from xiaolm.data.dedup import DedupConfig, dedup_files\n"
              "dedup_files([sys.argv[1]], sys.argv[2], DedupConfig(partitions=300), workers=1)\n")
    env = {**os.environ, "PYTHONPATH": str(SRC), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "limited")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]  # 300 partitions, at most 64 open files
    assert outputs(tmp_path / "limited") == outputs(tmp_path / "free")


def test_bucket_rows_gathered_before_writing_make_the_same_partition_files(corpus, tmp_path, monkeypatch):
    folder, _ = corpus
    cfg = DedupConfig(batch_chars=1000)

    def partition_files(name: str) -> list[bytes]:
        (tmp_path / name).mkdir()
        sign_shard(tmp_path / name, 0, str(folder / "part0.jsonl"), cfg, 5)
        return [(tmp_path / name / f"buckets-{p:05d}.bin").read_bytes() for p in range(5)]

    gathered = partition_files("gathered")
    monkeypatch.setattr(buckets, "BUCKET_BUFFER", 1)  # written batch by batch
    assert partition_files("each_batch") == gathered
