"""The sinks of one watch as its writer thread calls them: the run directory first, then the others, each apart.

Each flush writes the tables and then run.json (with the summary) in the run directory before any other sink is
called, so a slow tracker never delays the commit or the heartbeat that readers see. The heartbeat and the
``updated`` time are stamped when run.json is written. A sink whose call raises (the built-in ones never do; a
user's may) is reported once through ``tell`` and keeps the tables it missed, at most ``MAX_BACKLOG`` flushes,
to take them first at the next flush; the other sinks are not affected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from ..capture.meta import now
from . import Sink
from .live_findings import RecentWindows
from .run_writer import RunDirWriter

MAX_BACKLOG = 32  # flushes a failing sink keeps to write later


class Fanout:
    """Calls ``sinks`` (see the module docstring); ``tell`` passes a message to the training thread. ``strict``: a
    sink's exception propagates (writes on the training thread, for debugging)."""

    def __init__(self, sinks: list[Sink], log_dir: Path, tell: Callable[[str], None],
                 recent: RecentWindows | None = None, *, strict: bool = False) -> None:
        self.sinks = sorted(sinks, key=lambda s: not isinstance(s, RunDirWriter))  # the run directory first
        self.log_dir, self.tell, self.recent, self.strict = log_dir, tell, recent, strict
        self.backlog: dict[int, list[dict[str, pd.DataFrame]]] = {}  # sink index -> tables it missed
        self.failing: set[int] = set()

    def flush(self, tables: dict[str, pd.DataFrame], meta: dict[str, Any], *, closing: bool = False) -> None:
        """Write one flush's tables and run.json, then give the sinks that chart them the recent findings."""
        stamp(meta)
        for i, sink in enumerate(self.sinks):
            self._write(i, sink, tables)
            self._call(i, sink, "write run.json through", lambda s=sink: s.write_meta(meta))
        if self.recent is None:
            return
        self.recent.add(tables)
        findings = self.recent.findings(self.log_dir, meta, force=closing)
        for i, sink in enumerate(self.sinks):
            if sink.wants_findings and findings is not None:
                self._call(i, sink, "log findings through", lambda s=sink: s.log_findings(int(meta["steps"]),
                                                                                         findings))

    def write(self, tables: dict[str, pd.DataFrame]) -> None:
        """Write rows that come between flushes (evaluation metrics)."""
        for i, sink in enumerate(self.sinks):
            self._write(i, sink, tables)

    def write_meta(self, meta: dict[str, Any]) -> None:
        stamp(meta)
        for i, sink in enumerate(self.sinks):
            self._call(i, sink, "write run.json through", lambda s=sink: s.write_meta(meta))

    def close(self, meta: dict[str, Any]) -> None:
        """Close every sink with the report of the recent windows, then write the final run.json."""
        report = None if self.recent is None else self.recent.report(self.log_dir, meta)
        for i, sink in enumerate(self.sinks):
            for tables in self.backlog.pop(i, []):
                self._call(i, sink, "write", lambda s=sink, t=tables: s.write(t))
            self._call(i, sink, "close", lambda s=sink: s.close(report))
        self.write_meta(meta)

    def _write(self, i: int, sink: Sink, tables: dict[str, pd.DataFrame]) -> None:
        waiting = [*self.backlog.pop(i, []), tables]
        while waiting and self._call(i, sink, "write", lambda s=sink, t=waiting[0]: s.write(t)):
            waiting.pop(0)
        if waiting:
            self.backlog[i] = waiting[-MAX_BACKLOG:]

    def _call(self, i: int, sink: Sink, what: str, call: Callable[[], Any]) -> bool:
        """``call()``; a raise is told once (until the sink works again) and returns False."""
        try:
            call()
        except Exception as err:  # a user's sink that raises never reaches training
            if self.strict:
                raise
            if i not in self.failing:
                self.failing.add(i)
                self.tell(f"gatewatch: the sink {type(sink).__name__} raised {type(err).__name__}: {err} (in {what} "
                          f"{self.log_dir}). Training goes on; its rows are kept (at most {MAX_BACKLOG} flushes) and "
                          "given to it again at the next flush.")
            return False
        if i in self.failing and what == "write":
            self.failing.discard(i)
            self.tell(f"gatewatch: the sink {type(sink).__name__} works again; the rows it missed were given to it.")
        return True


def stamp(meta: dict[str, Any]) -> None:
    """The heartbeat and the ``updated`` time of a run.json written now."""
    meta.update(updated=now(), heartbeat=time.time())
