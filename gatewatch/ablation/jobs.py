"""Progress and stop requests of an ablation.

Every ablation reports through a ``progress(done, total, message)`` callback and checks a
``should_stop()`` callback between steps. A tracked (background) job also keeps
``RUN/ablations/<kind>/progress.json`` up to date and stops when the file ``RUN/ablations/<kind>/stop``
appears (:func:`request_stop`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..liveness import pid_alive as _pid_alive
from ..run_format import atomic_write_json
from .errors import AblationError, AblationStopped
from .store import ablations_dir, check_kind

Progress = Callable[[int, int, str], None]  # (done, total, message)
StopFn = Callable[[], bool]


def tick(progress: Progress | None, should_stop: StopFn | None, done: int, total: int, message: str) -> None:
    """Between two steps: raise AblationStopped if asked to stop, else report progress."""
    if should_stop is not None and should_stop():
        raise AblationStopped(f"stopped after {done} of {total} steps")
    if progress is not None:
        progress(done, total, message)


@dataclass
class JobState:
    """The content of ``RUN/ablations/<kind>/progress.json``."""

    kind: str
    status: str  # "running" | "finished" | "failed" | "stopped" | "cut off"
    done: int = 0
    total: int = 0
    message: str = ""
    error: str | None = None
    pid: int = 0
    host: str = ""
    started: float = 0.0
    updated: float = 0.0
    args: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


def job_dir(run_dir: str | os.PathLike[str], kind: str) -> Path:
    """``RUN/ablations/<kind>``: the job's progress file, stop flag and (training) child runs."""
    return ablations_dir(run_dir) / check_kind(kind)


def job_state(run_dir: str | os.PathLike[str], kind: str) -> JobState | None:
    """The last state of a job, with "running" turned into "cut off" when its process is gone."""
    file = job_dir(run_dir, kind) / "progress.json"
    try:
        raw = json.loads(file.read_text())
        state = JobState(**{f.name: raw[f.name] for f in fields(JobState) if f.name in raw})
    except (OSError, ValueError, TypeError):
        return None
    if state.status == "running" and state.host == socket.gethostname() and not _pid_alive(state.pid):
        state.status = "cut off"
    return state


def request_stop(run_dir: str | os.PathLike[str], kind: str) -> None:
    """Ask a running job to stop at its next step (it writes no result)."""
    folder = job_dir(run_dir, kind)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stop").touch()


class Job:
    """Progress file and stop flag of one running job; use as a context manager around the work."""

    def __init__(self, run_dir: str | os.PathLike[str], kind: str, args: Sequence[str] = (),
                 min_interval: float = 0.5) -> None:
        self.folder = job_dir(run_dir, kind)
        self.state = JobState(kind=kind, status="running", pid=os.getpid(), host=socket.gethostname(),
                              started=time.time(), args=list(args))
        self.min_interval = min_interval
        self._last = 0.0

    def __enter__(self) -> Job:
        running = job_state(self.folder.parent.parent, self.state.kind)
        if running is not None and running.status == "running" and running.pid != os.getpid():
            raise AblationError(f"A {self.state.kind} job is already running on this run (pid {running.pid}); stop "
                                "it first or wait for it to finish.")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "stop").unlink(missing_ok=True)
        self._write()
        return self

    def _write(self) -> None:
        self.state.updated = time.time()
        atomic_write_json(self.folder / "progress.json", asdict(self.state))

    def progress(self, done: int, total: int, message: str) -> None:
        self.state.done, self.state.total, self.state.message = done, total, message
        now = time.monotonic()
        if now - self._last >= self.min_interval or done >= total:
            self._last = now
            self._write()

    def should_stop(self) -> bool:
        return (self.folder / "stop").exists()

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> None:
        if exc is None:
            self.state.status, self.state.message = "finished", "done"
        elif isinstance(exc, AblationStopped):
            self.state.status, self.state.message = "stopped", str(exc)
        else:
            self.state.status, self.state.error = "failed", f"{type(exc).__name__}: {exc}"
        (self.folder / "stop").unlink(missing_ok=True)
        self._write()


@dataclass
class Tracking:
    """How a run-directory ablation reports: a job file (``track``), and/or the caller's callbacks."""

    track: bool = False
    args: Sequence[str] = ()
    progress: Progress | None = None
    should_stop: StopFn | None = None

    def start(self, run_dir: Path, kind: str) -> tuple[contextlib.AbstractContextManager[Any], Progress, StopFn]:
        """The context to run the work in, and the progress / stop callbacks to hand to it."""
        job = Job(run_dir, kind, self.args) if self.track else None

        def progress(done: int, total: int, message: str) -> None:
            for report in (job and job.progress, self.progress):
                if report is not None:
                    report(done, total, message)

        def should_stop() -> bool:
            return bool((job is not None and job.should_stop()) or (self.should_stop and self.should_stop()))

        return job or contextlib.nullcontext(), progress, should_stop
