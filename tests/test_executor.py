"""Shard executor: results in task order, finished tasks skipped, failures and SIGKILL leave no half task."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xiaolm.data.clean import clean_files
from xiaolm.data.dedup import dedup_files
from xiaolm.data.executor import DONE, StageRunner, run_tasks
from xiaolm.data.pack import pack_files
from xiaolm.errors import XiaolmError

ROOT = Path(__file__).resolve().parents[1]


def square(out: Path, i: int, log: str, delay: float = 0.0) -> dict:
    """A task: writes a file, notes that it ran, returns i²."""
    (out / "value.txt").write_text(str(i * i), encoding="utf-8")
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"{i}\n")
    time.sleep(delay)
    return {"i": i, "square": i * i}


def fail_on_three(out: Path, i: int, log: str) -> dict:
    if i == 3:
        raise ValueError("bad shard 3")
    return square(out, i, log)


def ran(log: Path) -> list[int]:
    return [int(x) for x in log.read_text(encoding="utf-8").split()] if log.exists() else []


def tasks(n: int, log: Path, *extra) -> list:
    return [(f"{i:03d}", (i, str(log), *extra)) for i in range(n)]


def test_results_come_in_task_order_and_finished_tasks_are_skipped(tmp_path):
    log = tmp_path / "ran.log"
    first = run_tasks(square, tasks(5, log), tmp_path / "stage", workers=1)
    assert first == [{"i": i, "square": i * i} for i in range(5)]
    assert all((tmp_path / "stage" / f"{i:03d}" / DONE).is_file() for i in range(5))
    assert run_tasks(square, tasks(6, log), tmp_path / "stage", workers=1)[-1] == {"i": 5, "square": 25}
    assert ran(log) == [0, 1, 2, 3, 4, 5]  # the rerun ran only the new task


def test_a_failed_task_leaves_nothing_and_reruns(tmp_path):
    log = tmp_path / "ran.log"
    with pytest.raises(ValueError, match="bad shard 3"):
        run_tasks(fail_on_three, tasks(5, log), tmp_path / "stage", workers=1)
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["000", "001", "002"]
    run_tasks(square, tasks(5, log), tmp_path / "stage", workers=1)
    assert ran(log) == [0, 1, 2, 3, 4]


def test_process_pool_gives_the_same_results(tmp_path):
    log = tmp_path / "ran.log"
    with StageRunner("local", workers=2) as runner:
        pooled = runner.run(square, tasks(6, log), tmp_path / "pool")
        again = runner.run(square, tasks(6, log, 0.0), tmp_path / "pool2")  # the pool is reused
    assert pooled == again == run_tasks(square, tasks(6, tmp_path / "x.log"), tmp_path / "one", workers=1)
    assert sorted(ran(log)) == sorted(list(range(6)) * 2)


def test_sigkill_mid_stage_then_rerun_completes_with_the_same_results(tmp_path):
    log = tmp_path / "ran.log"
    stage = tmp_path / "stage"
    script = ("import sys; from tests.test_executor import square, tasks; from xiaolm.data.executor import run_tasks; "
              f"run_tasks(square, tasks(10, {str(log)!r}, 0.1), {str(stage)!r}, workers=1)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT)
    while len(list(stage.glob(f"*/{DONE}"))) < 3 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = len(list(stage.glob(f"*/{DONE}")))
    assert 3 <= done < 10
    results = run_tasks(square, tasks(10, log), stage, workers=1)
    assert results == [{"i": i, "square": i * i} for i in range(10)]
    assert not list(stage.glob(".*.tmp-*"))  # the killed task's temporary directory is gone
    assert len(ran(log)) <= 11 and sorted(set(ran(log))) == list(range(10))  # at most the killed task twice
    assert json.loads((stage / "009" / "result.json").read_text(encoding="utf-8")) == {"i": 9, "square": 81}


def test_unknown_executor_is_a_clear_error(tmp_path):
    with pytest.raises(XiaolmError, match="unknown executor 'spark'"):
        run_tasks(square, [], tmp_path, executor="spark")


def test_ray_executor_without_ray_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(XiaolmError, match=r"pip install 'xiaolm\[ray\]'"):
        run_tasks(square, tasks(2, tmp_path / "log"), tmp_path / "stage", executor="ray")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_executor_runs_the_tasks(tmp_path, monkeypatch, tokenizer_dir):
    import ray

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    log = tmp_path / "ran.log"
    src = tmp_path / "docs.jsonl"
    lines = ["春眠不觉晓，处处闻啼鸟。", "春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。"]
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines), encoding="utf-8")
    src.with_name("more.jsonl").write_text(json.dumps({"text": "白日依山尽，黄河入海流。"}, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    try:
        results = run_tasks(square, tasks(4, log), tmp_path / "stage", executor="ray", workers=2)
        on_ray = dedup_files([src], tmp_path / "ray", executor="ray", workers=2)
        cleaned = clean_files([src, src.with_name("more.jsonl")], tmp_path / "ray-clean", executor="ray", workers=2)
        packed = pack_files([tmp_path / "ray-clean"], tokenizer_dir, tmp_path / "ray-pack", val_fraction=0,
                            executor="ray", workers=2)
    finally:
        ray.shutdown()
    assert results == [{"i": i, "square": i * i} for i in range(4)]
    assert (tmp_path / "stage" / "003" / "value.txt").read_text(encoding="utf-8") == "9"
    local = dedup_files([src], tmp_path / "local", workers=1)
    assert on_ray["records_out"] == local["records_out"] == 2 and on_ray["work"]["executor"] == "ray"
    part = "part-00000.jsonl"
    assert (tmp_path / "ray" / part).read_bytes() == (tmp_path / "local" / part).read_bytes()
    assert cleaned["records_out"] == 3 and cleaned["rejected"] == {"exact_duplicate": 1} and cleaned["shards"] == 2
    assert packed["train_docs"] == 3 and packed["shards"] == 2 and packed["executor"] == "ray"
    local_pack = pack_files([tmp_path / "ray-clean"], tokenizer_dir, tmp_path / "local-pack", val_fraction=0, workers=1)
    assert (tmp_path / "ray-pack" / "train.bin").read_bytes() == (tmp_path / "local-pack" / "train.bin").read_bytes()
    assert local_pack["train_tokens"] == packed["train_tokens"]
