"""Runs a stage's tasks (one per shard): a local process pool by default, Ray across machines; finished ones skip.

Contract: a task is `fn(out_dir, *args) -> dict`, a picklable module-level function that writes its files into
`out_dir` (a fresh temporary directory). When it returns, the executor saves the dict as `result.json`, writes the
completion marker `_DONE` and renames the directory to `STAGE_DIR/NAME`, so a task's directory exists only when
the task finished. A rerun (after a crash or a SIGKILL) skips every task whose directory exists and reads its
saved result; half-written temporary directories are removed. The local pool starts its workers with `spawn`, so
a script that runs a stage must guard its entry point with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

WORK = "_work"  # a stage's task directories, under its output dir
DONE = "_DONE"
RESULT = "result.json"
EXECUTORS = ("local", "ray")
Task = tuple[str, tuple]  # (name, args): the name is the task's directory under the stage dir


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parallel_workers(workers: int) -> int:
    """Processes to use: `workers`, or every core when 0."""
    return workers if workers > 0 else default_workers()


def in_worker() -> bool:
    """Whether this code runs in a worker process of the pool (there, per-record progress bars stay off)."""
    import multiprocessing

    return multiprocessing.parent_process() is not None


def work_dir(out_dir: Path, config_text: str, fingerprint: list[dict], outputs: Sequence[str] = ()) -> Path:
    """`out_dir/_work`, the stage's task directories: kept when an interrupted run had the same config and inputs
    (its finished tasks are reused), else emptied along with the stage's old outputs (globs under out_dir)."""
    work = out_dir / WORK
    stamp = json.dumps({"config": config_text, "inputs": fingerprint}, sort_keys=True)
    (out_dir / "_SUCCESS").unlink(missing_ok=True)
    saved = work / "stamp.json"
    if not saved.is_file() or saved.read_text(encoding="utf-8") != stamp:
        shutil.rmtree(work, ignore_errors=True)  # other inputs or settings: nothing of an older run is reusable
        for pattern in outputs:
            for old in out_dir.glob(pattern):
                old.unlink()
        atomic_write_text(saved, stamp)
    return work


def is_finished(stage_dir: Path, name: str) -> bool:
    """Whether task `name` of this stage completed (its marker exists)."""
    return (stage_dir / name / DONE).is_file()


def run_task(fn: Callable[..., dict], stage_dir: Path, name: str, args: tuple) -> dict:
    """Run one task into a temporary directory, then mark it done and move it into place."""
    final = stage_dir / name
    tmp = stage_dir / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        result = fn(tmp, *args)
        atomic_write_json(tmp / RESULT, result)
        (tmp / DONE).write_text("", encoding="utf-8")
        if final.exists():  # an unfinished leftover (no marker) of an older run
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


class StageRunner:
    """Runs stages' tasks; the local process pool is started once, at first need, and kept for later stages."""

    def __init__(self, executor: str = "local", workers: int = 0):
        if executor not in EXECUTORS:
            raise XiaolmError(f"unknown executor '{executor}'", hint=f"use one of: {', '.join(EXECUTORS)}")
        self.executor, self.workers = executor, workers or default_workers()
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> StageRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def run(self, fn: Callable[..., dict], tasks: Sequence[Task], stage_dir: str | Path, desc: str = "",
            workers: int = 0) -> list[dict]:
        """Run `fn(out_dir, *args)` for every unfinished task; return all tasks' results in task order."""
        stage_dir = Path(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        for stale in stage_dir.glob(".*.tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        todo = [(name, args) for name, args in tasks if not is_finished(stage_dir, name)]
        desc = desc or stage_dir.name
        if len(todo) < len(tasks):
            log.info("%s: %d of %d shards already finished; skipping them", desc, len(tasks) - len(todo),
                     len(tasks))
        workers = min(workers or self.workers, self.workers)
        if not todo:
            pass  # everything was done by an earlier run
        elif self.executor == "ray":
            _run_ray(fn, stage_dir, todo, self.workers)
        elif workers == 1 or len(todo) == 1:
            for name, args in _progress(todo, desc, len(todo)):
                run_task(fn, stage_dir, name, args)
        else:
            if self._pool is None:
                # spawn: workers start clean (no inherited threads or locks); the same path works on macOS
                self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"))
            futures = [self._pool.submit(run_task, fn, stage_dir, name, args) for name, args in todo]
            try:
                for future in _progress(as_completed(futures), desc, len(todo)):
                    future.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return [json.loads((stage_dir / name / RESULT).read_text(encoding="utf-8")) for name, _ in tasks]


def run_tasks(fn: Callable[..., dict], tasks: Sequence[Task], stage_dir: str | Path, executor: str = "local",
              workers: int = 0, desc: str = "") -> list[dict]:
    """Run one stage's unfinished tasks (see StageRunner.run)."""
    with StageRunner(executor, workers) as runner:
        return runner.run(fn, tasks, stage_dir, desc)


def _progress(items: Iterable, desc: str, total: int) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit="shard", disable=None)


def _run_ray(fn: Callable[..., dict], stage_dir: Path, todo: Sequence[Task], workers: int) -> None:
    """One Ray task per shard; the stage dir must be on storage every node sees (NFS, a shared mount)."""
    try:
        import ray
    except ImportError:
        raise XiaolmError("the Ray executor needs the 'ray' package", where="--executor ray",
                          hint="pip install 'xiaolm[ray]', or use --executor local") from None
    if not ray.is_initialized():
        # joins the cluster named by RAY_ADDRESS if set, else starts a local one with `workers` CPUs
        ray.init(num_cpus=None if os.environ.get("RAY_ADDRESS") else workers, log_to_driver=False)
    remote = ray.remote(run_task)
    ray.get([remote.remote(fn, stage_dir, name, args) for name, args in todo])

