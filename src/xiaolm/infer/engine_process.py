"""The scheduler in a process of its own, so that the decode loop and the HTTP server do not take turns on one GIL.

In one process, the model's step (Python around many small tensor operations) and the event loop's per-token work
(SSE chunks, sockets) hold the GIL by turns, and together they never used more than one core, whatever the machine
had. Here the child process runs the Scheduler (infer/scheduler.py) on the model it was handed (CPU tensors travel
in shared memory, CUDA tensors by IPC: no copy of the weights) and, after each scheduling round, sends that round's
events and its counters in one message. The parent keeps what the event loop needs: admission (the 429 decision),
the jobs and their `deliver` callbacks, and the latest counters.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

import torch
import torch.multiprocessing as mp

from xiaolm.errors import XiaolmError
from xiaolm.infer.scheduler import Job, Scheduler

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from torch import nn
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
START_TIMEOUT_S = 300  # the child imports torch and receives the model before it says it is ready


class EngineProcess:
    """Scheduler's interface (start, submit, cancel, stats, close) over a child process running the scheduler.

    `submit` admits up to `slots + max_queue` unfinished sequences, as the in-process scheduler admits `slots`
    running plus `max_queue` waiting ones."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, slots: int, max_queue: int,
                 compile: bool = False):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, name="xiaolm-engine", daemon=True,
                                 args=(model, tokenizer, slots, compile, torch.get_num_threads(), child))
        self.capacity = slots + max_queue
        self.jobs: dict[int, Job] = {}  # unfinished jobs by id; guarded by _lock with the pipe's sending end
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # rows in each recent decode forward
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {}  # the child's Scheduler.stats(), from its ready message on
        self._reader = threading.Thread(target=self._read, name="xiaolm-engine-reader", daemon=True)
        self.alive = self._closing = False

    def start(self) -> None:
        """Start the child and wait until it has the model and runs its scheduler."""
        self._proc.start()
        if not self._conn.poll(START_TIMEOUT_S):
            self._proc.kill()
            raise XiaolmError(f"the engine process did not start within {START_TIMEOUT_S} s")
        try:
            kind, message = self._conn.recv()
        except EOFError:
            kind, message = "failed", f"it exited with code {self._proc.join(5) or self._proc.exitcode}"
        if kind != "ready":
            raise XiaolmError(f"the engine process failed to start: {message}")
        self._stats, self.alive = message, True
        self._reader.start()

    def submit(self, jobs: list[Job]) -> bool:
        """Queue jobs together, or refuse them all (False) when the engine has no room for them."""
        with self._lock:
            if not self.alive:
                raise XiaolmError("the engine process has stopped", hint="restart the server; its log says why")
            if len(self.jobs) + len(jobs) > self.capacity:
                return False
            ids = [next(self._ids) for _ in jobs]
            self.jobs.update(zip(ids, jobs, strict=True))
            for i, job in zip(ids, jobs, strict=True):
                job.id = i
            self._send("submit", [(i, job.prompt, job.cfg) for i, job in zip(ids, jobs, strict=True)])
            if not self.alive:
                raise XiaolmError("the engine process has stopped", hint="restart the server; its log says why")
        return True

    def cancel(self, job: Job) -> None:
        """Drop a job: it gets no more events, and the child frees its slot before its next step."""
        with self._lock:
            job.cancelled = True
            if self.jobs.pop(job.id, None) is not None:
                self._send("cancel", job.id)

    def stats(self) -> dict[str, Any]:
        """The child's counters after its latest round (running, waiting, free slots, decode steps, ...)."""
        return dict(self._stats)

    def close(self) -> None:
        """Stop the child after its current round; jobs still waiting or running get no more events."""
        with self._lock:
            self._send("close", None)
            self.alive, self._closing = False, True
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._conn.close()

    def _send(self, kind: str, payload: Any) -> None:
        """One command to the child (with _lock held); a child found gone is marked so."""
        if self.alive:
            try:
                self._conn.send((kind, payload))
            except OSError:  # a broken pipe: the reader thread fails the jobs
                self.alive = False

    def _read(self) -> None:
        """Hand each round's events to their jobs; when the child is gone, fail the jobs it still had."""
        while True:
            try:
                events, stats = self._conn.recv()
            except (EOFError, OSError):
                break
            self.batch_sizes.extend(stats.pop("batch_sizes"))
            self._stats = stats
            for i, event in events:
                with self._lock:
                    job = self.jobs.get(i)
                    if job is not None and (isinstance(event, str) or event.finish):
                        del self.jobs[i]
                if job is not None:
                    job.deliver(RuntimeError(event) if isinstance(event, str) else event)
        with self._lock:
            stopped_early, self.alive = not self._closing, False
            jobs, self.jobs = list(self.jobs.values()), {}
        if stopped_early:
            log.error("the engine process stopped unasked; %d running or waiting requests fail", len(jobs))
        for job in jobs:
            job.deliver(RuntimeError("the engine process stopped"))


def _child_main(model: nn.Module, tokenizer: PreTrainedTokenizerBase, slots: int, compile: bool, threads: int,
                conn: Connection) -> None:
    """The child: the scheduler on its thread, this thread reading the parent's commands."""
    from xiaolm.infer.generate import Engine

    torch.set_num_threads(threads)
    outbox: list[tuple[int, Any]] = []  # this round's (job id, event or error text); scheduler thread only
    jobs: dict[int, Job] = {}
    steps_sent, lock = 0, threading.Lock()

    def deliver_to(i: int):
        def deliver(event: Any) -> None:
            if isinstance(event, Exception) or event.finish:
                jobs.pop(i, None)
            outbox.append((i, f"{type(event).__name__}: {event}" if isinstance(event, Exception) else event))
        return deliver

    def send(events: list, scheduler: Scheduler) -> None:
        nonlocal steps_sent
        with lock:  # the scheduler thread after each round, this one after a cancel
            stats = scheduler.stats()
            stats["batch_sizes"] = [scheduler.engine.batch_sizes[-1]] if stats["decode_steps"] > steps_sent else []
            steps_sent = stats["decode_steps"]
            conn.send((events, stats))

    def after_round(scheduler: Scheduler) -> None:
        events = outbox[:]
        outbox.clear()
        send(events, scheduler)

    try:
        engine = Engine(model, slots, tokenizer=tokenizer, compile=compile)
        scheduler = Scheduler(engine, max_queue=1 << 62, after_round=after_round)  # the parent admits
        scheduler.start()
    except Exception as e:  # say why, then exit: the parent raises it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    with lock:
        conn.send(("ready", scheduler.stats()))
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        if kind == "close":
            break
        if kind == "submit":
            batch = [Job(prompt, cfg, deliver_to(i)) for i, prompt, cfg in payload]
            jobs.update((i, job) for (i, _, _), job in zip(payload, batch, strict=True))
            scheduler.submit(batch)
        elif kind == "cancel" and (job := jobs.pop(payload, None)) is not None:
            scheduler.cancel(job)
            send([], scheduler)  # a job cancelled while waiting ends no round: say so here
    scheduler.close()
