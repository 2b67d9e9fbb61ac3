"""Continuous batching: one thread owns the model; between decode steps it admits waiting jobs and drops
finished or cancelled ones, so requests share decode steps instead of running one after another.

Other threads (the server's event loop) talk to it only through `submit` and `cancel`; results come back
through each job's `deliver` callback, called on the scheduler thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xiaolm.infer.generate import Engine, Event, GenerationConfig

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One generated sequence: its prompt ids, settings, and where its events (or an exception) go."""

    prompt: list[int]
    cfg: GenerationConfig
    deliver: Callable[[Event | Exception], None]
    cancelled: bool = False
    id: int | None = field(default=None, repr=False)  # its number in an engine process (infer/engine_process.py)


class Scheduler:
    """Runs an Engine on its own thread: jobs wait in a bounded queue, join the decode batch between steps
    (up to `max_prefill` per step, prefilled together) and leave it when finished or cancelled."""

    def __init__(self, engine: Engine, max_queue: int = 64, max_prefill: int = 8,
                 after_round: Callable[[Scheduler], None] | None = None):
        self.engine, self.max_queue, self.max_prefill = engine, max_queue, max_prefill
        self.after_round = after_round  # called on the scheduler thread after each round (admit, step, drops)
        self.waiting: deque[Job] = deque()
        self.running: dict[int, Job] = {}  # slot → job; touched by the scheduler thread only
        self.joined_mid_decode = 0  # jobs admitted while other jobs were part-way through decoding
        self.dropped = 0  # running jobs cancelled (client gone) and taken out of the batch
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="xiaolm-scheduler", daemon=True)

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread.start()

    def close(self) -> None:
        """Stop the thread after its current step; jobs still waiting or running get no more events."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def submit(self, jobs: list[Job]) -> bool:
        """Queue jobs together, or refuse them all (False) when the queue would exceed max_queue."""
        with self._cond:
            if self._closed or len(self.waiting) + len(jobs) > self.max_queue:
                return False
            self.waiting.extend(jobs)
            self._cond.notify()
        return True

    @property
    def batch_sizes(self) -> deque[int]:
        """Rows in each recent decode forward."""
        return self.engine.batch_sizes

    def stats(self) -> dict[str, Any]:
        """Counters: sequences running and waiting, free slots, decode steps, jobs dropped and joined mid-decode,
        prompt tokens prefilled and those found kept in a slot instead."""
        e = self.engine
        return {"running": len(self.running), "waiting": len(self.waiting), "free": e.free, "decode_steps": e.steps,
                "dropped": self.dropped, "joined_mid_decode": self.joined_mid_decode, "prompt_tokens_prefilled":
                e.prefilled, "prompt_tokens_reused": e.reused}

    def cancel(self, job: Job) -> None:
        """Drop a job: out of the queue now, out of the batch before the next step (its slot is freed)."""
        with self._cond:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self.waiting and not self.running:
                    self._cond.wait()
                if self._closed:
                    return
                for slot, job in list(self.running.items()):
                    if job.cancelled:
                        self.engine.release(slot)
                        del self.running[slot]
                        self.dropped += 1
                admit = []
                while self.waiting and len(admit) < min(self.engine.free, self.max_prefill):
                    admit.append(self.waiting.popleft())
            try:
                self._admit(admit)
                self._step()
            except Exception as e:  # a bug must not leave clients hanging: fail the running jobs, keep serving
                log.exception("scheduler step failed")
                for slot, job in list(self.running.items()):
                    self.engine.release(slot)
                    job.deliver(e)
                self.running.clear()
            if self.after_round is not None:
                self.after_round(self)

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the admitted jobs in one forward (one at a time if that fails, so one bad prompt fails alone)."""
        if not jobs:
            return
        if any(not job.cancelled for job in self.running.values()):
            self.joined_mid_decode += len(jobs)
        try:
            slots = self.engine.add([j.prompt for j in jobs], [j.cfg for j in jobs])
            self.running.update(zip(slots, jobs, strict=True))
        except Exception:
            for job in jobs:
                try:
                    self.running[self.engine.add([job.prompt], [job.cfg])[0]] = job
                except Exception as e:
                    job.deliver(e)

    def _step(self) -> None:
        for event in self.engine.step():
            job = self.running[event.slot]
            if event.finish:
                del self.running[event.slot]
            if not job.cancelled:
                job.deliver(event)
