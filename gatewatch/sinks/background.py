"""The writer thread of a watch: the one thread that runs every write of the sinks, in the order it was handed over.

The training thread hands over *jobs* (a flush's host copy, to turn into rows and write; evaluation rows; the
close) and goes on. One daemon thread runs them in order. At most one flush is in flight: handing over the next
flush while one is still being written waits, as does handing over any job while ``MAX_QUEUED`` wait; each wait is
counted (:meth:`BackgroundWriter.stats`, recorded in run.json as ``writes``). A job that raises never reaches
training: its message waits in :meth:`BackgroundWriter.news` for the training thread to warn at its next call, and
the next jobs run as usual. :meth:`BackgroundWriter.close` waits at most its timeout and names the jobs not done.

Forking (DataLoader workers): ``os.register_at_fork`` makes a fork wait, at most ``FORK_WAIT_S``, for the job being
written to end, so that no lock the writer takes (Parquet, TensorBoard, a tracker's client) is held across the
fork; a forked child never writes (its copy of the writer is inert). At interpreter exit the jobs still queued are
written (at most ``EXIT_WAIT_S``). With ``threaded=False`` every job runs at once on the calling thread and its
exceptions propagate (for debugging).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_QUEUED = 64  # jobs waiting (evaluation rows between flushes, say); handing over one more waits
FORK_WAIT_S = 5.0  # a fork waits this long for the job being written to end, then goes ahead
EXIT_WAIT_S = 30.0  # at interpreter exit, the jobs still queued get this long to be written

_LIVE: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


@dataclass
class Job:
    what: str  # what it writes, in words ("the flush of steps 10..20"), named when it could not be written
    run: Callable[[], None]
    flush: bool = False


class BackgroundWriter:
    """Runs jobs in order on one thread of its own (see the module docstring)."""

    def __init__(self, *, threaded: bool = True, name: str = "gatewatch-writer") -> None:
        self.threaded, self.name = threaded, name
        self._cond = threading.Condition()
        self._busy = threading.Lock()  # held while a job runs: a fork waits for it
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._inert = False  # a forked child's copy: writes nothing
        self._news: list[str] = []
        self.flushes = self.waits = 0
        self.waited_s = self.longest_wait_s = 0.0
        self.busy_s = self.busy_cpu_s = 0.0  # time spent running jobs: wall clock, and this thread's CPU time
        _LIVE.add(self)

    # ------------------------------------------------------------------ the training thread
    def submit(self, what: str, run: Callable[[], None], *, flush: bool = False, timeout: float | None = None) -> None:
        """Hand over a job; waits while a flush is in flight (for a flush) or ``MAX_QUEUED`` jobs wait, at most
        ``timeout`` seconds (then it is queued all the same)."""
        if self._inert:
            return
        job = Job(what, run, flush)
        if not self.threaded:
            self.flushes += flush
            self._run(job)
            return
        with self._cond:
            if self._stopping:
                raise RuntimeError("This writer is closed.")
            self._wait(lambda: not (flush and self._flush_in_flight()) and len(self._queue) < MAX_QUEUED, timeout)
            self.flushes += flush
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait_for_flush(self, timeout: float | None = None) -> None:
        """Return once no flush is in flight (waits counted), or after ``timeout`` seconds: what a flush does first,
        so that it never collects the quantities' state while their rows of the last flush are being made."""
        if self.threaded and not self._inert:
            with self._cond:
                self._wait(lambda: not self._flush_in_flight(), timeout)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every job handed over is done (at most ``timeout`` seconds); False if some are not."""
        if not self.threaded or self._inert:
            return True
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._running is None, timeout)

    def news(self) -> list[str]:
        """The messages of the jobs that failed since the last call (the training thread warns them)."""
        if not self._news:
            return []
        with self._cond:
            news, self._news = self._news, []
        return news

    def tell(self, message: str) -> None:
        """Pass ``message`` to the training thread (from a job: it warns it at its next call)."""
        with self._cond:
            self._news.append(message)

    def stats(self) -> dict[str, Any]:
        """What run.json records: whether writes run in the background, the flushes handed over, how often and
        how long the training thread waited for the writer, and the time spent writing (wall clock, and the CPU
        time of the thread that wrote: what it took from training's cores)."""
        return {"background": self.threaded, "flushes": self.flushes, "waits": self.waits,
                "waited_s": round(self.waited_s, 4), "longest_wait_s": round(self.longest_wait_s, 4),
                "writing_s": round(self.busy_s, 4), "writing_cpu_s": round(self.busy_cpu_s, 4)}

    def close(self, timeout: float) -> list[str]:
        """Run what is queued (at most ``timeout`` seconds), then stop the thread. Returns what was not written:
        the job being written when the time ran out (a sink stuck in a call), then those never started."""
        if not self.threaded or self._inert:
            return []
        with self._cond:
            self._cond.wait_for(lambda: not self._queue and self._running is None, timeout)
            lost = ([f"{self._running.what} (still being written)"] if self._running else []) + [
                job.what for job in self._queue]
            self._queue.clear()
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and not lost:
            thread.join(timeout)
        _LIVE.discard(self)
        return lost

    def _flush_in_flight(self) -> bool:
        return any(job.flush for job in self._queue) or (self._running is not None and self._running.flush)

    def _wait(self, ready: Callable[[], bool], timeout: float | None = None) -> None:
        """Wait (holding ``_cond``) until ``ready()`` (at most ``timeout`` s); count the wait when there is one."""
        if ready():
            return
        start = time.perf_counter()
        self._cond.wait_for(ready, timeout)
        waited = time.perf_counter() - start
        self.waits += 1
        self.waited_s += waited
        self.longest_wait_s = max(self.longest_wait_s, waited)

    # ------------------------------------------------------------------ the writer thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if self._stopping and not self._queue:
                    return
                job = self._running = self._queue.popleft()
            with self._busy:
                try:
                    self._run(job)
                except Exception as err:  # a write never reaches training: the training thread warns it
                    self.tell(f"gatewatch could not write {job.what}: {type(err).__name__}: {err}. Training goes "
                              "on; the next flushes are written as usual.")
            with self._cond:
                self._running = None
                self._cond.notify_all()

    def _run(self, job: Job) -> None:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            job.run()
        finally:
            self.busy_s += time.perf_counter() - start
            self.busy_cpu_s += time.thread_time() - cpu

    # ------------------------------------------------------------------ fork and exit
    def _before_fork(self) -> bool:
        if self._thread is None or threading.current_thread() is self._thread:  # a job that forks: no wait
            return False
        return self._busy.acquire(timeout=FORK_WAIT_S)

    def _after_fork_in_child(self) -> None:
        """The child has no writer thread: its copy writes nothing (the parent's thread writes the run)."""
        self._inert = True
        self._cond, self._busy = threading.Condition(), threading.Lock()
        self._queue.clear()
        self._running = self._thread = None


_HELD: list[BackgroundWriter] = []  # writers whose _busy the fork under way holds


def _before_fork() -> None:
    _HELD[:] = [w for w in list(_LIVE) if w._before_fork()]


def _after_fork_in_parent() -> None:
    for writer in _HELD:
        writer._busy.release()
    _HELD.clear()


def _after_fork_in_child() -> None:
    _HELD.clear()
    for writer in list(_LIVE):
        writer._after_fork_in_child()


def _at_exit() -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    for writer in list(_LIVE):
        writer.drain(max(0.0, deadline - time.monotonic()))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
